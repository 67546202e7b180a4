"""int4 x 16-bit GEMM with the dequantization inside the GEMM (W4A16), for compressed-tensors' pack-quantized weights.

Follows MARLIN's idea in its simplest Triton form (and the Triton GPTQ kernels before it): the weight
stays packed in device memory, eight 4-bit values to an int32 along the input dimension, and each tile
is unpacked in registers right before its ``tl.dot``, so a decode step reads a quarter of the bf16 bytes.
The integer values (``q - zero``, in [-15, 15]) are exact in bf16/fp16, so the dot runs on the raw
integers and the group's scale multiplies the partial product (one multiply per output per group,
not one per weight).

Layout (``batchllm.models.quant``): ``packed`` (N, K/8) int32, input ``8j + i`` of a row in bits
``4i..4i+3`` of word ``j``, stored as ``q + 8``; ``scale`` (N, groups) float32, one scale per
``K / groups`` inputs; ``zero`` (N, groups) int8 or None (symmetric). The torch reference is
``batchllm.models.quant.int4_linear_reference`` (there, not here, because the CPU path uses it and must
not import Triton).
"""

from __future__ import annotations

import torch

from batchllm.kernels.runtime import check_device, jit, load_triton

triton, tl = load_triton()  # Triton in the mode kernels/runtime.py decided (before Triton loads)


# M (the step's token count) changes every step: left unspecialised, one compile serves every batch
# of a tile size (Triton would otherwise build variants for M == 1 and M % 16 == 0, some of them
# first met while a CUDA graph is being captured)
@jit(do_not_specialize=["M"])
def _int4_matmul_kernel(
    x_ptr, stride_xm, w_ptr, stride_wn, s_ptr, z_ptr, stride_sn, y_ptr, stride_ym,
    M, N, K,
    GROUP_SIZE: tl.constexpr, HAS_ZERO: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid: (row tiles, column tiles); each program owns y[rows, cols] over all of K
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    shift = (rk % 8) * 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        mask_k = k < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # each word is loaded by the 8 inputs it holds: neighbouring lanes hit the same cache line
        words = tl.load(w_ptr + rn[None, :] * stride_wn + (k[:, None] // 8), mask=mask_n[None, :] & mask_k[:, None],
                        other=0)
        q = ((words >> shift[:, None]) & 0xF) - 8  # (BLOCK_K, BLOCK_N)
        g = k0 // GROUP_SIZE  # BLOCK_K divides GROUP_SIZE: one group per K tile
        if HAS_ZERO:
            zero = tl.load(z_ptr + rn * stride_sn + g, mask=mask_n, other=0).to(tl.int32)
            q = q - zero[None, :]
        scale = tl.load(s_ptr + rn * stride_sn + g, mask=mask_n, other=0.0)
        if UPCAST:  # the interpreter has no bf16 dot
            part = tl.dot(x.to(tl.float32), q.to(tl.float32), input_precision=DOT_PRECISION)
        else:
            part = tl.dot(x, q.to(x.dtype), input_precision=DOT_PRECISION)
        acc += part * scale[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def tiles(M: int, group_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for M rows; BLOCK_K divides ``group_size``.

    Decode batches (M <= 16) take narrow column tiles so an 8B layer's N = 4096 still spreads over
    128 programs; prefill chunks take wider tiles that reuse each unpacked weight tile across more rows.
    """
    block_k = next(b for b in (128, 64, 32, 16) if group_size % b == 0)
    if M <= 16:
        return 16, 32, block_k, 4
    if M <= 64:  # a 128-deep K tile here costs 227 registers a thread on sm_90 (Triton 3.9); 64 takes 128
        return 32, 64, min(block_k, 64), 4
    return 64, 128, min(block_k, 64), 8


def supported(group_size: int) -> bool:
    """Whether the kernel runs this group size (a K tile must fit in one group: a multiple of 16)."""
    return group_size % 16 == 0


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T (+ bias)`` for packed int4 W; x (..., K) in fp16/bf16/fp32, result in x's dtype.

    ValueError on shapes that do not fit the layout. A group size that is not a multiple of 16 falls back
    to the torch reference (no published checkpoint uses one).
    """
    from batchllm.models.quant import int4_linear_reference

    N, words = packed.shape
    K = x.shape[-1]
    if words * 8 != K or packed.dtype != torch.int32 or scale.shape[0] != N or K % scale.shape[1]:
        raise ValueError(f"int4_matmul: x (..., {K}) does not fit packed {tuple(packed.shape)} {packed.dtype} "
                         f"with scale {tuple(scale.shape)}")
    if zero is not None and (zero.shape != scale.shape or zero.dtype != torch.int8):
        raise ValueError(f"int4_matmul: zero points {tuple(zero.shape)} {zero.dtype}, expected {tuple(scale.shape)} int8")
    check_device(x.device)
    group_size = K // scale.shape[1]
    if not supported(group_size):
        return int4_linear_reference(x, packed, scale, zero, bias)
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    packed, scale = packed.contiguous(), scale.contiguous().to(torch.float32)
    zero = zero.contiguous() if zero is not None else None
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M:
        block_m, block_n, block_k, warps = tiles(M, group_size)
        grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
        _int4_matmul_kernel[grid](
            x2, x2.stride(0), packed, packed.stride(0), scale, zero if zero is not None else scale, scale.stride(0),
            y, y.stride(0), M, N, K,
            GROUP_SIZE=group_size, HAS_ZERO=zero is not None, UPCAST=x.device.type != "cuda",
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        )
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], N)
