"""SiLU-and-multiply of the fused gate/up projection (the Llama MLP's ``silu(gate) * up``).

Rounds like ``batchllm.models.layers.silu_and_mul`` in eager torch: silu in float32, rounded to the input
dtype, then the product in float32, rounded again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from batchllm.kernels.paged_attention import interpreting


@triton.jit
def _silu_and_mul_kernel(x_ptr, stride_x, out_ptr, stride_o, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < n
    gate = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n + c, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + c, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """(T, 2I) -> (T, I): ``silu(x[:, :I]) * x[:, I:]``."""
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x must be (T, 2*I), got {tuple(x.shape)}")
    if x.stride(1) != 1 or not x.is_floating_point():
        raise ValueError("x must be floating point with contiguous rows")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")
    T, n2 = x.shape
    n = n2 // 2
    out = torch.empty(T, n, dtype=x.dtype, device=x.device)
    if T and n:
        block = min(1024 if x.device.type == "cuda" else 4096, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(T, triton.cdiv(n, block))](x, x.stride(0), out, out.stride(0), n, BLOCK=block, num_warps=4)
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Torch reference: ``batchllm.models.layers.silu_and_mul``."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
