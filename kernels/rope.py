"""Rotary position embedding (rotate-half / HF layout) applied to q and k in one launch.

cos/sin come from ``positions * inv_freq`` inside the kernel, so no cos/sin cache is needed and any
frequency scaling (llama3, linear) is just a different ``inv_freq`` (``batchllm.models.layers.rope_inv_freq``).
Rounds like ``RotaryEmbedding`` in eager torch: cos/sin rounded to the input dtype, each product rounded,
then the sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from batchllm.kernels.paged_attention import interpreting


@triton.jit
def _rope_rows(x_ptr, stride_t, stride_h, o_ptr, so_t, so_h, t, cos, sin, num_heads,
               HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    f = tl.arange(0, BLOCK_F)
    mask = (h < num_heads)[:, None] & (f < HALF)[None, :]
    src = x_ptr + t * stride_t + h[:, None] * stride_h + f[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dt = o_ptr.dtype.element_ty
    # out[:half] = x1*cos - x2*sin, out[half:] = x2*cos + x1*sin, each product rounded as torch does
    y1 = (x1 * cos[None, :]).to(dt).to(tl.float32) - (x2 * sin[None, :]).to(dt).to(tl.float32)
    y2 = (x2 * cos[None, :]).to(dt).to(tl.float32) + (x1 * sin[None, :]).to(dt).to(tl.float32)
    dst = o_ptr + t * so_t + h[:, None] * so_h + f[None, :]
    tl.store(dst, y1.to(dt), mask=mask)
    tl.store(dst + HALF, y2.to(dt), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, sq_t, sq_h, k_ptr, sk_t, sk_h,
    qo_ptr, sqo_t, sqo_h, ko_ptr, sko_t, sko_h,
    pos_ptr, inv_freq_ptr,
    num_q_heads, num_k_heads,
    HALF: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_F: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    f = tl.arange(0, BLOCK_F)
    inv_freq = tl.load(inv_freq_ptr + f, mask=f < HALF, other=0.0)
    angle = tl.load(pos_ptr + t).to(tl.float32) * inv_freq
    dt = qo_ptr.dtype.element_ty
    cos = tl.cos(angle).to(dt).to(tl.float32)
    sin = tl.sin(angle).to(dt).to(tl.float32)
    _rope_rows(q_ptr, sq_t, sq_h, qo_ptr, sqo_t, sqo_h, t, cos, sin, num_q_heads, HALF, BLOCK_QH, BLOCK_F)
    _rope_rows(k_ptr, sk_t, sk_h, ko_ptr, sko_t, sko_h, t, cos, sin, num_k_heads, HALF, BLOCK_KH, BLOCK_F)


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies of ``q`` (T, Hq, d) and ``k`` (T, Hk, d) at ``positions`` (T,) with ``inv_freq`` (d/2,) float32.

    ``q`` and ``k`` may be strided views of a fused projection (contiguous head dimension); outputs are
    contiguous, in the inputs' dtype.
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must be (T, heads, d) with one T and d, got {tuple(q.shape)}, {tuple(k.shape)}")
    T, Hq, D = q.shape
    if D % 2 or inv_freq.shape != (D // 2,) or inv_freq.dtype != torch.float32:
        raise ValueError(f"head_dim must be even and inv_freq float32 ({D // 2},), got {D}, {tuple(inv_freq.shape)} {inv_freq.dtype}")
    if positions.shape != (T,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be ({T},) int32/int64, got {tuple(positions.shape)} {positions.dtype}")
    if q.dtype != k.dtype or not q.is_floating_point():
        raise ValueError(f"q and k must share a float dtype, got {q.dtype}, {k.dtype}")
    if q.stride(2) != 1 or k.stride(2) != 1 or inv_freq.stride(0) != 1:
        raise ValueError("q, k and inv_freq need a contiguous last dimension")
    if len({q.device, k.device, positions.device, inv_freq.device}) != 1:
        raise ValueError("all tensors must be on one device")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if T:
        _rope_kernel[(T,)](
            q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1),
            q_out, q_out.stride(0), q_out.stride(1), k_out, k_out.stride(0), k_out.stride(1),
            positions, inv_freq,
            Hq, k.shape[1],
            HALF=D // 2, BLOCK_QH=triton.next_power_of_2(Hq), BLOCK_KH=triton.next_power_of_2(k.shape[1]),
            BLOCK_F=triton.next_power_of_2(D // 2),
        )
    return q_out, k_out


def rotary_embedding_ref(q, k, positions, inv_freq):
    """Torch reference: ``RotaryEmbedding.cos_sin`` + ``RotaryEmbedding.apply`` of ``batchllm.models.layers``."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)

    def apply(x):
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos[:, None, :] + rotated * sin[:, None, :]

    return apply(q), apply(k)
