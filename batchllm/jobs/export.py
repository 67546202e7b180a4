"""``batchllm export``: merge a job's committed shards into one file.

Only shards the manifest lists are read (orphans of a killed run never leak into an export). Rows come
in commit order, or with ``ordered`` in input order: by input file (its position in the job's inputs),
``input_index``, then ``sample_index``.

Formats:
- ``parquet``: one Parquet file with the shards' schema (``OUTPUT_SCHEMA``);
- ``jsonl``: one JSON object per output row, same columns;
- ``openai``: the OpenAI Batch API output file, one line per successful request::

      {"id": "batch_req_...", "custom_id": ..., "response": {"status_code": 200, "request_id": "req_...",
       "body": <chat.completion or text_completion object, one choice per sample, with usage>},
       "error": null}

  and, next to it (``<stem>.errors.jsonl`` unless ``errors_to`` is given), the error file, one line per
  failed request: ``{"id", "custom_id", "response": null, "error": {"code", "message"}}``. The body is a
  ``chat.completion`` for requests given as chat messages and a ``text_completion`` otherwise. Token
  log-probabilities, when a request asked for them, name tokens as ``"token_id:<id>"`` (vLLM's
  ``return_tokens_as_token_ids`` convention): the export has no tokenizer to spell them.

Every listed shard is checked in full before anything is written: its size and sha256 must match the
manifest (``batchllm.jobs.integrity``), else ``DamagedJob`` names the damaged shards and the repair. The
export never writes into a job folder: a target inside the job folder (or in any other batchllm job
folder) is refused, so an export can never replace a shard or a manifest.

Files are written to a temporary name and renamed, so an interrupted export never leaves a partial file
under the requested name. The whole result is held in memory (Arrow columns) while exporting. The job
folder may be a path or any pyarrow filesystem URI (``batchllm.io.storage``); so may ``to`` (a URI is
written with one write-once PUT, whole or not at all on an object store).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchllm.errors import BatchLLMError
from batchllm.io.storage import is_uri, open_storage
from batchllm.io.writer import _normalised, _within, is_job_folder, shard_table, storage_of
from batchllm.jobs.integrity import Damage, DamagedJob, damage_message, shard_bytes_problem
from batchllm.jobs.manifest import read_manifest

FORMATS = ("parquet", "jsonl", "openai")
_BATCH_ROWS = 8192


@dataclasses.dataclass
class ExportResult:
    rows: int
    requests: int
    failed: int
    paths: list[str]


def export_job(output_dir: str, fmt: str, to: str, ordered: bool = False, errors_to: str | None = None) -> ExportResult:
    if fmt not in FORMATS:
        raise BatchLLMError(f"unknown export format {fmt!r}: use {', '.join(FORMATS)}")
    manifest = read_manifest(output_dir)
    if manifest is None:
        raise BatchLLMError(f"{output_dir} holds no batchllm job (no manifest.json)")
    errors_to = (errors_to or _errors_path(to)) if fmt == "openai" else None
    for target in (to, errors_to):
        if target is not None:
            _check_target(output_dir, target)
    table = load_table(output_dir, manifest, ordered)
    failed = _count_requests(table.filter(pc.is_valid(table["error_code"])))
    requests = _count_requests(table)
    try:
        if fmt == "parquet":
            _atomic(to, lambda f: pq.write_table(table.drop_columns(["_file_id", "_created"]), f, compression="zstd"))
            return ExportResult(table.num_rows, requests, failed, [to])
        if fmt == "jsonl":
            _atomic(to, lambda f: _write_lines(f, (json.dumps(r, ensure_ascii=False) for r in _rows(table, drop=("_file_id", "_created")))))
            return ExportResult(table.num_rows, requests, failed, [to])
        writer = _OpenAIWriter(manifest)
        _atomic(to, lambda f: _write_lines(f, writer.output_lines(table)))
        _atomic(errors_to, lambda f: _write_lines(f, writer.error_lines(table)))
        return ExportResult(table.num_rows, requests, failed, [to, errors_to])
    except OSError as e:
        raise BatchLLMError(f"cannot write {to}: {e.strerror or e}") from None


def _check_target(output_dir: str, path: str) -> None:
    """Refuse an export target inside the job folder or in another batchllm job folder (it could replace
    a shard or a manifest), and one whose local folder does not exist."""
    refuse = f"cannot export to {path}: it is inside the batchllm job folder"
    if is_uri(path) == is_uri(output_dir) and _within(_normalised(path), _normalised(output_dir)):
        raise BatchLLMError(f"{refuse} {output_dir} (an export never writes over a job's files); choose a path outside it")
    if is_uri(path):
        folder = path.rstrip("/").rpartition("/")[0]
    else:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise BatchLLMError(f"cannot export to {path}: folder {folder} does not exist")
    if is_job_folder(folder):
        raise BatchLLMError(f"{refuse} {folder} (an export never writes over a job's files); choose a path outside it")


def load_table(output_dir: str, manifest: dict[str, Any], ordered: bool) -> pa.Table:
    """The committed rows plus ``_file_id`` (input file position) and ``_created`` (commit time). Every
    shard passes the full integrity check (size and sha256), else ``DamagedJob`` names them all."""
    files = pa.array(manifest.get("input_files") or [], type=pa.string())
    storage = storage_of(output_dir)
    parts = []
    damaged: list[Damage] = []
    for entry in manifest["shards"]:
        try:
            data = storage.read_bytes(entry["file"])
            problem = shard_bytes_problem(entry, data)
            if problem is not None:
                damaged.append(Damage(entry["file"], int(entry.get("rows") or 0), problem))
                continue
            t = shard_table(data)
        except (OSError, pa.ArrowException) as e:
            raise BatchLLMError(f"cannot read {entry['file']} in {output_dir}: {e}") from None
        t = t.append_column("_file_id", pc.index_in(t["input_file"], value_set=files))
        t = t.append_column("_created", pa.array([int(entry.get("committed_at") or manifest.get("created_at") or 0)] * t.num_rows, pa.int64()))
        parts.append(t)
    if damaged:
        raise DamagedJob(damage_message(output_dir, damaged, len(manifest["shards"])))
    if not parts:
        from batchllm.io.writer import OUTPUT_SCHEMA

        empty = OUTPUT_SCHEMA.empty_table()
        return empty.append_column("_file_id", pa.array([], pa.int32())).append_column("_created", pa.array([], pa.int64()))
    table = pa.concat_tables(parts)
    if ordered:
        table = table.sort_by([("_file_id", "ascending"), ("input_index", "ascending"), ("sample_index", "ascending")])
    return table


def _count_requests(table: pa.Table) -> int:
    if table.num_rows == 0:
        return 0
    return table.group_by(["_file_id", "input_index"]).aggregate([]).num_rows


def _rows(table: pa.Table, drop: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    if drop:
        table = table.drop_columns(list(drop))
    for batch in table.to_batches(max_chunksize=_BATCH_ROWS):
        yield from batch.to_pylist()


def _requests(table: pa.Table) -> Iterator[list[dict[str, Any]]]:
    """Rows grouped by request; a request's rows are adjacent in commit order (the writer commits whole
    requests) and in input order (sorted by it)."""
    group: list[dict[str, Any]] = []
    key = None
    for r in _rows(table):
        k = (r["_file_id"], r["input_index"])
        if group and k != key:
            yield group
            group = []
        key = k
        group.append(r)
    if group:
        yield group


class _OpenAIWriter:
    def __init__(self, manifest: dict[str, Any]):
        self.job_id = manifest.get("job_id", "")
        fp = manifest.get("fingerprint") or {}
        self.model = (manifest.get("job") or {}).get("model") or fp.get("model_name") or "batchllm"

    def _ids(self, rows: list[dict[str, Any]]) -> str:
        r = rows[0]
        return hashlib.sha256(f"{self.job_id}|{r['_file_id']}|{r['input_index']}".encode()).hexdigest()[:24]

    def output_lines(self, table: pa.Table) -> Iterator[str]:
        for rows in _requests(table.filter(pc.is_null(table["error_code"]))):
            h = self._ids(rows)
            body = self._body(rows, h)
            yield json.dumps(
                {
                    "id": f"batch_req_{h}",
                    "custom_id": rows[0]["custom_id"],
                    "response": {"status_code": 200, "request_id": f"req_{h}", "body": body},
                    "error": None,
                },
                ensure_ascii=False,
            )

    def error_lines(self, table: pa.Table) -> Iterator[str]:
        for rows in _requests(table.filter(pc.is_valid(table["error_code"]))):
            r = rows[0]
            yield json.dumps(
                {
                    "id": f"batch_req_{self._ids(rows)}",
                    "custom_id": r["custom_id"],
                    "response": None,
                    "error": {"code": r["error_code"], "message": f"{r['error_message']} ({r['input_file']}, row {r['input_index']})"},
                },
                ensure_ascii=False,
            )

    def _body(self, rows: list[dict[str, Any]], h: str) -> dict[str, Any]:
        rows = sorted(rows, key=lambda r: r["sample_index"] or 0)
        chat = rows[0].get("request_type") == "chat"
        prompt = rows[0]["prompt_tokens"] or 0
        completion = sum(r["completion_tokens"] or 0 for r in rows)
        choices = []
        for r in rows:
            if chat:
                choice = {"index": r["sample_index"], "message": {"role": "assistant", "content": r["text"]},
                          "logprobs": _chat_logprobs(r), "finish_reason": r["finish_reason"]}
            else:
                choice = {"index": r["sample_index"], "text": r["text"], "logprobs": _completion_logprobs(r),
                          "finish_reason": r["finish_reason"]}
            choices.append(choice)
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{h}",
            "object": "chat.completion" if chat else "text_completion",
            "created": rows[0]["_created"],
            "model": self.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": max(r["cached_tokens"] or 0 for r in rows)},
            },
            "system_fingerprint": None,
        }


def _tok(t: int) -> str:
    return f"token_id:{t}"


def _chat_logprobs(r: dict[str, Any]) -> dict[str, Any] | None:
    if r.get("logprobs") is None:
        return None
    tops = r.get("top_logprobs") or [[] for _ in r["logprobs"]]
    content = [
        {"token": _tok(t), "logprob": lp, "bytes": None,
         "top_logprobs": [{"token": _tok(a["token_id"]), "logprob": a["logprob"], "bytes": None} for a in alts]}
        for t, lp, alts in zip(r["token_ids"], r["logprobs"], tops)
    ]
    return {"content": content}


def _completion_logprobs(r: dict[str, Any]) -> dict[str, Any] | None:
    if r.get("logprobs") is None:
        return None
    tops = r.get("top_logprobs") or [[] for _ in r["logprobs"]]
    return {
        "tokens": [_tok(t) for t in r["token_ids"][: len(r["logprobs"])]],
        "token_logprobs": list(r["logprobs"]),
        "top_logprobs": [{_tok(a["token_id"]): a["logprob"] for a in alts} for alts in tops],
        "text_offset": None,
    }


def _errors_path(to: str) -> str:
    stem, ext = os.path.splitext(to)
    return f"{stem}.errors{ext or '.jsonl'}"


def _write_lines(f, lines: Iterator[str]) -> None:
    for line in lines:
        f.write(line.encode("utf-8"))
        f.write(b"\n")


def _atomic(path: str, write) -> None:
    if is_uri(path):  # the file's folder as a storage: its write_new is whole-or-nothing there too
        folder, _, name = path.rstrip("/").rpartition("/")
        buf = pa.BufferOutputStream()
        write(buf)
        storage = open_storage(folder)
        storage.ensure_folder()  # an object store has no folders; a mock or local one needs it
        storage.write_new(name, buf.getvalue().to_pybytes())
        return
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
