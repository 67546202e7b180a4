"""The int4 dequantize-in-the-GEMM kernel against its torch reference (Triton's interpreter without a GPU),
and the FP8 linear's torch._scaled_mm path against its reference (on a GPU of sm_90+ only).

The kernel tests draw random packed words (every 32-bit pattern is eight valid int4 values), so they
need no packer and run on the GPU image, which lacks compressed-tensors; the unpacking itself is checked
against compressed-tensors' own ``pack_to_int32`` / ``unpack_from_int32`` where that package is installed.
"""

from __future__ import annotations

import pytest
import torch

from batchllm.kernels.int4_matmul import int4_matmul, tiles
from batchllm.models import quant
from batchllm.models.layers import Fp8Linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def quantized(N: int, K: int, group_size: int, symmetric: bool, seed: int = 0):
    """(packed, scale, zero) of a random int4 weight: random words, random scales and zero points."""
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(-2**31, 2**31 - 1, (N, K // 8), generator=g, dtype=torch.int64).to(torch.int32)
    groups = K // group_size
    scale = torch.rand(N, groups, generator=g) * 0.02 + 0.005
    zero = None if symmetric else torch.randint(-8, 8, (N, groups), generator=g, dtype=torch.int8)
    return packed, scale, zero


def test_unpacking_matches_compressed_tensors():
    pack = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = torch.randint(-8, 8, (24, 64), dtype=torch.int8)
    packed = pack.pack_to_int32(q, 4)
    assert torch.equal(quant.unpack_int4_cols(packed), q)
    assert torch.equal(quant.unpack_int4_cols(packed), pack.unpack_from_int32(packed, 4, torch.Size((24, 64))))
    zeros = torch.randint(-8, 8, (40, 3), dtype=torch.int8)
    assert torch.equal(quant.unpack_int4_rows(pack.pack_to_int32(zeros, 4, packed_dim=0)), zeros)


def test_reference_dequantizes_as_the_format_defines():
    packed, scale, zero = quantized(16, 256, 128, False)
    q = quant.unpack_int4_cols(packed)
    assert q.min() == -8 and q.max() == 7
    word = packed[3, 5].item() & 0xFFFFFFFF  # inputs 40..47 of row 3, low nibble first, stored as q + 8
    assert q[3, 40:48].tolist() == [((word >> 4 * i) & 0xF) - 8 for i in range(8)]
    w = quant.dequantize_int4(packed, scale, zero)
    expect = (q.float() - zero.float().repeat_interleave(128, dim=1)) * scale.repeat_interleave(128, dim=1)
    assert torch.equal(w, expect)


@pytest.mark.parametrize("M", [1, 5, 33])
@pytest.mark.parametrize("group_size, symmetric", [(128, True), (128, False), (32, False), (256, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(M, group_size, symmetric, dtype):
    N, K = 40, 256  # N not a multiple of the column tile; K = 256 with group 256 is per-channel
    packed, scale, zero = quantized(N, K, group_size, symmetric, seed=M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(N).to(dtype)
    expect = quant.int4_linear_reference(x.float(), packed, scale, zero, bias.float())
    args = [t.to(DEVICE) if t is not None else None for t in (x, packed, scale, zero, bias)]
    got = int4_matmul(*args).cpu()
    assert got.dtype == dtype and got.shape == (M, N)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expect, rtol=tol, atol=tol * expect.abs().max().item())


def test_kernel_keeps_leading_dims_and_reads_strided_rows():
    packed, scale, zero = quantized(32, 128, 128, False)
    wide = torch.randn(2, 3, 2 * 128)
    x = wide[..., :128]  # rows 256 apart: a view, as a fused projection's slice would be
    got = int4_matmul(x.to(DEVICE), packed.to(DEVICE), scale.to(DEVICE), zero.to(DEVICE)).cpu()
    torch.testing.assert_close(got, quant.int4_linear_reference(x, packed, scale, zero), rtol=1e-4, atol=1e-4)


def test_shape_validation():
    packed, scale, zero = quantized(16, 128, 64, False)
    with pytest.raises(ValueError, match="does not fit"):
        int4_matmul(torch.randn(2, 120), packed, scale, zero)
    with pytest.raises(ValueError, match="zero points"):
        int4_matmul(torch.randn(2, 128), packed, scale, zero.to(torch.int32))


def test_tiles_divide_the_group():
    for group in (16, 32, 64, 128, 4096, 14336):
        for M in (1, 16, 17, 64, 65, 4096):
            bm, bn, bk, _ = tiles(M, group)
            assert group % bk == 0 and bm >= 16 and bn >= 16


def test_fp8_reference_quantizes_activations_per_token():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [300.0, 1e-3, -7.0]])
    xq, xs = quant.quantize_fp8_per_token(x)
    assert xq.dtype == torch.float8_e4m3fn and xs.shape == (3, 1)
    assert torch.equal(xs[:, 0], torch.tensor([2.0 / 448, torch.finfo(torch.float32).eps, 300.0 / 448]))
    assert xq.float().abs().amax(-1).tolist() == [448.0, 0.0, 448.0]  # each row's largest value lands on 448


def _fp8_layer(N: int, K: int, device: str, seed: int = 0) -> Fp8Linear:
    g = torch.Generator().manual_seed(seed)
    layer = Fp8Linear(K, N, bias=True, dynamic_activations=True)
    with torch.no_grad():
        layer.weight.copy_((torch.randn(N, K, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn))
        layer.weight_scale.copy_(torch.rand(N, 1, generator=g) * 1e-3 + 1e-4)
        layer.bias.copy_(torch.randn(N, generator=g))
    return layer.to(device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="torch._scaled_mm with row-wise scales needs a CUDA GPU of sm_90+")
@pytest.mark.parametrize("M", [1, 7, 64, 300])
def test_fp8_scaled_mm_matches_the_reference(M):
    from batchllm.models.layers import _has_fp8_rowwise_mm

    layer = _fp8_layer(256, 512, "cuda")
    assert _has_fp8_rowwise_mm(torch.cuda.current_device())
    x = torch.randn(M, 512, device="cuda", dtype=torch.bfloat16)
    got = layer(x)  # the _scaled_mm path
    expect = quant.fp8_linear_reference(x.float(), layer.weight, layer.weight_scale, layer.bias.float(), True)
    assert got.dtype == torch.bfloat16 and got.shape == (M, 256)
    # the same FP8 products summed in float32 in another order, rounded once to bf16
    torch.testing.assert_close(got.float(), expect, rtol=1e-2, atol=1e-2 * expect.abs().max().item())


def test_fp8_layer_on_the_cpu_is_the_reference():
    layer = _fp8_layer(32, 64, "cpu")
    x = torch.randn(3, 64)
    expect = quant.fp8_linear_reference(x, layer.weight, layer.weight_scale, layer.bias, True)
    assert torch.equal(layer(x), expect)


def test_fp8_scaled_mm_call_matches_the_reference_where_torch_runs_it_on_the_cpu():
    """The GPU path's exact torch._scaled_mm call (operand layouts, row-wise scale shapes), run by
    torch's CPU implementation where it has one (torch 2.13 does): it must equal the reference's math."""
    layer = _fp8_layer(48, 64, "cpu")
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    try:
        got = layer._scaled_mm(x)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch {torch.__version__} has no CPU torch._scaled_mm for this call ({type(e).__name__})")
    expect = quant.fp8_linear_reference(x.float(), layer.weight, layer.weight_scale, layer.bias.float(), True)
    assert got.dtype == torch.bfloat16 and got.shape == (5, 48)
    torch.testing.assert_close(got.float(), expect, rtol=1e-2, atol=1e-2 * expect.abs().max().item())
