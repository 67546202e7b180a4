"""The int4 dequantize-in-the-GEMM kernel against its torch reference (Triton's interpreter without a GPU).

Packed weights come from compressed-tensors' own ``pack_to_int32`` (the format's packer), so the
kernel, the reference and ``quant.unpack_int4_*`` are all checked against the format, not against
each other only.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

import pytest

from batchllm.kernels.int4_matmul import int4_matmul, tiles
from batchllm.models import quant

pack = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def quantized(N: int, K: int, group_size: int, symmetric: bool, seed: int = 0):
    """(packed, scale, zero, q) of a random int4 weight, packed by compressed-tensors."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    groups = K // group_size
    scale = torch.rand(N, groups, generator=g) * 0.02 + 0.005
    zero = None if symmetric else torch.randint(-8, 8, (N, groups), generator=g, dtype=torch.int8)
    packed = pack.pack_to_int32(q, 4)
    return packed, scale, zero, q


def test_unpacking_matches_compressed_tensors():
    packed, _, _, q = quantized(24, 64, 32, True)
    assert torch.equal(quant.unpack_int4_cols(packed), q)
    assert torch.equal(quant.unpack_int4_cols(packed), pack.unpack_from_int32(packed, 4, torch.Size((24, 64))))
    zeros = torch.randint(-8, 8, (40, 3), dtype=torch.int8)
    assert torch.equal(quant.unpack_int4_rows(pack.pack_to_int32(zeros, 4, packed_dim=0)), zeros)


def test_reference_dequantizes_as_the_format_defines():
    packed, scale, zero, q = quantized(16, 256, 128, False)
    w = quant.dequantize_int4(packed, scale, zero)
    expect = (q.float() - zero.float().repeat_interleave(128, dim=1)) * scale.repeat_interleave(128, dim=1)
    assert torch.equal(w, expect)


@pytest.mark.parametrize("M", [1, 5, 33])
@pytest.mark.parametrize("group_size, symmetric", [(128, True), (128, False), (32, False), (256, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(M, group_size, symmetric, dtype):
    N, K = 40, 256  # N not a multiple of the column tile; K = 256 with group 256 is per-channel
    packed, scale, zero, _ = quantized(N, K, group_size, symmetric, seed=M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(N).to(dtype)
    expect = quant.int4_linear_reference(x.float(), packed, scale, zero, bias.float())
    args = [t.to(DEVICE) if t is not None else None for t in (x, packed, scale, zero, bias)]
    got = int4_matmul(*args).cpu()
    assert got.dtype == dtype and got.shape == (M, N)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expect, rtol=tol, atol=tol * expect.abs().max().item())


def test_kernel_keeps_leading_dims_and_reads_strided_rows():
    packed, scale, zero, _ = quantized(32, 128, 128, False)
    wide = torch.randn(2, 3, 2 * 128)
    x = wide[..., :128]  # rows 256 apart: a view, as a fused projection's slice would be
    got = int4_matmul(x.to(DEVICE), packed.to(DEVICE), scale.to(DEVICE), zero.to(DEVICE)).cpu()
    torch.testing.assert_close(got, quant.int4_linear_reference(x, packed, scale, zero), rtol=1e-4, atol=1e-4)


def test_shape_validation():
    packed, scale, zero, _ = quantized(16, 128, 64, False)
    with pytest.raises(ValueError, match="does not fit"):
        int4_matmul(torch.randn(2, 120), packed, scale, zero)
    with pytest.raises(ValueError, match="zero points"):
        int4_matmul(torch.randn(2, 128), packed, scale, zero.to(torch.int32))


def test_tiles_divide_the_group():
    for group in (16, 32, 64, 128, 4096, 14336):
        for M in (1, 16, 17, 64, 65, 4096):
            bm, bn, bk, _ = tiles(M, group)
            assert group % bk == 0 and bm >= 16 and bn >= 16
