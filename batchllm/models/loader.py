"""Public model-loading API: resolve ``--model``, then read its config, weights and tokenizer.

Sources: a Hugging Face folder (config.json + safetensors), a llama.cpp ``.gguf`` file, a ``dummy:``
preset (random weights, real shapes), or the built-in default SmolLM2-135M-Instruct GGUF. Whatever the
source, weights come out under Hugging Face parameter names (see ``expected_weight_names``).

Safety: nothing here unpickles (pickle checkpoints are refused) or runs model-supplied code
(``trust_remote_code`` is never enabled).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from batchllm.errors import BatchLLMError
from batchllm.models import default_model, dummy, dummy_tokenizer, gguf_file, hf_folder
from batchllm.models.config import ModelConfig

DEFAULT_SPECS = ("default", "smollm2")
DUMMY_PREFIX = "dummy:"


@dataclass(frozen=True)
class ModelSource:
    """What ``--model`` resolved to."""

    kind: str  # "hf" | "gguf" | "dummy"
    path: str | None  # the HF folder or .gguf file; None for dummy
    preset: str | None  # dummy preset name
    display_name: str
    seed: int = 0  # dummy weights' seed (``dummy:NAME@SEED``)


def expected_weight_names(cfg: ModelConfig) -> list[str]:
    """HF parameter names ``iter_weights`` yields for ``cfg`` (lm_head.weight only when untied)."""
    return hf_folder.weight_names(cfg)


def resolve_model(spec: str | None) -> ModelSource:
    """Resolve a ``--model`` value; BatchLLMError with a one-line reason if it cannot be used.

    None / "default" / "smollm2": the built-in default GGUF (fetched once if not installed).
    "dummy:NAME" or "dummy:NAME@SEED": a preset of ``dummy.PRESETS``.
    A folder with config.json and safetensors: "hf". A ``*.gguf`` file: "gguf".
    """
    if spec is None or spec.strip().lower() in DEFAULT_SPECS:
        path = default_model.locate_default_gguf()
        return ModelSource("gguf", path, None, default_model.DEFAULT_DISPLAY_NAME)
    if spec.startswith(DUMMY_PREFIX):
        name, _, seed_text = spec[len(DUMMY_PREFIX):].partition("@")
        try:
            dummy.preset_config(name)
        except ValueError as e:
            raise BatchLLMError(str(e)) from None
        try:
            seed = int(seed_text) if seed_text else 0
        except ValueError:
            raise BatchLLMError(f"bad dummy seed in {spec!r}: expected dummy:NAME@INTEGER") from None
        return ModelSource("dummy", None, name, f"dummy:{name} (random weights, seed {seed})", seed)
    p = Path(spec).expanduser()
    if not p.exists():
        raise BatchLLMError(
            f"model path {spec!r} does not exist (expected a Hugging Face folder, a .gguf file, "
            f"'dummy:PRESET' or 'default')"
        )
    if p.is_dir():
        hf_folder.check_folder(p)
        return ModelSource("hf", str(p.resolve()), None, p.resolve().name)
    if p.suffix.lower() == ".gguf":
        return ModelSource("gguf", str(p.resolve()), None, p.name)
    if p.suffix.lower() in hf_folder.PICKLE_SUFFIXES:
        raise BatchLLMError(f"{spec}: pickle checkpoints are not loaded (unpickling can run arbitrary code)")
    raise BatchLLMError(f"{spec} is neither a model folder nor a .gguf file")


def load_config(src: ModelSource) -> ModelConfig:
    """The model's ModelConfig."""
    if src.kind == "hf":
        return hf_folder.load_config(Path(src.path))
    if src.kind == "gguf":
        return gguf_file.load_config(Path(src.path))
    if src.kind == "dummy":
        return dummy.preset_config(src.preset)
    raise ValueError(f"unknown model source kind {src.kind!r}")


def iter_weights(
    src: ModelSource, cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor in ``dtype`` on ``device``) for every parameter, one tensor at a time.

    Each name of ``expected_weight_names(cfg)`` comes exactly once (order depends on the source). Only
    the tensor being yielded is held, so peak memory is about the model's size in ``dtype``, plus one
    tensor's float32 copy for GGUF (dequantization happens in float32).
    """
    if src.kind == "hf":
        return hf_folder.iter_weights(Path(src.path), cfg, dtype, device)
    if src.kind == "gguf":
        return gguf_file.iter_weights(Path(src.path), cfg, dtype, device)
    if src.kind == "dummy":
        return dummy.iter_weights(cfg, src.seed, dtype, device)
    raise ValueError(f"unknown model source kind {src.kind!r}")


def load_tokenizer(src: ModelSource):
    """The model's tokenizer (a transformers PreTrainedTokenizerBase).

    Dummy models get a byte-level tokenizer built in code for their vocabulary (``dummy_tokenizer``):
    no file, no download.
    """
    if src.kind == "hf":
        return hf_folder.load_tokenizer(Path(src.path))
    if src.kind == "gguf":
        return gguf_file.load_tokenizer(Path(src.path), weights_fingerprint(src), default_model.cache_dir())
    if src.kind == "dummy":
        return dummy_tokenizer.build_tokenizer(dummy.preset_config(src.preset))
    raise ValueError(f"unknown model source kind {src.kind!r}")


def _weight_files(src: ModelSource) -> list[Path]:
    if src.kind == "gguf":
        return [Path(src.path)]
    folder = Path(src.path)
    files = [folder / "config.json", *hf_folder.safetensors_files(folder)]
    if (folder / hf_folder.INDEX_NAME).is_file():
        files.append(folder / hf_folder.INDEX_NAME)
    return files


def weights_fingerprint(src: ModelSource) -> str:
    """A cheap identity of the weights (hex sha256), used to refuse resuming a job into other weights.

    Files: (name, size, mtime_ns) of the config and weight files, not their contents (hashing GBs would
    take minutes), so a touched-but-identical file counts as different. Dummy: preset name and seed.
    """
    h = hashlib.sha256(src.kind.encode())
    if src.kind == "dummy":
        h.update(f"|{src.preset}|{src.seed}".encode())
        return h.hexdigest()
    for f in _weight_files(src):
        st = os.stat(f)
        h.update(f"|{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()
