"""Loading a Hugging Face model folder: config.json, safetensors weights (single or sharded), tokenizer.

Only safetensors are read; pickle checkpoints (*.bin, *.pt, ...) are refused because unpickling can run
arbitrary code. ``weight_names(cfg)`` is the parameter naming contract every loader yields.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch

from batchllm.errors import BatchLLMError
from batchllm.models import quant
from batchllm.models.config import ModelConfig

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def weight_names(cfg: ModelConfig) -> list[str]:
    """The Hugging Face parameter names of a model with this config, in canonical order.

    A quantized config (``cfg.quant``) names each projection's checkpoint tensors instead of its
    ``weight`` (``quant.checkpoint_shapes``: e.g. ``weight_packed``, ``weight_scale``, ``weight_shape``, or
    GPTQ's ``qweight``, ``qzeros``, ``scales``, ``g_idx``), which ``iter_weights`` yields under the
    quantized layer's names.
    """
    return list(weight_shapes(cfg))


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Expected shape of each parameter (out_features first, as nn.Linear stores it), in canonical order."""
    h = cfg.hidden_size
    proj = cfg.projection_shapes()
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}

    def projection(prefix: str, name: str) -> None:
        out_features, in_features = proj[name]
        if cfg.quant is None:
            out[f"{prefix}{name}.weight"] = (out_features, in_features)
        else:
            out.update(quant.checkpoint_shapes(cfg.quant, f"{prefix}{name}", out_features, in_features))

    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            projection(f"{p}self_attn.", name)
            if cfg.attention_bias and name != "o_proj":
                out[f"{p}self_attn.{name}.bias"] = (proj[name][0],)
        if cfg.qk_norm:
            out[f"{p}self_attn.q_norm.weight"] = (cfg.head_dim,)
            out[f"{p}self_attn.k_norm.weight"] = (cfg.head_dim,)
        for name in ("gate_proj", "up_proj", "down_proj"):
            projection(f"{p}mlp.", name)
        out[f"{p}input_layernorm.weight"] = (h,)
        out[f"{p}post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    return out


# safetensors dtype of each quantized checkpoint tensor kind, by scheme or GPTQ / AWQ layout (scales: any
# float type; g_idx: any integer type, its values are checked)
_QUANT_DTYPES = {"fp8": {".weight": "F8_E4M3"}, "int4": {".weight_packed": "I32", ".weight_zero_point": "I32",
                                                        ".weight_shape": "I64"},
                 "gptq": {".qweight": "I32", ".qzeros": "I32"}, "gptq_v2": {".qweight": "I32", ".qzeros": "I32"},
                 "awq": {".qweight": "I32", ".qzeros": "I32"}}


def _dtype_key(q: quant.QuantConfig) -> str:
    return q.scheme if q.layout == "compressed-tensors" else q.layout


def _quantized_tensor(cfg: ModelConfig, name: str) -> tuple[str, int, int] | None:
    """(kind suffix, out_features, in_features) when ``name`` is a quantized projection's tensor, else None."""
    if cfg.quant is None or not name.startswith("model.layers."):
        return None
    module, _, leaf = name.rpartition(".")
    proj = module.rpartition(".")[2]
    if proj not in quant.PROJECTIONS or leaf == "bias":
        return None
    return ("." + leaf, *cfg.projection_shapes()[proj])


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files holding the weights; raises BatchLLMError (pickle refusal included) if none."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f for f in weight_map.values()):
                raise ValueError("weight_map must map tensor names to file names")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BatchLLMError(f"{index}: unreadable safetensors index ({_why(e)})") from None
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise BatchLLMError(f"{folder}: shard(s) listed in {INDEX_NAME} are missing: {', '.join(missing)}")
        return files
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    if shards:
        return shards
    if any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()):
        raise BatchLLMError(
            f"{folder} holds only pickle checkpoints (*.bin/*.pt/*.pth/*.ckpt); batchllm does not load pickle "
            "because unpickling can run arbitrary code. Convert the weights to safetensors first."
        )
    raise BatchLLMError(f"{folder}: no {SINGLE_NAME} or sharded model-*-of-*.safetensors weights found")


def check_folder(folder: Path) -> None:
    """Raise BatchLLMError unless ``folder`` looks loadable (config.json plus safetensors weights)."""
    if not (folder / "config.json").is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f"; to load a GGUF, pass the file itself (e.g. {folder / ggufs[0]})" if ggufs else ""
        raise BatchLLMError(f"{folder} has no config.json, so it is not a Hugging Face model folder{hint}")
    safetensors_files(folder)


