"""The KV store kernel against its torch reference, and its address arithmetic past 2**31 elements.

(The RMSNorm, rotary and SiLU kernels were removed: the model never called them, issue 12 item 9.)"""

from __future__ import annotations

import pytest
import torch
from batchllm.kernels.kv_store import store_kv, store_kv_ref

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


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_store_kv_offsets_past_2_31_elements(slot_dtype):
    """Page offsets are 64-bit even for an int32 slot_mapping (pools over 2**31 elements per layer).

    Without 8 GB: an int8 cache view whose pages are 2**30 elements apart, over one 4 GiB allocation of
    which only the touched pages become resident (the rest is never written, so never backed). The view
    starts 2**31 elements into the allocation, so a 32-bit offset that wraps (page 2 x 2**30 = -2**31)
    still lands inside it: a regression writes to the wrong place and fails the comparison, no crash.
    """
    base = 2**31
    try:
        buf = torch.empty(base + 2**31 + 4096, dtype=torch.int8, device=DEVICE)
    except (RuntimeError, MemoryError) as e:  # a host or device that refuses 4 GiB of address space
        pytest.skip(f"cannot reserve 4 GiB: {e}")
    # (2, pages, page_size 16, 1 head, d 16): K page p at base + p * 2**30, V page p 512 elements later
    cache = buf.as_strided((2, 3, 16, 1, 16), (512, 2**30, 16, 16, 1), storage_offset=base)
    for p in range(3):
        cache[:, p].zero_()
    buf[:4096].zero_()  # where a wrapped offset would land
    T = 4
    k = (torch.arange(T * 16, dtype=torch.float32) % 100 + 1).view(T, 1, 16).to(DEVICE)
    slots = torch.tensor([2 * 16 + 3, 0, 16 + 5, 2 * 16 + 15], dtype=slot_dtype, device=DEVICE)
    assert int(slots.max()) // 16 * cache.stride(1) >= 2**31  # the offset needs 64 bits
    store_kv(k, -k, cache, slots)
    for i, s in enumerate(slots.tolist()):
        assert torch.equal(cache[0, s // 16, s % 16].float(), k[i]), f"K row {i} (slot {s})"
        assert torch.equal(cache[1, s // 16, s % 16].float(), -k[i]), f"V row {i} (slot {s})"
    assert not buf[:4096].any(), "a 32-bit offset wrapped around"
