"""KV store, RMSNorm (+ residual), rotary embedding and SiLU-and-multiply kernels against the torch layers."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

import pytest
from batchllm.kernels.activation import silu_and_mul, silu_and_mul_ref
from batchllm.kernels.kv_store import store_kv, store_kv_ref
from batchllm.kernels.rmsnorm import rms_norm, rms_norm_ref
from batchllm.kernels.rope import rotary_embedding, rotary_embedding_ref

from batchllm.models.layers import RMSNorm, RotaryEmbedding, rope_inv_freq
from batchllm.models.layers import silu_and_mul as layer_silu_and_mul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_skips_padding_and_reads_strided_views(dtype):
    T, kvh, d, ps, pages = 7, 2, 24, 4, 6
    # k and v as slices of a fused projection, as the model produces them (rows not contiguous)
    qkv = rand(T, 3 * kvh * d, dtype=dtype).view(T, 3, kvh, d)
    k, v = qkv[:, 1], qkv[:, 2]
    slots = torch.tensor([5, 0, -1, 23, 12, -1, 4], device=DEVICE)
    cache = torch.zeros(2, pages, ps, kvh, d, dtype=dtype, device=DEVICE)
    expect = cache.clone()
    store_kv(k, v, cache, slots)
    store_kv_ref(k, v, expect, slots)
    assert torch.equal(cache, expect)


def test_store_kv_validation():
    cache = torch.zeros(2, 2, 4, 2, 8, device=DEVICE)
    k = torch.zeros(3, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(k, k, cache, torch.zeros(2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="kv_cache must be"):
        store_kv(k, k, cache[:, :, :, :1], torch.zeros(3, dtype=torch.int64, device=DEVICE))


def tol_for(dtype):
    """float32: rounding order only. 16-bit: one rounding step; the CPU interpreter also truncates
    float32 -> bfloat16 where a GPU rounds to nearest, so exact bit equality is only checked on CUDA."""
    if dtype == torch.float32:
        return {"atol": 1e-5, "rtol": 1e-5}
    return {"atol": 1e-2, "rtol": 1e-2} if DEVICE == "cuda" else {"atol": 3e-2, "rtol": 3e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 72])
def test_rms_norm_matches_layer(dtype, hidden):
    x, res = rand(5, hidden, dtype=dtype, seed=1, scale=3), rand(5, hidden, dtype=dtype, seed=2)
    layer = RMSNorm(hidden, 1e-6).to(DEVICE)
    layer.weight.data = (1 + rand(hidden, seed=3, scale=0.1)).to(dtype)
    torch.testing.assert_close(rms_norm(x, layer.weight, 1e-6), layer(x), **tol_for(dtype))
    out, new_res = rms_norm(x, layer.weight, 1e-6, residual=res)
    ref_out, ref_res = layer(x, res)
    if dtype == torch.float32 or DEVICE == "cuda":
        assert torch.equal(new_res, ref_res)  # the residual sum is rounded exactly like torch
    torch.testing.assert_close(new_res, ref_res, **tol_for(dtype))
    torch.testing.assert_close(out, ref_out, **tol_for(dtype))
    torch.testing.assert_close(out, rms_norm_ref(x, layer.weight, 1e-6, res)[0], **tol_for(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,scaling", [(64, None), (128, {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64})])
def test_rotary_embedding_matches_layer(dtype, head_dim, scaling):
    T, hq, hk = 6, 4, 2
    qkv = rand(T, (hq + 2 * hk) * head_dim, dtype=dtype, seed=4).view(T, hq + 2 * hk, head_dim)
    q, k = qkv[:, :hq], qkv[:, hq : hq + hk]  # strided views, as in the model
    positions = torch.tensor([0, 1, 2, 17, 300, 4095], device=DEVICE)
    rope = RotaryEmbedding(head_dim, 500000.0, scaling).to(DEVICE)
    cos, sin = rope.cos_sin(positions, dtype)
    q_out, k_out = rotary_embedding(q, k, positions, rope.inv_freq)
    # float32: cos/sin of large angles differ by an ulp between libraries; bf16: one rounding step
    tol = {"atol": 2e-5, "rtol": 2e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}
    torch.testing.assert_close(q_out, RotaryEmbedding.apply(q, cos, sin), **tol)
    torch.testing.assert_close(k_out, RotaryEmbedding.apply(k, cos, sin), **tol)
    ref_q, ref_k = rotary_embedding_ref(q, k, positions, rope.inv_freq)
    torch.testing.assert_close(q_out, ref_q, **tol)
    torch.testing.assert_close(k_out, ref_k, **tol)


def test_rotary_embedding_validation():
    q = torch.zeros(2, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="inv_freq"):
        rotary_embedding(q, q, torch.zeros(2, dtype=torch.int64, device=DEVICE), rope_inv_freq(6, 1e4, None).to(DEVICE))
    with pytest.raises(ValueError, match="positions"):
        rotary_embedding(q, q, torch.zeros(2, device=DEVICE), rope_inv_freq(8, 1e4, None).to(DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [48, 37])
def test_silu_and_mul_matches_layer(dtype, inter):
    x = rand(3, 2 * inter, dtype=dtype, seed=5, scale=2)
    out = silu_and_mul(x)
    # bf16 values near 4 are 1/32 apart: allow one rounding step
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1.6e-2}
    torch.testing.assert_close(out, layer_silu_and_mul(x), **tol)
    torch.testing.assert_close(out, silu_and_mul_ref(x), **tol)
    with pytest.raises(ValueError, match="2\\*I"):
        silu_and_mul(x[:, :-1])