def load_config(folder: Path) -> ModelConfig:
    """ModelConfig from config.json; stop ids from generation_config.json are merged in (as vLLM does)."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise BatchLLMError(f"{folder / 'config.json'}: unreadable ({_why(e)})") from None
    if not isinstance(raw, dict):
        raise BatchLLMError(f"{folder / 'config.json'}: expected a JSON object, got {type(raw).__name__}")
    try:
        cfg = ModelConfig.from_hf(raw)
    except KeyError as e:
        raise BatchLLMError(f"{folder / 'config.json'}: config lacks the key {e}") from None
    except ValueError as e:
        raise BatchLLMError(f"{folder}: {e}") from e
    except Exception as e:  # noqa: BLE001  (values of the wrong type: TypeError, AttributeError...)
        raise BatchLLMError(f"{folder / 'config.json'}: unsupported or damaged config ({_why(e)})") from None
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        try:
            eos = json.loads(gen_path.read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            eos = None  # generation_config.json is advisory; a broken one must not block loading
        extra = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        extra = [e for e in extra if isinstance(e, int) and not isinstance(e, bool) and 0 <= e < cfg.vocab_size]
        merged = tuple(dict.fromkeys([*cfg.eos_token_ids, *extra]))
        cfg = dataclasses.replace(cfg, eos_token_ids=merged)
    return cfg


def iter_weights(
    folder: Path, cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor on device in dtype), one tensor at a time, file by file.

    A quantized checkpoint's projection tensors keep their stored types, in the layer's layout
    (``quant.to_model_layout``: FP8 / packed int32 weights as stored, scales float32, zero points int8);
    their safetensors dtypes are checked with the shapes, ``weight_shape`` values as they are read. GPTQ
    and AWQ tensors are converted to that layout and renamed (``quant.from_gptq_awq``: ``qweight`` comes
    out as ``weight_packed``...); ``g_idx`` and a symmetric checkpoint's zeros are checked as they are
    read and not yielded.

    Every name of ``weight_names(cfg)`` is yielded exactly once; extra checkpoint entries (rotary inv_freq
    buffers, an lm_head copy in a tied model) are skipped. Missing or mis-shaped tensors raise BatchLLMError
    before anything is loaded (safetensors headers are read without touching the data); so does a file
    that cannot be read (a truncated or damaged safetensors file).
    """
    try:
        yield from _iter_weights(folder, cfg, dtype, device)
    except BatchLLMError:
        raise
    except Exception as e:  # noqa: BLE001  (SafetensorError, OSError, RuntimeError... on a damaged file)
        raise BatchLLMError(f"{folder}: damaged safetensors weights ({_why(e)})") from None


def _iter_weights(folder: Path, cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    shapes = weight_shapes(cfg)
    with ExitStack() as stack:
        handles = [(f, stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))) for f in safetensors_files(folder)]
        plan: list[tuple[object, str, tuple[str, int, int] | None]] = []
        seen: set[str] = set()
        for f, h in handles:
            for name in h.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                if name not in shapes and _quantized_tensor(cfg, name) is not None:
                    # a per-projection tensor the quantized layer would not apply (g_idx, input_scale...)
                    raise BatchLLMError(f"{f.name}: {name} is not part of the quantization batchllm reads from "
                                        "config.json; the checkpoint is not loaded rather than loaded without it")
                if name not in shapes or name in seen:
                    continue
                got = tuple(h.get_slice(name).get_shape())
                qt = _quantized_tensor(cfg, name)
                if got != shapes[name] and not (qt and qt[0] == ".weight_scale" and math.prod(got) == math.prod(shapes[name])):
                    raise BatchLLMError(f"{f.name}: {name} has shape {got}, config.json implies {shapes[name]}")
                want = _QUANT_DTYPES[_dtype_key(cfg.quant)].get(qt[0]) if qt else None
                if want is not None and h.get_slice(name).get_dtype() != want:
                    raise BatchLLMError(f"{f.name}: {name} is {h.get_slice(name).get_dtype()}, its quantization_config "
                                        f"implies {want}")
                seen.add(name)
                plan.append((h, name, qt))
        missing = [n for n in shapes if n not in seen]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise BatchLLMError(f"{folder}: weights missing from the checkpoint: {', '.join(missing[:3])}{more}")
        for h, name, qt in plan:
            if qt is None:
                yield name, h.get_tensor(name).to(device=device, dtype=dtype)
                continue
            tensor = h.get_tensor(name)
            if cfg.quant.layout != "compressed-tensors":
                try:
                    converted = quant.from_gptq_awq(cfg.quant, name, tensor, qt[2])
                except ValueError as e:
                    raise BatchLLMError(f"{folder}: {e}") from None
                if converted is not None:
                    yield converted[0], converted[1].to(device=device)
                continue
            if qt[0] == ".weight_shape" and tensor.tolist() != list(qt[1:]):
                raise BatchLLMError(f"{folder}: {name} is {tensor.tolist()}, config.json implies {list(qt[1:])}")
            yield name, quant.to_model_layout(cfg.quant, name, tensor, qt[1]).to(device=device)


def load_tokenizer(folder: Path):
    """The folder's tokenizer via AutoTokenizer (never trust_remote_code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001  (a damaged tokenizer.json raises the tokenizers library's own errors)
        raise BatchLLMError(f"{folder}: could not load a tokenizer ({_why(e)})") from None


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
