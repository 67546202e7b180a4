"""Building blocks of the decoder: linear (plain, FP8, int4), RMSNorm, rotary embedding, SiLU-and-multiply.

Plain torch, written so that float32 results match transformers' Llama implementation op for op
(the engine's greedy output is tested against transformers'). The Triton kernels of
``batchllm.kernels`` replace the hot ones on a GPU and are tested against these. The quantized linears
keep their weights quantized in memory (formats: ``batchllm.models.quant``); on the CPU they dequantize
one layer's weight per call (the references in ``quant``), on a GPU they run FP8 / int4 GEMMs.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from batchllm.models import quant
from batchllm.models.quant import QuantConfig


class Linear(nn.Module):
    """``y = x W^T (+ b)`` with uninitialised storage: weights always come from a loader, so skip init."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _frozen(*shape: int, dtype: torch.dtype | None = None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


@functools.lru_cache(maxsize=None)
def _has_fp8_rowwise_mm(device_index: int) -> bool:
    # torch._scaled_mm with per-row scales (one per token, one per output channel) runs on sm_90 and
    # newer; sm_89 has FP8 tensor cores but torch's row-wise path is not built for it everywhere.
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


class Fp8Linear(nn.Module):
    """``y = x (s * W)^T (+ b)`` with W kept in float8_e4m3fn and s a float32 scale per output row.

    A per-tensor checkpoint scale is written into every row of its shard (q, k and v keep their own
    scales inside the fused qkv_proj). ``dynamic_activations`` (W8A8): x is quantized to e4m3 per token
    (``quant.quantize_fp8_per_token``) and on a CUDA device of sm_90+ the product is one
    ``torch._scaled_mm`` with row-wise scales (FP8 tensor cores, float32 accumulation, bfloat16 out).
    Elsewhere (the CPU, W8A16, shapes that are not multiples of 16) ``quant.fp8_linear_reference``
    dequantizes this layer's weight for the call.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dynamic_activations: bool = True):
        super().__init__()
        self.weight = _frozen(out_features, in_features, dtype=torch.float8_e4m3fn)
        self.weight_scale = _frozen(out_features, 1, dtype=torch.float32)
        self.bias = _frozen(out_features) if bias else None
        self.dynamic_activations = dynamic_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.weight.shape
        if (self.dynamic_activations and x.is_cuda and n % 16 == 0 and k % 16 == 0
                and _has_fp8_rowwise_mm(x.device.index if x.device.index is not None else torch.cuda.current_device())):
            return self._scaled_mm(x)
        return quant.fp8_linear_reference(x, self.weight, self.weight_scale, self.bias, self.dynamic_activations)

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, xs = quant.quantize_fp8_per_token(x.reshape(-1, shape[-1]))
        # mat2 must be column-major: the (out, in) row-major weight transposed is exactly that
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale.t(),
                             out_dtype=torch.bfloat16)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], -1)


class Int4Linear(nn.Module):
    """``y = x W^T (+ b)`` with W kept as packed int4 (W4A16): ``weight_packed`` (out, in/8) int32,
    ``weight_scale`` (out, groups) float32 and, when asymmetric, ``weight_zero_point`` (out, groups) int8.

    On a CUDA device the Triton kernel ``batchllm.kernels.int4_matmul`` dequantizes inside the GEMM; on
    the CPU ``quant.int4_linear_reference`` dequantizes this layer's weight for the call.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, q: QuantConfig):
        super().__init__()
        groups = q.num_groups(in_features)
        self.weight_packed = _frozen(out_features, in_features // 8, dtype=torch.int32)
        self.weight_scale = _frozen(out_features, groups, dtype=torch.float32)
        self.weight_zero_point = None if q.symmetric else _frozen(out_features, groups, dtype=torch.int8)
        self.bias = _frozen(out_features) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from batchllm.kernels.int4_matmul import int4_matmul  # Triton: imported on a GPU only

            return int4_matmul(x, self.weight_packed, self.weight_scale, self.weight_zero_point, self.bias)
        return quant.int4_linear_reference(x, self.weight_packed, self.weight_scale, self.weight_zero_point, self.bias)


def make_linear(in_features: int, out_features: int, bias: bool, q: QuantConfig | None) -> nn.Module:
    """The decoder's projection for quantization ``q`` (None: a plain Linear in the model dtype)."""
    if q is None:
        return Linear(in_features, out_features, bias)
    if q.scheme == "fp8":
        return Fp8Linear(in_features, out_features, bias, q.dynamic_activations)
    return Int4Linear(in_features, out_features, bias, q)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as transformers does), optionally fused with the residual add."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without ``residual``: norm(x). With it: returns (norm(x + residual), x + residual)."""
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies of rotary embedding, with llama3 or linear scaling (transformers' formulas)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling {kind!r}")
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the rotate-half layout (HF convention), cos/sin computed per step.

    Computing cos/sin from the positions each step costs (T x head_dim/2) multiplies, negligible next to
    the projections, and avoids a cache of max_position_embeddings rows (131k for Llama 3.1).
    """

    def __init__(self, head_dim: int, theta: float, scaling: Mapping[str, Any] | None):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (T, heads, head_dim); cos/sin: (T, head_dim)."""
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos[:, None, :] + rotated * sin[:, None, :]
