"""Quantized checkpoints: which ``quantization_config`` batchllm runs, and the tensors each one stores.

Follows the ``compressed-tensors`` format (the one vLLM serves and llmcompressor writes) for two schemes:

* FP8 (``float-quantized``; ``naive-quantized`` for W8A16): e4m3 weights with a per-tensor or per-output-channel float scale, and
  either dynamic per-token FP8 activations (W8A8, llmcompressor's ``FP8_DYNAMIC``) or none (W8A16).
  Checkpoint tensors per Linear: ``weight`` (float8_e4m3fn, out x in) and ``weight_scale``.
* int4 (``pack-quantized``, W4A16): signed 4-bit weights, eight to an int32 along the input dimension
  (element ``i`` of a word in bits ``4i..4i+3``, stored as ``q + 8``), with a float scale per group of
  ``group_size`` inputs or per output channel, and optionally (asymmetric) a signed 4-bit zero point per
  scale, packed along the *output* dimension. Tensors: ``weight_packed`` (int32, out x in/8),
  ``weight_scale`` (out x groups), ``weight_shape`` (int64 [out, in]) and, when asymmetric,
  ``weight_zero_point`` (int32, out/8 x groups). Dequantized: ``w = (q - zero) * scale``.

GPTQ and AWQ 4-bit checkpoints hold the same numbers in other layouts, converted at load into the int4
layout above (``from_gptq_awq``), so they run on the same layer and kernel:

* GPTQ (``quant_method`` "gptq", auto-gptq / GPTQModel; ``checkpoint_format`` or ``format`` "gptq" or
  "gptq_v2"): ``qweight`` (int32, in/8 x out, eight unsigned 4-bit values per word along the input, low
  bits first: the transpose of ``weight_packed``), ``qzeros`` (int32, groups x out/8, packed along the
  output, low bits first), ``scales`` (groups x out) and ``g_idx`` (int32, the group of each input).
  ``w = (q - zero) * scale`` with q and zero in 0..15; "gptq" (v1) stores ``zero - 1``, "gptq_v2" the
  zero itself. Symmetric checkpoints store zero 8 everywhere (checked, then dropped); ``g_idx`` must be
  the trivial ``i // group_size`` (no activation-order permutation).
* AWQ GEMM (``quant_method`` "awq", AutoAWQ; ``version`` "gemm", ``zero_point`` true): ``qweight``
  (int32, in x out/8) and ``qzeros`` (int32, groups x out/8) packed along the output in the order
  0, 2, 4, 6, 1, 3, 5, 7 (slot i of a word holds column ``8c + order[i]``), ``scales`` (groups x out);
  ``w = (q - zero) * scale``.

An unsigned q is the signed ``q - 8`` stored as ``q - 8 + 8``: the nibbles are the same, zero points
become ``zero - 8``.

Anything else (another method, GPTQ / AWQ with other bits, marlin or other GPTQ layouts, AWQ GEMV, an
activation-order ``g_idx``, static activation scales, a quantized lm_head, a quantized KV cache,
sparsity or transforms) is refused in one line (``parse_quantization_config``, or at load for a
``g_idx`` or symmetric zeros that break the config's promise): a checkpoint is never half-loaded. Only
the decoder's projections are quantized; embeddings, norms and the LM head stay in the model dtype.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import torch

from batchllm.models import kv_scales

SUPPORTED = ("compressed-tensors float-quantized FP8 (W8A8 with dynamic per-token activations, or W8A16; "
             "per-tensor or per-channel weight scales) and pack-quantized int4 W4A16 (group or per-channel "
             "scales, symmetric or with zero points); GPTQ 4-bit (checkpoint_format gptq or gptq_v2, group size "
             "a multiple of 8 or -1, sym or asym, desc_act false or a trivial g_idx); AWQ 4-bit GEMM "
             "(zero_point true, group size a multiple of 8)")

# The projections a Llama decoder layer quantizes (everything a `targets: ["Linear"]` scheme reaches but
# the LM head, which must be in `ignore`).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """A supported quantization of the decoder's projections (see the module docstring)."""

    scheme: str  # "fp8" | "int4"
    # fp8: "tensor" | "channel"; int4: "group" | "channel" (the weight scale's granularity)
    strategy: str
    group_size: int | None = None  # int4 "group": inputs per scale
    symmetric: bool = True  # int4: False = zero points stored
    dynamic_activations: bool = False  # fp8: activations quantized per token at run time (W8A8)
    # int4 checkpoint layout: "compressed-tensors" | "gptq" (v1 zeros, stored minus one) | "gptq_v2" | "awq"
    layout: str = "compressed-tensors"

    def weight_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes one projection's weights take in memory (model layout: scales float32, zero points int8)."""
        if self.scheme == "fp8":
            return out_features * in_features + 4 * out_features
        groups = self.num_groups(in_features)
        zeros = 0 if self.symmetric else out_features * groups
        return out_features * in_features // 2 + 4 * out_features * groups + zeros

    def num_groups(self, in_features: int) -> int:
        """Scales per output row (int4): in_features / group_size, or 1 per channel."""
        return in_features // self.group_size if self.strategy == "group" else 1


