"""Store a step's new K/V into the paged cache (vLLM's ``reshape_and_cache`` / nano-vllm's ``store_kvcache``).

Cache layout (``batchllm.engine.attention``): ``kv_cache`` is (2, num_pages, page_size, kv_heads, d) and
slot ``s`` is page ``s // page_size``, offset ``s % page_size``. Rows whose slot is -1 are padding (CUDA
graph buckets) and are skipped.
"""

from __future__ import annotations

import torch
from batchllm.kernels.runtime import check_device, jit, load_triton

triton, tl = load_triton()  # Triton in the mode kernels/runtime.py decided (before Triton loads)


@jit
def _store_kv_kernel(
    k_ptr, stride_kt, stride_kh,
    v_ptr, stride_vt, stride_vh,
    cache_ptr, stride_c, stride_cp, stride_cs, stride_ch,
    slot_ptr,
    num_kv_heads,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    # int64 before any multiplication: slot * page stride passes 2**31 elements in a pool over 2**31
    # elements per layer (an int32 slot_mapping would otherwise keep the whole offset in 32 bits)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    # padding rows (slot -1) fold into the mask: no branch, nothing written. The slot is broadcast to
    # a block first: the interpreter rejects masks combined with a scalar condition.
    keep = (h < num_kv_heads) & ((slot + tl.zeros([BLOCK_H], tl.int64)) >= 0)
    mask = keep[:, None] & (d < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    page = slot // PAGE_SIZE
    dst = page * stride_cp + (slot % PAGE_SIZE) * stride_cs + h[:, None].to(tl.int64) * stride_ch + d[None, :]
    tl.store(cache_ptr + dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(cache_ptr + stride_c + dst, v.to(cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write ``k``, ``v`` (T, kv_heads, d) into ``kv_cache`` at ``slot_mapping`` (T,) int64; slot -1 is skipped.

    ``k`` and ``v`` may be strided views (e.g. slices of a fused qkv projection) as long as the head
    dimension is contiguous. Slots must be distinct (two rows to one slot race).
    """
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must be (T, kv_heads, d) of one shape, got {tuple(k.shape)}, {tuple(v.shape)}")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[3:] != k.shape[1:]:
        raise ValueError(f"kv_cache must be (2, pages, page_size, {k.shape[1]}, {k.shape[2]}), got {tuple(kv_cache.shape)}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slot_mapping must be ({k.shape[0]},) int64, got {tuple(slot_mapping.shape)} {slot_mapping.dtype}")
    if k.stride(2) != 1 or v.stride(2) != 1 or kv_cache.stride(4) != 1:
        raise ValueError("k, v and kv_cache need a contiguous head dimension")
    if k.dtype != v.dtype or not k.is_floating_point():
        raise ValueError(f"k and v must share a float dtype, got {k.dtype}, {v.dtype}")
    if len({k.device, v.device, kv_cache.device, slot_mapping.device}) != 1:
        raise ValueError("all tensors must be on one device")
    check_device(k.device)
    T, H, D = k.shape
    if T == 0:
        return
    _store_kv_kernel[(T,)](
        k, k.stride(0), k.stride(1),
        v, v.stride(0), v.stride(1),
        kv_cache, kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        slot_mapping,
        H,
        PAGE_SIZE=kv_cache.shape[2], HEAD_DIM=D, BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D),
    )


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Torch reference (the same as ``TorchAttention.store_kv``)."""
    num_pages, page_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_pages * page_size, kv_cache.shape[3], kv_cache.shape[4])
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    flat[0].index_copy_(0, slots, k[keep].to(kv_cache.dtype))
    flat[1].index_copy_(0, slots, v[keep].to(kv_cache.dtype))
