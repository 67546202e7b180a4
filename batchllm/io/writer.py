"""Parquet shard writer: results go out in shards, each committed atomically, listed in a manifest.

A shard is written to ``.shard-NNNNN.parquet.tmp``, flushed and fsynced, then renamed to
``shard-NNNNN.parquet``; the manifest (``manifest.json``) is rewritten the same way after every commit
and lists each committed shard with its row count and sha256. A reader that trusts only the manifest
therefore never sees a half-written shard, whatever instant the process dies at.

Every row has the same schema (``OUTPUT_SCHEMA``): completions fill the result columns, error records
(rows that could not run) fill ``error_code`` / ``error_message`` and leave the result columns null.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("custom_id", pa.string()),
        pa.field("input_file", pa.string()),
        pa.field("input_index", pa.int64()),
        pa.field("sample_index", pa.int32()),
        pa.field("text", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("cached_tokens", pa.int32()),
        pa.field("token_ids", pa.list_(pa.int32())),
        pa.field("logprobs", pa.list_(pa.float32())),
        pa.field("top_logprobs", pa.list_(pa.list_(pa.struct([("token_id", pa.int32()), ("logprob", pa.float32())])))),
        pa.field("error_code", pa.string()),
        pa.field("error_message", pa.string()),
    ]
)

MANIFEST = "manifest.json"


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees either the old file or the whole new one."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    # the rename itself is durable only once the directory entry is flushed
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Buffers result rows and commits them as Parquet shards of ``shard_rows`` rows."""

    def __init__(self, output_dir: str, shard_rows: int = 10_000, job_spec: dict[str, Any] | None = None):
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be at least 1, got {shard_rows}")
        self.output_dir = output_dir
        self.shard_rows = shard_rows
        os.makedirs(output_dir, exist_ok=True)
        self.manifest: dict[str, Any] = {
            "version": 1,
            "created_at": time.time(),
            "job": job_spec or {},
            "shards": [],
        }
        self._buffer: list[dict[str, Any]] = []
        self.rows_written = 0

    def add(self, row: dict[str, Any]) -> None:
        self._buffer.append(row)
        if len(self._buffer) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        """Commit the buffered rows as one shard (no-op when empty), then the manifest."""
        if not self._buffer:
            return
        index = len(self.manifest["shards"])
        name = f"shard-{index:05d}.parquet"
        final = os.path.join(self.output_dir, name)
        tmp = os.path.join(self.output_dir, f".{name}.tmp")
        table = pa.Table.from_pylist(self._buffer, schema=OUTPUT_SCHEMA)
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.output_dir)
        self.manifest["shards"].append({"file": name, "rows": table.num_rows, "sha256": _sha256(final)})
        self.rows_written += table.num_rows
        self._buffer = []
        self.write_manifest()

    def write_manifest(self, **extra: Any) -> None:
        self.manifest.update(extra)
        self.manifest["updated_at"] = time.time()
        data = json.dumps(self.manifest, indent=1, sort_keys=True).encode()
        atomic_write_bytes(os.path.join(self.output_dir, MANIFEST), data)

    def close(self, **summary: Any) -> None:
        self.flush()
        self.write_manifest(**summary)


def read_results(output_dir: str) -> pa.Table:
    """All committed rows of a job folder (shards listed in the manifest), in commit order."""
    with open(os.path.join(output_dir, MANIFEST)) as f:
        manifest = json.load(f)
    tables = [pq.read_table(os.path.join(output_dir, s["file"])) for s in manifest["shards"]]
    if not tables:
        return OUTPUT_SCHEMA.empty_table()
    return pa.concat_tables(tables)
