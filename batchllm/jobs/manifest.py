"""The job manifest's identity part: the fingerprint of what changes outputs, and reading it back
(``read_manifest``, the one reader: run, resume, show, export, integrity and ``read_results`` use it).

``.manifest.json`` (written by ``batchllm.io.writer.ShardWriter``, atomically) holds:
- ``job``: the job spec (every JobConfig option), enough for ``batchllm resume DIR`` to rerun it;
- ``job_id``, ``created_at``, ``input_files`` (the inputs, whose positions are the file ids of
  ``batchllm.jobs.completed``);
- ``fingerprint``: ``build_fingerprint``'s components;
- ``shards``: one entry per committed shard (file, rows, sha256, completed/failed counts, tokens,
  errors by code, and the compact record of finished rows).

The name is hidden (a leading ``.``) so that dataset readers (pyarrow, pandas, ``datasets``) pointed at the job
folder skip it; folders written before carry ``manifest.json`` (``LEGACY_MANIFEST``), still read (the
new name wins when both exist) and replaced by the new name at the next write.

A job may continue in a folder only when every fingerprint component is equal; ``fingerprint_changes``
names the ones that differ so the refusal says what changed. Components are compared by value, not by
how they were spelled (a model given by a relative path and by an absolute one is the same model).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

from batchllm.errors import BatchLLMError
from batchllm.io.storage import Storage, storage_of

MANIFEST = ".manifest.json"
LEGACY_MANIFEST = "manifest.json"  # what earlier versions wrote: still read, replaced by MANIFEST at the next write
MANIFEST_VERSION = 2
# How much of each end of an input file goes into its identity: enough to catch an edited or replaced
# file, cheap on a multi-GB input (reading it all would delay every resume by minutes).
_INPUT_PROBE_BYTES = 1 << 20

# Human names of the components, for messages.
_LABELS = {
    "weights": "model weights",
    "tokenizer": "tokenizer",
    "chat_template": "chat template",
    "sampling": "sampling defaults",
    "seed": "seed",
    "columns": "column mapping",
    "max_model_len": "max-model-len",
    "dtype": "dtype",
    "kv_cache_dtype": "KV cache dtype",
    "inputs": "input files",
}


def build_fingerprint(
    *,
    weights: str,
    model_name: str,
    tokenizer: Any,
    sampling: Mapping[str, Any],
    seed: int,
    columns: Mapping[str, Any],
    max_model_len: int | None,
    dtype: str,
    inputs: list[str],
) -> dict[str, Any]:
    """Everything that changes a job's outputs, as JSON-ready values (hashes for the big parts).

    ``weights`` is ``loader.weights_fingerprint``; ``model_name`` is shown in messages only. ``dtype`` is
    the resolved one (float32, bfloat16...): "auto" would hide a CPU-to-GPU switch that changes numerics.
    The device itself is not part of it: a job preempted on one GPU may resume on another.
    """
    fp = {
        "weights": weights,
        "model_name": model_name,
        "tokenizer": tokenizer_hash(tokenizer),
        "chat_template": _sha(getattr(tokenizer, "chat_template", None) or ""),
        "sampling": dict(sampling),
        "seed": seed,
        "columns": dict(columns),
        "max_model_len": max_model_len,
        "dtype": dtype,
        "inputs": [input_identity(p) for p in inputs],
    }
    return json.loads(json.dumps(fp))  # as it reads back from the manifest (tuples become lists)


def fingerprint_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """One phrase per differing component, e.g. ``"seed (0 -> 1)"``; empty when the job is the same."""
    changes = []
    for key, label in _LABELS.items():
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "weights":
            changes.append(f"{label} ({old.get('model_name')} -> {new.get('model_name')})")
        elif key in ("tokenizer", "chat_template"):
            changes.append(label)
        elif key in ("sampling", "columns") and isinstance(a, dict) and isinstance(b, dict):
            diffs = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            changes.append(f"{label} ({', '.join(diffs)})")
        elif key == "inputs" and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            which = [str(i + 1) for i, (x, y) in enumerate(zip(a, b)) if x != y]
            changes.append(f"{label} (content of input {', '.join(which)} differs)")
        else:
            changes.append(f"{label} ({_show(a)} -> {_show(b)})")
    return changes


def check_same_job(manifest: Mapping[str, Any], fingerprint: Mapping[str, Any], output_dir: str) -> None:
    """Raise BatchLLMError naming what changed unless ``fingerprint`` matches the manifest's."""
    changes = fingerprint_changes(manifest.get("fingerprint") or {}, fingerprint)
    if changes:
        raise BatchLLMError(
            f"{output_dir} holds a job with a different configuration: {'; '.join(changes)} changed. "
            "Resuming would mix outputs; use --overwrite to start over or choose another --output folder"
        )


def read_manifest(output_dir: str | Storage) -> dict[str, Any] | None:
    """The folder's manifest (``.manifest.json``, else an earlier version's ``manifest.json``), parsed;
    None when there is neither; BatchLLMError (one line) when it cannot be read or is not a batchllm
    manifest (a JSON object with a ``shards`` list). ``output_dir``: a path, a URI or a ``Storage``."""
    storage = storage_of(output_dir)
    path = storage.display(MANIFEST)
    try:
        data = storage.read_bytes(MANIFEST)
        if data is None:
            path = storage.display(LEGACY_MANIFEST)
            data = storage.read_bytes(LEGACY_MANIFEST)
        if data is None:
            return None
        manifest = json.loads(data)
    except (OSError, ValueError) as e:
        raise BatchLLMError(f"cannot read {path}: {e}; use --overwrite to start the job over") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise BatchLLMError(f"{path} is not a batchllm manifest; use --overwrite to start the job over")
    return manifest


def tokenizer_hash(tok: Any) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, normalizer, special tokens)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    elif tok is None:
        text = ""
    else:  # slow tokenizers: vocabulary and special tokens are what decides the ids
        text = json.dumps([sorted(tok.get_vocab().items()), str(getattr(tok, "special_tokens_map", {}))])
    return _sha(text + "|" + type(tok).__name__)


def input_identity(path: str) -> str:
    """``size:sha256(first MB + last MB)`` of a file; for a folder, of its files' names and sizes."""
    try:
        if os.path.isdir(path):
            h = hashlib.sha256()
            for root, dirs, files in sorted(os.walk(path)):
                dirs.sort()
                for name in sorted(files):
                    p = os.path.join(root, name)
                    h.update(f"{os.path.relpath(p, path)}|{os.path.getsize(p)}\n".encode())
            return "dir:" + h.hexdigest()
        size = os.path.getsize(path)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            h.update(f.read(_INPUT_PROBE_BYTES))
            if size > 2 * _INPUT_PROBE_BYTES:
                f.seek(size - _INPUT_PROBE_BYTES)
            h.update(f.read(_INPUT_PROBE_BYTES))
        return f"{size}:{h.hexdigest()}"
    except OSError as e:
        raise BatchLLMError(f"cannot read {path}: {e.strerror or e}") from None


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _show(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 60 else text[:57] + "..."
