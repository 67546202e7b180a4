"""Public model-loading API: resolve ``--model``, then read its config, weights and tokenizer.

Sources: a Hugging Face folder (config.json + safetensors), a hub repo id (``org/name``) found in the
local Hugging Face cache or downloaded into it (``hub_snapshot``), a llama.cpp ``.gguf`` file, a
``dummy:`` preset (random weights, real shapes), or the built-in default SmolLM2-135M-Instruct GGUF.
Whatever the source, weights come out under Hugging Face parameter names (see ``expected_weight_names``).
``load_tokenizer`` takes the job's ``--tokenizer`` (another folder or repo id) and ``--chat-template``
(a Jinja file or template text) overrides.

Safety: nothing here unpickles (pickle checkpoints are refused) or runs model-supplied code
(``trust_remote_code`` is never enabled).
"""

from __future__ import annotations

import copy
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
    A folder with config.json and safetensors: "hf". A ``*.gguf`` file: "gguf". A repo id (``org/name``)
    that is no local path: "hf", the snapshot folder of the local Hugging Face cache (``hub_snapshot``).
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
    if not p.exists() and _is_repo_id(spec):
        folder = hub_snapshot(spec, "model")
        hf_folder.check_folder(folder)
        return ModelSource("hf", str(folder), None, spec)
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

    A quantized HF folder (``cfg.quant``) yields its projections' quantized tensors instead, in the
    types the quantized layers keep (``hf_folder.iter_weights``).

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


def load_tokenizer(src: ModelSource, tokenizer: str | None = None, chat_template: str | None = None):
    """The model's tokenizer (a transformers PreTrainedTokenizerBase), or the job's overrides.

    Dummy models get a byte-level tokenizer built in code for their vocabulary (``dummy_tokenizer``):
    no file, no download. ``tokenizer``: another tokenizer, a folder or a repo id (``hub_snapshot``).
    ``chat_template``: a Jinja file or template text that replaces the tokenizer's chat template (on a
    copy: cached tokenizers are never changed).
    """
    tok = _tokenizer_override(tokenizer) if tokenizer is not None else _model_tokenizer(src)
    if chat_template is not None:
        tok = copy.copy(tok)
        tok.chat_template = read_chat_template(chat_template)
    return tok


def _tokenizer_override(spec: str):
    p = Path(spec).expanduser()
    if p.is_dir():
        return hf_folder.load_tokenizer(p)
    if p.exists():
        raise BatchLLMError(f"tokenizer {spec}: expected a folder holding a tokenizer (tokenizer.json, "
                            "tokenizer_config.json) or a Hugging Face repo id")
    if not _is_repo_id(spec):
        raise BatchLLMError(f"tokenizer {spec!r} does not exist (expected a folder holding a tokenizer or a Hugging Face "
                            "repo id)")
    return hf_folder.load_tokenizer(hub_snapshot(spec, "tokenizer"))


def read_chat_template(spec: str) -> str:
    """The chat template ``spec`` names: a file's text, or ``spec`` itself when it is template text
    (holds ``{{`` or ``{%``); checked to parse as Jinja. BatchLLMError otherwise, in one line."""
    path = Path(spec).expanduser()
    if "{{" in spec or "{%" in spec:
        text = spec
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise BatchLLMError(f"chat template {spec!r}: no such file, and not template text (no {{{{ }}}} or "
                                "{% %})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise BatchLLMError(f"cannot read chat template {spec}: {getattr(e, 'strerror', None) or e}") from None
    try:  # compiled as transformers compiles it (its extensions and tags), so a template it runs passes
        import jinja2
        from transformers.utils.chat_template_utils import _compile_jinja_template

        _compile_jinja_template(text)
    except ImportError:  # pragma: no cover (another transformers layout: checked on first use instead)
        pass
    except jinja2.TemplateError as e:
        shown = spec if len(spec) <= 60 else spec[:57] + "..."
        raise BatchLLMError(f"chat template {shown!r}: not a valid Jinja template ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return text


def _model_tokenizer(src: ModelSource):
    if src.kind == "hf":
        return hf_folder.load_tokenizer(Path(src.path))
    if src.kind == "gguf":
        return gguf_file.load_tokenizer(Path(src.path), weights_fingerprint(src), default_model.cache_dir())
    if src.kind == "dummy":
        return dummy_tokenizer.build_tokenizer(dummy.preset_config(src.preset))
    raise ValueError(f"unknown model source kind {src.kind!r}")


# ------------------------------------------------------------------------------ Hugging Face hub cache

# What a hub download fetches: config, safetensors, tokenizer files and templates (never pickles).
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
_MODEL_SUFFIXES = (".gguf", ".safetensors", *hf_folder.PICKLE_SUFFIXES)


def _is_repo_id(spec: str) -> bool:
    from batchllm.io.readers import looks_like_repo_id

    return looks_like_repo_id(spec) and not spec.lower().endswith(_MODEL_SUFFIXES) and not spec.startswith(".")


def hf_cache_dir() -> str:
    """The Hugging Face hub cache folder, read from the environment now (``HF_HUB_CACHE``, then
    ``HF_HOME``/hub), as huggingface_hub reads it at import."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return os.path.expanduser(env)
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hf_offline() -> bool:
    """Whether the user asked huggingface_hub to stay offline (``HF_HUB_OFFLINE``, now or at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_snapshot(repo_id: str, what: str = "model") -> Path:
    """The local snapshot folder of hub repo ``repo_id``: from the local cache
    (``snapshot_download(local_files_only=True)``), else downloaded into it unless ``HF_HUB_OFFLINE``
    is set. One-line BatchLLMError naming the cache folder and the offline state when neither works."""
    from huggingface_hub import snapshot_download

    cache = hf_cache_dir()
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except Exception:  # noqa: BLE001  (LocalEntryNotFoundError and friends: not cached)
        pass
    where = f"looked in the Hugging Face cache {cache}"
    if hf_offline():
        raise BatchLLMError(f"{what} {repo_id!r} is no local path and is not in the local Hugging Face cache ({where}; "
                            f"HF_HUB_OFFLINE=1): download it where the network is available "
                            f"(huggingface-cli download {repo_id}) or give a local folder") from None
    from batchllm.io.readers import quiet_hub_logs

    try:
        with quiet_hub_logs():  # no retry warnings before the one error line
            return Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001  (network, auth, unknown repo: all mean "cannot download")
        text = str(e).strip().splitlines()
        reason = f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
        raise BatchLLMError(f"{what} {repo_id!r} is no local path, is not in the local Hugging Face cache and could not "
                            f"be downloaded ({reason}; {where}; HF_HUB_OFFLINE=0)") from None


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