def parse_quantization_config(raw: Any, num_layers: int) -> QuantConfig | None:
    """The QuantConfig of a config.json ``quantization_config`` value; ValueError (one line) otherwise.
    None for a compressed-tensors config that quantizes only the KV cache (``kv_cache_scheme``, read by
    ``batchllm.models.kv_scales``): the weights are plain.

    The message names what the checkpoint uses and what batchllm supports. ``num_layers``: the decoder's
    depth, to test ``ignore`` against every projection's module name.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"unreadable quantization_config ({type(raw).__name__}); batchllm supports {SUPPORTED}")
    method = raw.get("quant_method")
    if method in ("gptq", "awq"):
        return _parse_gptq_awq(method, raw)
    if method != "compressed-tensors":
        raise ValueError(f"quantization method {method!r} is not supported; batchllm supports {SUPPORTED}")

    def refuse(what: str) -> ValueError:
        return ValueError(f"compressed-tensors checkpoint with {what} is not supported; batchllm supports {SUPPORTED}")

    if raw.get("sparsity_config"):
        raise refuse("a sparsity_config")
    if raw.get("transform_config"):
        raise refuse("a transform_config")
    kv_scales.parse_kv_cache_scheme(raw)  # a KV cache scheme batchllm cannot run: refused here, in one line
    groups = raw.get("config_groups")
    if not groups and raw.get("kv_cache_scheme"):
        return None
    if not isinstance(groups, Mapping) or not groups:
        raise refuse("no config_groups")
    parsed = {_parse_group(name, g, raw.get("format"), refuse) for name, g in groups.items()}
    if len(parsed) > 1:
        raise refuse(f"{len(parsed)} different schemes in config_groups (one scheme for every projection)")
    ignore = raw.get("ignore") or []
    if not any(_matches(p, "lm_head") for p in ignore):
        raise refuse("a quantized lm_head (not in 'ignore')")
    modules = [f"model.layers.{i}.{'mlp' if proj in MLP_PROJECTIONS else 'self_attn'}.{proj}"
               for i in range(num_layers) for proj in PROJECTIONS]
    for pattern in ignore:  # an ignored projection would leave layers with mixed precision
        if any(_matches(pattern, m) for m in modules):
            raise refuse(f"unquantized projections ('ignore' holds {pattern!r})")
    return parsed.pop()


def _parse_gptq_awq(method: str, raw: Mapping[str, Any]) -> QuantConfig:
    """GPTQ / AWQ config keys as auto-gptq, GPTQModel (``format``) and AutoAWQ (``version``) write them."""
    def refuse(what: str) -> ValueError:
        return ValueError(f"quantization method {method!r} with {what} is not supported; batchllm supports {SUPPORTED}")

    bits, size = raw.get("bits", raw.get("w_bit")), raw.get("group_size", raw.get("q_group_size"))
    if bits != 4:
        raise refuse(f"{bits}-bit weights")
    if raw.get("modules_to_not_convert") or raw.get("dynamic"):  # unquantized or per-module overrides
        raise refuse("per-module exceptions (modules_to_not_convert / dynamic)")
    if raw.get("lm_head"):  # GPTQModel's flag for a quantized LM head
        raise refuse("a quantized lm_head")
    if not (isinstance(size, int) and (size == -1 and method == "gptq" or size > 0 and size % 8 == 0)):
        raise refuse(f"group_size {size!r}")
    strategy, group = ("channel", None) if size == -1 else ("group", size)
    if method == "awq":
        version = str(raw.get("version", raw.get("format", "gemm"))).lower()
        if version != "gemm":
            raise refuse(f"version {version!r}")
        if raw.get("zero_point") is not True:
            raise refuse("zero_point false")
        return QuantConfig("int4", strategy, group, symmetric=False, layout="awq")
    fmt = raw.get("checkpoint_format", raw.get("format", "gptq"))
    if raw.get("is_marlin_format"):  # auto-gptq's flag for its Marlin-repacked weights
        raise refuse("the Marlin layout (is_marlin_format)")
    if fmt not in ("gptq", "gptq_v2"):
        raise refuse(f"checkpoint_format {fmt!r}")
    return QuantConfig("int4", strategy, group, symmetric=bool(raw.get("sym", True)), layout=fmt)


def _matches(pattern: Any, name: str) -> bool:
    if not isinstance(pattern, str):
        return False
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def _parse_group(name: str, group: Any, default_format: Any, refuse) -> QuantConfig:
    if not isinstance(group, Mapping):
        raise refuse(f"an unreadable config group {name!r}")
    targets = group.get("targets") or []
    if list(targets) != ["Linear"]:
        raise refuse(f"targets {list(targets)!r} (expected ['Linear'])")
    fmt = group.get("format") or default_format
    w, act = group.get("weights"), group.get("input_activations")
    if group.get("output_activations"):
        raise refuse("quantized output activations")
    if not isinstance(w, Mapping):
        raise refuse(f"config group {name!r} without weights")
    wtype, bits, strategy = w.get("type"), w.get("num_bits"), w.get("strategy")
    if w.get("dynamic"):
        raise refuse("dynamic weight quantization")
    if w.get("actorder") == "group":  # groups in activation order: a weight_g_idx permutation per layer
        raise refuse("activation-ordered groups (actorder 'group')")
    # naive-quantized is what compressed-tensors writes for FP8 weights without activation quantization:
    # the same tensors (e4m3 weight, float scale) as float-quantized
    if fmt in ("float-quantized", "naive-quantized") and wtype == "float" and bits == 8:
        if strategy not in ("tensor", "channel") or not w.get("symmetric", True):
            raise refuse(f"FP8 weights with strategy {strategy!r} (supported: tensor, channel; symmetric)")
        if act is None:
            return QuantConfig("fp8", strategy)
        if not (isinstance(act, Mapping) and act.get("type") == "float" and act.get("num_bits") == 8
                and act.get("dynamic") is True and act.get("strategy") == "token" and act.get("symmetric", True)):
            raise refuse("FP8 activations other than dynamic per-token (static input scales)")
        return QuantConfig("fp8", strategy, dynamic_activations=True)
    if fmt == "pack-quantized" and wtype == "int" and bits == 4:
        if act is not None:
            raise refuse("quantized activations on int4 weights (only W4A16)")
        symmetric = bool(w.get("symmetric", True))
        if strategy == "channel":
            return QuantConfig("int4", "channel", None, symmetric)
        size = w.get("group_size")
        if strategy == "group" and isinstance(size, int) and size > 0 and size % 8 == 0:
            return QuantConfig("int4", "group", size, symmetric)
        raise refuse(f"int4 weights with strategy {strategy!r} and group_size {size!r} (supported: group with a "
                     "multiple of 8, channel)")
    raise refuse(f"format {fmt!r} with {bits}-bit {wtype} weights")


def checkpoint_shapes(q: QuantConfig, prefix: str, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensors of one quantized projection ``prefix`` (e.g. ``model.layers.0.mlp.up_proj``).

    Scales are listed in their 2-D form; ``hf_folder`` also accepts any shape with the same element count
    (a per-tensor scale is stored as () or (1,), a per-channel one as (out,) or (out, 1)).
    """
    if q.scheme == "fp8":
        rows = out_features if q.strategy == "channel" else 1
        return {f"{prefix}.weight": (out_features, in_features), f"{prefix}.weight_scale": (rows, 1)}
    groups = q.num_groups(in_features)
    if q.layout in ("gptq", "gptq_v2"):
        return {f"{prefix}.qweight": (in_features // 8, out_features), f"{prefix}.qzeros": (groups, out_features // 8),
                f"{prefix}.scales": (groups, out_features), f"{prefix}.g_idx": (in_features,)}
    if q.layout == "awq":
        return {f"{prefix}.qweight": (in_features, out_features // 8), f"{prefix}.qzeros": (groups, out_features // 8),
                f"{prefix}.scales": (groups, out_features)}
    shapes = {
        f"{prefix}.weight_packed": (out_features, in_features // 8),
        f"{prefix}.weight_scale": (out_features, groups),
        f"{prefix}.weight_shape": (2,),
    }
    if not q.symmetric:
        shapes[f"{prefix}.weight_zero_point"] = ((out_features + 7) // 8, groups)
    return shapes


def check_shape(q: QuantConfig, out_features: int, in_features: int, prefix: str) -> None:
    """ValueError unless the projection's shape fits the scheme (int4: whole groups and packed words; zero
    points may end in a partly filled word, cut off by ``to_model_layout``)."""
    if q.scheme != "int4":
        return
    if in_features % 8:
        raise ValueError(f"{prefix}: in_features {in_features} is not a multiple of 8 (int4 packing)")
    if q.strategy == "group" and in_features % q.group_size:
        raise ValueError(f"{prefix}: in_features {in_features} is not a multiple of group_size {q.group_size}")
    if q.layout != "compressed-tensors" and out_features % 8:
        raise ValueError(f"{prefix}: out_features {out_features} is not a multiple of 8 ({q.layout} packs zero "
                         "points along the output)")


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 words packed along dim 0 (eight 4-bit values per word, low bits first) -> int8 in [-8, 7].

    Used for the zero points, which compressed-tensors packs along the output dimension; the model keeps
    them unpacked (one byte per scale) so the GEMM reads them as it reads the scales.
    """
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.to(torch.int32).unsqueeze(1) >> shifts[None, :, None]) & 0xF  # (rows/8, 8, cols)
    return (nibbles.reshape(-1, packed.shape[-1]) - 8).to(torch.int8)


def to_model_layout(q: QuantConfig, name: str, tensor: torch.Tensor, out_features: int) -> torch.Tensor:
    """A checkpoint tensor of a quantized projection in the layout the model's layer keeps.

    Scales become float32, (out or 1, 1) for FP8 and (out, groups) for int4; zero points are unpacked to
    int8 (out, groups); FP8 weights, packed int4 words and ``weight_shape`` stay as stored.
    """
    if name.endswith(".weight_scale"):
        flat = tensor.to(torch.float32)
        return flat.reshape(-1, 1) if q.scheme == "fp8" else flat.reshape(out_features, -1)
    if name.endswith(".weight_zero_point"):
        return unpack_int4_rows(tensor)[:out_features]
    return tensor


# Where AWQ puts column 8c + AWQ_ORDER[i] of a word: in slot i (bits 4i..4i+3)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 words along the last dim -> their eight 4-bit values each (int32 0..15), slot 0 (low bits) first."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF).flatten(-2)


def _awq_columns(packed: torch.Tensor) -> torch.Tensor:
    """AWQ words (rows, cols/8) -> their values (int32 0..15, rows x cols) in column order."""
    slots = _nibbles(packed).unflatten(-1, (-1, 8))
    values = torch.empty_like(slots)
    values[..., list(AWQ_ORDER)] = slots
    return values.flatten(-2)


def _pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """int values 0..15 along the last dim -> int32 words of eight, value 8j + i in bits 4i..4i+3 of word j."""
    slots = values.to(torch.int64).unflatten(-1, (-1, 8)) << torch.arange(0, 32, 4, device=values.device)
    words = slots.sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the int32 with the same bits


def from_gptq_awq(q: QuantConfig, name: str, tensor: torch.Tensor, in_features: int) -> tuple[str, torch.Tensor] | None:
    """A GPTQ / AWQ checkpoint tensor as (model parameter name, tensor in ``to_model_layout``'s int4 layout),
    or None for a tensor that is only checked (``g_idx``, a symmetric checkpoint's zeros).

    ``qweight`` -> ``weight_packed`` (out, in/8) int32, ``scales`` -> ``weight_scale`` (out, groups) float32,
    ``qzeros`` -> ``weight_zero_point`` (out, groups) int8 as ``zero - 8``. ValueError (one line) when a
    ``g_idx`` is not ``i // group_size`` or a symmetric checkpoint's zero is not 8.
    """
    prefix, _, leaf = name.rpartition(".")
    if leaf == "scales":
        return f"{prefix}.weight_scale", tensor.to(torch.float32).t().contiguous()
    if leaf == "g_idx":
        size = q.group_size if q.strategy == "group" else in_features
        if not torch.equal(tensor.to(torch.int64), torch.arange(in_features) // size):
            raise ValueError(f"{name} is an activation-order permutation (desc_act); batchllm supports {SUPPORTED}")
        return None
    if leaf == "qweight":
        if q.layout == "awq":  # (in, out/8) interleaved along the output -> (out, in) -> packed along the input
            return f"{prefix}.weight_packed", _pack_nibbles(_awq_columns(tensor).t())
        return f"{prefix}.weight_packed", tensor.to(torch.int32).t().contiguous()  # GPTQ: same words, transposed
    if leaf == "qzeros":
        zeros = _awq_columns(tensor) if q.layout == "awq" else _nibbles(tensor)  # (groups, out)
        if q.layout == "gptq":
            zeros = zeros + 1  # v1 stores zero - 1 (so a zero of 0 cannot be written in v1: GPTQModel made v2)
        if q.symmetric:
            if not bool((zeros == 8).all()):
                raise ValueError(f"{name}: a symmetric (sym) checkpoint with zero points other than 8; batchllm "
                                 f"supports {SUPPORTED}")
            return None
        return f"{prefix}.weight_zero_point", (zeros - 8).t().to(torch.int8).contiguous()
    raise ValueError(f"{name} is not a {q.layout} tensor batchllm reads; batchllm supports {SUPPORTED}")


# ------------------------------------------------------------------------------ torch references (CPU path)


def unpack_int4_cols(packed: torch.Tensor) -> torch.Tensor:
    """int32 words packed along the last dim (``weight_packed``, out x in/8) -> int8 (out, in) in [-8, 7]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # (out, in/8, 8): word j holds inputs 8j..8j+7
    return (nibbles.reshape(packed.shape[0], -1) - 8).to(torch.int8)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """float32 (out, in) weight of an int4 projection: ``(q - zero) * scale``, one scale per group of inputs."""
    q = unpack_int4_cols(packed)
    out_features, groups = scale.shape
    q = q.view(out_features, groups, -1).to(torch.float32)
    if zero_point is not None:
        q = q - zero_point.to(torch.float32).unsqueeze(-1)
    return (q * scale.unsqueeze(-1)).reshape(out_features, -1)


def int4_linear_reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                          zero_point: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T (+ b)`` with W dequantized for this call only (nothing kept): the CPU path and the kernel's reference."""
    return torch.nn.functional.linear(x, dequantize_int4(packed, scale, zero_point).to(x.dtype), bias)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8: (e4m3 values, float32 scale per row) with ``scale = max|x_row| / 448``.

    compressed-tensors' rule (its ``FP8_DYNAMIC`` activations): a zero row gets the smallest float32
    step as its scale; values are clamped to +-448 before the cast.
    """
    xf = x.to(torch.float32)
    scale = xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX
    scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None, dynamic_activations: bool) -> torch.Tensor:
    """``x W^T (+ b)`` for e4m3 ``weight`` with float32 ``weight_scale`` (out, 1), in float32, cast to x's dtype.

    W8A8 (``dynamic_activations``): x goes through per-token FP8 first, so the result is what the FP8 GEMM
    computes (up to its accumulation order). The weight is dequantized for this call only.
    """
    xf = x.to(torch.float32)
    if dynamic_activations:
        xq, xs = quantize_fp8_per_token(xf)
        xf = xq.to(torch.float32) * xs
    w = weight.to(torch.float32) * weight_scale
    y = torch.nn.functional.linear(xf, w, None if bias is None else bias.to(torch.float32))
    return y.to(x.dtype)
