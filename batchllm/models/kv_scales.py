"""Calibrated FP8 KV cache scales of a compressed-tensors checkpoint (``quantization_config.kv_cache_scheme``).

llmcompressor calibrates a KV cache for FP8 and compressed-tensors writes the result: config.json's
``quantization_config`` gets a ``kv_cache_scheme`` (``type: float``, ``num_bits: 8``, ``symmetric``,
static), and every layer's attention module two scales, ``model.layers.N.self_attn.k_scale`` and
``v_scale``: one value per layer (``strategy: tensor``, shape (1,)) or one per KV head (``strategy:
attn_head``, shape (num_kv_heads, 1, 1)), in the checkpoint's float dtype, ``max |x| / 448`` of the
post-RoPE keys and of the values seen in calibration. The cache then holds ``x / scale`` in e4m3 and
reads ``stored * scale`` (``batchllm.engine.kv_cache``), as vLLM's FP8 KV cache does; without a scheme
the scales are 1.0. Zero points the writer may store beside them are zeros (symmetric) and unused, as
in vLLM.

The scales apply with ``--kv-cache-dtype fp8`` only. With ``auto`` the KV cache keeps the model's dtype
and the scales are unused, as in vLLM, which resolves ``auto`` to fp8 only for ModelOpt checkpoints'
``kv_cache_quant_algo``, not for a compressed-tensors ``kv_cache_scheme`` (``build.make_engine`` logs a
hint). Anything else in ``kv_cache_scheme`` (integer or 4-bit KV, asymmetric or dynamic scales, other
strategies) is refused in one line.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from batchllm.errors import BatchLLMError

SUPPORTED = "8-bit float, symmetric, static scales, strategy 'tensor' (per layer) or 'attn_head' (per KV head)"
STRATEGIES = ("tensor", "attn_head")


@dataclasses.dataclass(frozen=True)
class KVCacheScheme:
    """A supported ``kv_cache_scheme``: e4m3 K/V with static scales per layer or per KV head."""

    strategy: str  # "tensor" | "attn_head"

    def scale_elements(self, num_kv_heads: int) -> int:
        """Values in one ``k_scale`` / ``v_scale`` tensor."""
        return num_kv_heads if self.strategy == "attn_head" else 1


def parse_kv_cache_scheme(quantization_config: Any) -> KVCacheScheme | None:
    """The KV cache scheme of a config.json ``quantization_config`` value: None when it declares none,
    ValueError (one line naming what the checkpoint asks for and what is supported) when batchllm
    cannot run it."""
    if not isinstance(quantization_config, Mapping):
        return None
    raw = quantization_config.get("kv_cache_scheme")
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ValueError(f"unreadable kv_cache_scheme ({type(raw).__name__}); batchllm supports {SUPPORTED}")
    kind, bits, strategy = raw.get("type"), raw.get("num_bits"), raw.get("strategy")
    problems = []
    if kind != "float" or bits != 8:
        problems.append(f"{bits}-bit {kind}")
    if not raw.get("symmetric", True):
        problems.append("asymmetric")
    if raw.get("dynamic"):
        problems.append(f"dynamic ({raw.get('dynamic')!r})")
    if strategy not in STRATEGIES:
        problems.append(f"strategy {strategy!r}")
    if problems:
        raise ValueError(f"a KV cache scheme with {', '.join(problems)} is not supported; batchllm supports {SUPPORTED}")
    return KVCacheScheme(strategy)


def scale_names(layer: int) -> tuple[str, str]:
    """The checkpoint names of layer ``layer``'s K and V scales."""
    return f"model.layers.{layer}.self_attn.k_scale", f"model.layers.{layer}.self_attn.v_scale"


def read_kv_scales(folder: Path, files: Sequence[Path], num_layers: int, num_kv_heads: int
                   ) -> tuple[KVCacheScheme, list[tuple[torch.Tensor, torch.Tensor]]] | None:
    """The KV cache scheme of the Hugging Face folder ``folder`` and every layer's (k_scale, v_scale) from its
    safetensors ``files`` (``hf_folder.safetensors_files``): float32 tensors of
    ``scheme.scale_elements(num_kv_heads)`` values; None when config.json declares no ``kv_cache_scheme``.
    BatchLLMError (one line) for a scheme that is not supported, a scale missing from the files, of the
    wrong size, not finite or not positive."""
    from safetensors import safe_open

    try:
        raw = json.loads((folder / "config.json").read_text())
        scheme = parse_kv_cache_scheme(raw.get("quantization_config", raw.get("compression_config")))
    except ValueError as e:  # json's errors are ValueErrors too
        raise BatchLLMError(f"{folder}: {e}") from None
    if scheme is None:
        return None
    wanted = {name for i in range(num_layers) for name in scale_names(i)}
    found: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as h:
            for name in wanted.intersection(h.keys()):
                found[name] = h.get_tensor(name)
    missing = sorted(wanted - found.keys(), key=lambda n: (len(n), n))
    if missing:
        more = f" (and {len(missing) - 2} more)" if len(missing) > 2 else ""
        raise BatchLLMError(f"{folder}: config.json declares a kv_cache_scheme but the checkpoint lacks "
                            f"{', '.join(missing[:2])}{more}")
    size = scheme.scale_elements(num_kv_heads)
    out = []
    for i in range(num_layers):
        pair = []
        for name in scale_names(i):
            t = found[name].to(torch.float32).reshape(-1)
            if t.numel() != size:
                raise BatchLLMError(f"{folder}: {name} has {t.numel()} values; strategy {scheme.strategy!r} with "
                                    f"{num_kv_heads} KV heads implies {size}")
            if not (torch.isfinite(t).all() and (t > 0).all()):
                raise BatchLLMError(f"{folder}: {name} must be finite and > 0, got {t.tolist()}")
            pair.append(t)
        out.append((pair[0], pair[1]))
    return scheme, out
