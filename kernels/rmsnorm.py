"""RMSNorm, optionally fused with the residual add (vLLM's ``fused_add_rms_norm``), one row per program.

Matches ``batchllm.models.layers.RMSNorm`` op for op: ``x + residual`` rounded to the input dtype (it
becomes the next residual), the statistics in float32, the normalised row rounded to the input dtype
before the weight multiply (transformers' Llama order), so bf16 results agree to the last bit up to the
order of the float32 sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from batchllm.kernels.paged_attention import interpreting


@triton.jit
def _rmsnorm_kernel(
    x_ptr, stride_x, res_ptr, stride_r, w_ptr, out_ptr, stride_o, res_out_ptr, stride_ro,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    mask = c < n_cols
    x = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + c, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + c, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    y = (h * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + c, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """``norm(x) * weight``; with ``residual``: returns ``(norm(x + residual) * weight, x + residual)``.

    ``x``, ``residual``: (T, hidden) with contiguous rows; ``weight``: (hidden,). Outputs are new tensors
    in x's dtype (the weight's dtype when it differs, as torch would promote).
    """
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"x must be (T, hidden) and weight (hidden,), got {tuple(x.shape)}, {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x: {tuple(x.shape)} {x.dtype}, got {tuple(residual.shape)} {residual.dtype}")
    if x.stride(1) != 1 or weight.stride(0) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("x, residual and weight need contiguous rows")
    if not x.is_floating_point() or not weight.is_floating_point():
        raise ValueError("x and weight must be floating point")
    devices = {x.device, weight.device} | ({residual.device} if residual is not None else set())
    if len(devices) != 1:
        raise ValueError("all tensors must be on one device")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")
    T, n = x.shape
    out = torch.empty(T, n, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res_out = torch.empty_like(x) if residual is not None else None
    if T:
        block = triton.next_power_of_2(n)
        _rmsnorm_kernel[(T,)](
            x, x.stride(0), residual if residual is not None else x, residual.stride(0) if residual is not None else 0,
            weight, out, out.stride(0), res_out if res_out is not None else out, res_out.stride(0) if res_out is not None else 0,
            n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 512)),
        )
    return out if residual is None else (out, res_out)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Torch reference: ``batchllm.models.layers.RMSNorm.forward``."""
    if residual is not None:
        x = x + residual
        residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, residual)
