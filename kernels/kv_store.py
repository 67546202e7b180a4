"""Store a step's new K/V into the paged cache (vLLM's ``reshape_and_cache`` / nano-vllm's ``store_kvcache``).

Cache layout (``batchllm.engine.attention``): ``kv_cache`` is (2, num_pages, page_size, kv_heads, d) and
slot ``s`` is page ``s // page_size``, offset ``s % page_size``. Rows whose slot is -1 are padding (CUDA
graph buckets) and are skipped.

An FP8 cache (``torch.float8_e4m3fn``, ``--kv-cache-dtype fp8``) stores ``clamp(x / scale, -448, 448)``
rounded to nearest even, one byte per element, with the layer's scale per KV head (the checkpoint's
calibrated ``k_scale`` / ``v_scale``, or 1.0: ``batchllm.engine.kv_cache``). The kernel multiplies by the
reciprocal the scales tensor holds (``kv_cache.kv_scales``: read on the device, so a captured graph
replays with the layer's own scales) and rounds in float32 itself, so the interpreter and the GPU write
the bytes ``batchllm.engine.kv_cache.quantize_fp8`` writes.
"""

from __future__ import annotations

import torch
from batchllm.engine.kv_cache import check_kv_scales, quantize_fp8
from batchllm.kernels.runtime import check_device, jit, load_triton

triton, tl = load_triton()  # Triton in the mode kernels/runtime.py decided (before Triton loads)


@jit
def _round_e4m3(x):
    """float32 ``x`` saturated to +-448 and rounded to nearest even on the e4m3 grid (3 mantissa bits,
    subnormal step 2**-9), still as float32: exactly representable, so the cast to fp8 is exact. Done by
    hand because Triton's interpreter truncates float32 -> fp8 casts."""
    a = tl.minimum(tl.abs(x), 448.0)  # kv_cache.FP8_MAX (a jit function reads no plain global)
    # the binade's exponent from the bits; subnormals share the step of the lowest normal binade (2**-6)
    exp = tl.maximum(a.to(tl.int32, bitcast=True) >> 23, 127 - 6)
    step = ((exp - 3) << 23).to(tl.float32, bitcast=True)  # 2**(e - 3): 8 steps per binade
    inv_step = ((257 - exp) << 23).to(tl.float32, bitcast=True)  # 2**-(e - 3), exact (no approximate division)
    # a * inv_step < 16 is exact (a power of two); adding and removing 2**23 rounds it to nearest even
    q = ((a * inv_step + 8388608.0) - 8388608.0) * step
    return tl.where(x.to(tl.int32, bitcast=True) < 0, -q, q)  # the sign bit: -0.0 stays -0.0, as torch casts it


@jit
def _store_kv_kernel(
    k_ptr, stride_kt, stride_kh,
    v_ptr, stride_vt, stride_vh,
    cache_ptr, stride_c, stride_cp, stride_cs, stride_ch,
    slot_ptr, scale_ptr,
    num_kv_heads,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    FP8: tl.constexpr,
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
    if FP8:  # scale_ptr: (4, num_kv_heads) float32, rows 2 and 3 the reciprocals of k_scale and v_scale
        k_inv = tl.load(scale_ptr + 2 * num_kv_heads + h, mask=h < num_kv_heads, other=1.0)
        v_inv = tl.load(scale_ptr + 3 * num_kv_heads + h, mask=h < num_kv_heads, other=1.0)
        k = _round_e4m3(k.to(tl.float32) * k_inv[:, None])
        v = _round_e4m3(v.to(tl.float32) * v_inv[:, None])
    page = slot // PAGE_SIZE
    dst = page * stride_cp + (slot % PAGE_SIZE) * stride_cs + h[:, None].to(tl.int64) * stride_ch + d[None, :]
    tl.store(cache_ptr + dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(cache_ptr + stride_c + dst, v.to(cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             kv_scales: torch.Tensor | None = None) -> None:
    """Write ``k``, ``v`` (T, kv_heads, d) into ``kv_cache`` at ``slot_mapping`` (T,) int64; slot -1 is skipped.

    ``k`` and ``v`` may be strided views (e.g. slices of a fused qkv projection) as long as the head
    dimension is contiguous. Slots must be distinct (two rows to one slot race). A ``float8_e4m3fn``
    cache gets ``batchllm.engine.kv_cache.quantize_fp8(k, 1 / k_scale)``'s bytes (scaled, saturated,
    rounded to nearest even): ``kv_scales`` is the layer's (4, kv_heads) float32 tensor
    (``kv_cache.kv_scales``), None for scale 1; a 16/32-bit cache holds the values themselves and ignores it.
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
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if fp8:
        kv_scales = check_kv_scales(kv_scales, H, k.device)
    if T == 0:
        return
    _store_kv_kernel[(T,)](
        k, k.stride(0), k.stride(1),
        v, v.stride(0), v.stride(1),
        kv_cache, kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        slot_mapping, kv_scales if fp8 else slot_mapping,  # a 16/32-bit cache reads no scale
        H,
        PAGE_SIZE=kv_cache.shape[2], HEAD_DIM=D, BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D),
        FP8=fp8,
    )


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 kv_scales: torch.Tensor | None = None) -> None:
    """Torch reference (the same as ``TorchAttention.store_kv``)."""
    num_pages, page_size = kv_cache.shape[1], kv_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k, v = k[keep], v[keep]
    if kv_cache.dtype == torch.float8_e4m3fn:  # torch has no fp8 index_copy_ on the CPU: copy the bytes
        inv = check_kv_scales(kv_scales, k.shape[1], k.device)[2:, :, None]  # (2, kv_heads, 1): 1 / k_scale, 1 / v_scale
        kv_cache = kv_cache.view(torch.uint8)
        k, v = quantize_fp8(k, inv[0]).view(torch.uint8), quantize_fp8(v, inv[1]).view(torch.uint8)
    flat = kv_cache.view(2, num_pages * page_size, kv_cache.shape[3], kv_cache.shape[4])
    flat[0].index_copy_(0, slots, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slots, v.to(kv_cache.dtype))

