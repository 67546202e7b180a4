"""Loading a llama.cpp GGUF file: config from its metadata, weights dequantized to HF layout, tokenizer.

Supported GGUF architectures: ``llama`` (Llama 2/3.x, SmolLM2, and Mistral, which llama.cpp converts as
llama), ``qwen2`` and ``qwen3``. Any tensor type gguf-py can dequantize works (F32, F16, BF16, Q4_0/1,
Q5_0/1, Q8_0, K-quants, ...); weights come out dequantized, i.e. batchllm runs them unquantized.

Two llama.cpp conversions are undone here:
- For ``llama``, the converter permutes the rows of attn_q / attn_k from HF's half-split RoPE layout
  (rotate_half) to GGML's interleaved-pairs layout; ``unpermute_rows`` restores HF's order.
  Qwen2/Qwen3 are converted without that permutation.
- Llama-3.x "llama3" RoPE scaling is not stored as metadata but as a ``rope_freqs.weight`` tensor of
  per-frequency divisors; ``_llama3_scaling`` recovers HF's rope_scaling dict from it.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchllm.errors import BatchLLMError
from batchllm.models.config import ModelConfig
from batchllm.models.hf_folder import weight_shapes

# GGUF architecture -> ModelConfig.model_type, and whether q/k rows were permuted by the converter.
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Consumed into the config rather than yielded as a weight.
_CONFIG_TENSORS = {"rope_freqs.weight"}


def hf_name(gguf_name: str) -> str | None:
    """HF parameter name for a GGUF tensor name, or None if it has no HF counterpart here."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Invert llama.cpp's q/k row permutation (weights or biases, rows = n_heads * head_dim).

    The converter maps each head's rows [first half | second half] (HF rotate_half pairs i and i+d/2)
    to interleaved pairs (2i, 2i+1): reshape(n, 2, d/2).swapaxes(1, 2). This applies the inverse.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@functools.lru_cache(maxsize=2)
def _reader_cached(path: str, size: int, mtime_ns: int):
    import gguf

    return gguf.GGUFReader(path)


def _reader(path: Path):
    # Parsing the header (incl. the token list) takes seconds; config, weights and tokenizer share one reader.
    # The file's size and mtime are part of the key so a replaced file is re-read.
    try:
        st = os.stat(path)
        return _reader_cached(str(path), st.st_size, st.st_mtime_ns)
    except ImportError:
        raise BatchLLMError("loading a .gguf model needs the 'gguf' package: pip install gguf") from None
    except Exception as e:  # noqa: BLE001  (gguf-py raises struct.error, IndexError, TypeError... on damaged files)
        raise BatchLLMError(f"{path}: not a readable GGUF file ({_why(e)})") from None


_MISSING = object()


def _meta(reader, key: str, default: Any = _MISSING) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is _MISSING:
            raise BatchLLMError(f"GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def _llama3_scaling(factors: np.ndarray, rope_theta: float, head_dim: int) -> dict[str, Any]:
    """HF llama3 rope_scaling dict that reproduces llama.cpp's ``rope_freqs`` divisors.

    Divisors are 1 for high frequencies, ``factor`` for low ones and 1/((1-s)/factor + s) in between,
    with s = orig_ctx/(wavelen*(high-low)) - low/(high-low). Only those two ratios are identifiable, so
    we try Llama 3.x's (low 1, high 4, orig 8192) and otherwise fit them from the smoothed entries.
    """
    factors = np.asarray(factors, dtype=np.float64)
    factor = float(factors.max())
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq

    def divisors(low: float, high: float, orig: float) -> np.ndarray:
        smooth = (orig / wavelen - low) / (high - low)
        mid = 1.0 / ((1 - smooth) / factor + smooth)
        return np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, mid))

    def as_dict(low: float, high: float, orig: float) -> dict[str, Any]:
        return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                "high_freq_factor": high, "original_max_position_embeddings": int(orig)}

    if len(factors) == len(inv_freq):
        if np.allclose(divisors(1.0, 4.0, 8192.0), factors, rtol=1e-4):
            return as_dict(1.0, 4.0, 8192.0)
        mid = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
        if factor > 1 and mid.sum() >= 2:
            s = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
            a, b = np.polyfit(1 / wavelen[mid], s, 1)  # s = a/wavelen + b
            orig = 8192.0
            width = orig / a  # high - low
            low = -b * width
            if low > 0 and np.allclose(divisors(low, low + width, orig), factors, rtol=1e-3):
                return as_dict(float(low), float(low + width), orig)
    raise BatchLLMError("GGUF rope_freqs tensor does not match llama3 RoPE scaling; this RoPE variant is unsupported")


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def load_config(path: Path) -> ModelConfig:
    """ModelConfig from the GGUF metadata (shapes cross-checked against the tensors); a damaged or
    crafted file is a one-line BatchLLMError, whatever gguf-py or the checks raise."""
    try:
        return _load_config(path)
    except BatchLLMError:
        raise
    except Exception as e:  # noqa: BLE001  (metadata of the wrong type or shape: struct / Type / Index / ZeroDivision errors)
        raise BatchLLMError(f"{path}: damaged or unsupported GGUF metadata ({_why(e)})") from None


def _load_config(path: Path) -> ModelConfig:
    r = _reader(path)
    arch = _meta(r, "general.architecture")
    if arch not in ARCHITECTURES:
        raise BatchLLMError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    model_type, _ = ARCHITECTURES[arch]
    tensors = {t.name: t for t in r.tensors}
    if "token_embd.weight" not in tensors or "blk.0.attn_q.weight" not in tensors:
        raise BatchLLMError(f"{path}: GGUF lacks token_embd / attn_q tensors; not a decoder this loader handles")
    # GGML shapes list the fastest-varying dimension first: token_embd is [hidden, vocab].
    hidden, vocab = (int(x) for x in tensors["token_embd.weight"].shape[:2])
    n_heads = int(_meta(r, f"{arch}.attention.head_count"))
    q_rows = int(tensors["blk.0.attn_q.weight"].shape[1])
    head_dim = int(_meta(r, f"{arch}.attention.key_length", q_rows // n_heads))
    if head_dim * n_heads != q_rows:
        raise BatchLLMError(f"{path}: attn_q has {q_rows} rows, metadata implies {n_heads} heads x {head_dim}")
    rope_theta = float(_meta(r, f"{arch}.rope.freq_base", 10000.0))

    rope_scaling = None
    if "rope_freqs.weight" in tensors:
        rope_scaling = _llama3_scaling(np.array(tensors["rope_freqs.weight"].data), rope_theta, head_dim)
    else:
        stype = _meta(r, f"{arch}.rope.scaling.type", None)
        sfactor = float(_meta(r, f"{arch}.rope.scaling.factor", 1.0))
        if stype == "linear" and sfactor != 1.0:
            rope_scaling = {"rope_type": "linear", "factor": sfactor}
        elif stype not in (None, "none", "linear"):
            raise BatchLLMError(f"{path}: RoPE scaling type {stype!r} is not supported (supported: llama3, linear)")

    # Stop tokens: eos plus the end-of-turn / end-of-message ids llama.cpp also stops on.
    eos = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        v = _meta(r, f"tokenizer.ggml.{key}", None)
        if v is not None and int(v) not in eos:
            eos.append(int(v))
    bos = _meta(r, "tokenizer.ggml.bos_token_id", None)
    try:
        return ModelConfig(
            model_type=model_type,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(_meta(r, f"{arch}.feed_forward_length")),
            num_layers=int(_meta(r, f"{arch}.block_count")),
            num_heads=n_heads,
            num_kv_heads=int(_meta(r, f"{arch}.attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            rms_norm_eps=float(_meta(r, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(_meta(r, f"{arch}.context_length", 4096)),
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias="blk.0.attn_q.bias" in tensors,
            qk_norm=model_type == "qwen3",
            bos_token_id=int(bos) if bos is not None else None,
            eos_token_ids=tuple(eos),
        )
    except (TypeError, ValueError) as e:  # e.g. per-layer head counts (arrays), which this decoder lacks
        raise BatchLLMError(f"{path}: unsupported GGUF metadata ({e})") from e


def _dequantize(t) -> np.ndarray:
    from gguf.quants import dequantize

    shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # numpy (row-major) order
    a = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    # F32 tensors come back as views of the read-only memory map; the caller gets its own memory.
    return a if a.flags.writeable else a.copy()


def iter_weights(
    path: Path, cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, dequantized tensor on device in dtype), one at a time, in file order.

    Names/shapes are checked against ``cfg`` before anything is dequantized; a GGUF tensor with no HF
    counterpart raises BatchLLMError rather than being silently dropped; so does a tensor whose data
    cannot be read (a truncated or damaged file).
    """
    try:
        yield from _iter_weights(path, cfg, dtype, device)
    except BatchLLMError:
        raise
    except Exception as e:  # noqa: BLE001  (gguf-py / numpy on damaged tensor data)
        raise BatchLLMError(f"{path}: damaged GGUF tensor data ({_why(e)})") from None


def _iter_weights(path: Path, cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    r = _reader(path)
    _, permuted = ARCHITECTURES[_meta(r, "general.architecture")]
    shapes = weight_shapes(cfg)
    plan = []
    for t in r.tensors:
        if t.name in _CONFIG_TENSORS:
            continue
        name = hf_name(t.name)
        if name is None or name not in shapes:
            raise BatchLLMError(f"{path}: unexpected GGUF tensor {t.name!r} for a {cfg.model_type} model")
        got = tuple(int(x) for x in reversed(t.shape.tolist()))
        if got != shapes[name]:
            raise BatchLLMError(f"{path}: {t.name} has shape {got}, expected {shapes[name]}")
        plan.append((name, t))
    missing = set(shapes) - {n for n, _ in plan}
    if missing:
        raise BatchLLMError(f"{path}: GGUF lacks tensors for {', '.join(sorted(missing)[:3])}")
    for name, t in plan:
        w = torch.from_numpy(_dequantize(t))
        if permuted and (".q_proj." in name or ".k_proj." in name):
            w = unpermute_rows(w, cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads)
        yield name, w.to(device=device, dtype=dtype)


def load_tokenizer(path: Path, fingerprint: str, cache_root: Path):
    """The GGUF's tokenizer (chat template included), converted by transformers once and cached.

    Conversion reads the whole vocabulary from the GGUF (seconds); the result is saved with
    save_pretrained under ``cache_root/tokenizers/<key>`` and loaded from there afterwards. The key covers
    the file's fingerprint and the transformers version (the conversion may change between versions).
    An unwritable cache only costs the conversion time.
    """
    import transformers
    from transformers import AutoTokenizer

    key = hashlib.sha256(f"{fingerprint}|{transformers.__version__}".encode()).hexdigest()[:24]
    target = cache_root / "tokenizers" / key
    if (target / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(target), trust_remote_code=False)
        except Exception:  # noqa: BLE001  (a damaged cache entry: fall through and convert again)
            pass
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001  (transformers' GGUF conversion raises many types on a damaged file)
        raise BatchLLMError(f"{path}: could not build a tokenizer from the GGUF ({_why(e)})") from None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Save to a private folder then rename, so a concurrent reader never sees a half-written entry.
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
        try:
            tok.save_pretrained(str(tmp))
            os.replace(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # target appeared meanwhile, or the disk is full
    except OSError:
        pass  # unwritable cache
    return tok
