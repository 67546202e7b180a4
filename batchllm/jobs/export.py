"""``batchllm export``: merge a job's committed shards into one file.

Only shards the manifest lists are read (orphans of a killed run never leak into an export). Rows come
in commit order, or with ``ordered`` in input order: by input file (its position in the job's inputs),
``input_index``, then ``sample_index``.

Formats:
- ``parquet``: one Parquet file with the shards' schema (``OUTPUT_SCHEMA``);
- ``jsonl``: one JSON object per output row, same columns;
- ``openai``: the OpenAI Batch API output file, one line per successful request, in the layout of the
  OpenAI Batch API reference ("The request output object")::

      {"id": "batch_req_...", "custom_id": ..., "response": {"status_code": 200, "request_id": "req_...",
       "body": <chat.completion or text_completion object, one choice per sample, with usage>},
       "error": null}

  and, next to it (``<stem>.errors.jsonl`` unless ``errors_to`` is given), the error file, one line per
  failed request, as OpenAI's error file holds requests that failed without an HTTP response:
  ``{"id", "custom_id", "response": null, "error": {"code", "message"}}`` (``custom_id`` is null for a
  line that could not be parsed). The body is a ``chat.completion`` for requests given as chat messages
  and a ``text_completion`` otherwise.

  ``model`` in a body echoes the request's own ``model`` field when the input file (the OpenAI batch
  file the job read, unchanged since: its identity is checked against the manifest) gives one; else the
  served name (``served_model_name``, or the job spec's ``served_model_name``), else the job's
  ``--model``. ``usage`` carries every field OpenAI's has: ``prompt_tokens``, ``completion_tokens``,
  ``total_tokens``, ``prompt_tokens_details`` (``cached_tokens``: prompt tokens reused from a shared
  prefix for every sample of the request, the smallest count over its samples; ``audio_tokens``: 0) and
  ``completion_tokens_details`` (``reasoning_tokens``, ``audio_tokens``, ``accepted_prediction_tokens``,
  ``rejected_prediction_tokens``: 0, batchllm has no reasoning split, audio or predicted outputs).

  Token log-probabilities (when a request asked for them) spell each token as OpenAI and vLLM do: its
  text and, for chat, ``bytes``, the token's exact UTF-8 bytes (a token holding part of a multi-byte
  character has the bytes of that part; its text is those bytes with ``\\xNN`` escapes). Completions get
  ``text_offset`` too (character offsets into the choice's text, from 0, as vLLM gives them). This needs
  the job's tokenizer, never its weights: ``tokenizer`` if given, else the one of the job's ``--model``
  (``loader.load_tokenizer``), checked against the tokenizer hash in the manifest. When no tokenizer can
  be loaded (the model is gone, or offline) or it is not the job's, tokens fall back to vLLM's
  ``return_tokens_as_token_ids`` spelling ``"token_id:<id>"`` with ``bytes: null`` and
  ``text_offset: null``, and the result's ``warnings`` say so. Prompt log-probabilities (a request's
  ``prompt_logprobs``) come in vLLM's shape: ``choices[i].prompt_logprobs`` for a completion, the body's
  ``prompt_logprobs`` for a chat completion, per prompt token None (the first) or {token id: {logprob,
  rank, decoded_token}} for the prompt's token and the top tokens.

Completeness: ``export_job(..., require_complete=True)`` (what ``batchllm export`` does unless
``--allow-partial``) refuses a job whose status is not ``completed`` (running, interrupted, cancelled,
failed, or with no status file) with ``IncompleteJob``; the result's ``state`` names the job's status
either way.

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

import codecs
import dataclasses
import hashlib
import json
import os
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchllm.errors import BatchLLMError
from batchllm.io.storage import is_uri, open_storage, storage_of
from batchllm.io.writer import (
    DamagedJob,
    _normalised,
    _within,
    is_job_folder,
    read_shard_bytes,
    shard_bytes_problem,
    shard_table,
)
from batchllm.jobs.integrity import Damage, damage_message
from batchllm.jobs.manifest import read_manifest
from batchllm.jobs.results import TokenSpeller

FORMATS = ("parquet", "jsonl", "openai")
_BATCH_ROWS = 8192


class IncompleteJob(BatchLLMError):
    """An export that needs a completed job was asked of one that is not (see ``job_completion``)."""


@dataclasses.dataclass
class ExportResult:
    rows: int
    requests: int
    failed: int
    paths: list[str]
    state: str = "completed"  # the job's status (job_completion)
    warnings: list[str] = dataclasses.field(default_factory=list)


def job_completion(output_dir: str) -> str:
    """The job's status as far as an export cares: ``completed``, or why it is not: ``running`` (a
    process holds the folder), ``cancelled``, ``failed``, ``interrupted`` (no final status: the process
    died) or ``unknown`` (no status file)."""
    from batchllm.jobs.status import read_status

    if storage_of(output_dir).locked():
        return "running"
    status = read_status(output_dir)
    if status is None:
        return "unknown"
    state = status.get("status") or "unknown"
    return "interrupted" if state == "in_progress" else state


def export_job(output_dir: str, fmt: str, to: str, ordered: bool = False, errors_to: str | None = None, *,
               require_complete: bool = False, tokenizer: Any = None, served_model_name: str | None = None,
               response_role: str = "assistant") -> ExportResult:
    """Write the job's rows to ``to`` in ``fmt`` (see the module docstring).

    ``require_complete``: raise ``IncompleteJob`` (nothing written) unless the job completed.
    ``tokenizer``: the job's tokenizer for OpenAI logprobs (default: loaded from the job's model, tokenizer
    only). ``served_model_name``: the model name OpenAI bodies give a request without its own ``model``.
    ``response_role``: the chat message role of OpenAI chat bodies (vLLM's ``--response-role``).
    """
    if fmt not in FORMATS:
        raise BatchLLMError(f"unknown export format {fmt!r}: use {', '.join(FORMATS)}")
    manifest = read_manifest(output_dir)
    if manifest is None:
        raise BatchLLMError(f"{output_dir} holds no batchllm job (no manifest)")
    state = job_completion(output_dir)
    if require_complete and state != "completed":
        raise IncompleteJob(_incomplete_message(output_dir, state))
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
            return ExportResult(table.num_rows, requests, failed, [to], state)
        if fmt == "jsonl":
            _atomic(to, lambda f: _write_lines(f, (json.dumps(r, ensure_ascii=False) for r in _rows(table, drop=("_file_id", "_created")))))
            return ExportResult(table.num_rows, requests, failed, [to], state)
        writer = _OpenAIWriter(manifest, tokenizer, served_model_name, response_role)
        # the error file first: once the output file is there, so is its error file
        _atomic(errors_to, lambda f: _write_lines(f, writer.error_lines(table)))
        _atomic(to, lambda f: _write_lines(f, writer.output_lines(table)))
        return ExportResult(table.num_rows, requests, failed, [to, errors_to], state, writer.warnings)
    except OSError as e:
        raise BatchLLMError(f"cannot write {to}: {e.strerror or e}") from None


def _incomplete_message(output_dir: str, state: str) -> str:
    why = {
        "running": "is still running",
        "cancelled": "was cancelled before it finished",
        "failed": "failed before it finished",
        "interrupted": "stopped before it finished (its process died)",
        "unknown": "has no status file, so it is not known to be complete",
    }.get(state, f"has status {state!r}")
    hint = "wait for it to finish" if state == "running" else f"finish it with: batchllm resume {output_dir}"
    return f"the job in {output_dir} {why}: {hint}, or pass --allow-partial to export the requests committed so far"


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
            data = read_shard_bytes(storage, entry["file"])  # a listed shard may still be under its pending name
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
    def __init__(self, manifest: dict[str, Any], tokenizer: Any = None, served_model_name: str | None = None,
                 response_role: str = "assistant"):
        self.manifest = manifest
        self.job_id = manifest.get("job_id", "")
        job = manifest.get("job") or {}
        fp = manifest.get("fingerprint") or {}
        self.model = served_model_name or job.get("served_model_name") or job.get("model") or fp.get("model_name") or "batchllm"
        self.role = response_role
        self.warnings: list[str] = []
        self._speller: TokenSpeller | None = TokenSpeller(tokenizer) if tokenizer is not None else None
        self._speller_tried = tokenizer is not None
        self._models: dict[int, dict[int, str]] | None = None

    def _ids(self, rows: list[dict[str, Any]]) -> str:
        r = rows[0]
        return hashlib.sha256(f"{self.job_id}|{r['_file_id']}|{r['input_index']}".encode()).hexdigest()[:24]

    def _model_of(self, r: dict[str, Any]) -> str:
        if self._models is None:
            self._models = request_models(self.manifest, self.warnings)
        fid = r["_file_id"]
        return self._models.get(fid, {}).get(r["input_index"]) if fid is not None and fid in self._models else None

    def speller(self) -> "TokenSpeller | None":
        if not self._speller_tried:
            self._speller_tried = True
            self._speller = _job_speller(self.manifest, self.warnings)
        return self._speller

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
        speller = self.speller() if any(r.get("logprobs") is not None or r.get("prompt_logprobs") is not None
                                        for r in rows) else None
        choices = []
        for r in rows:
            if chat:
                choice = {"index": r["sample_index"], "message": {"role": self.role, "content": r["text"], "refusal": None},
                          "logprobs": _chat_logprobs(r, speller), "finish_reason": r["finish_reason"]}
            else:
                choice = {"index": r["sample_index"], "text": r["text"], "logprobs": _completion_logprobs(r, speller),
                          "finish_reason": r["finish_reason"]}
                if r.get("prompt_logprobs") is not None:  # vLLM: per choice of a completion
                    choice["prompt_logprobs"] = _prompt_logprobs(r, speller)
            choices.append(choice)
        extra = {}
        if chat and rows[0].get("prompt_logprobs") is not None:  # vLLM: once per chat completion
            extra["prompt_logprobs"] = _prompt_logprobs(rows[0], speller)
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{h}",
            "object": "chat.completion" if chat else "text_completion",
            "created": rows[0]["_created"],
            "model": self._model_of(rows[0]) or self.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                # reused for every sample: a request's prompt is counted once, so is its reuse
                "prompt_tokens_details": {"cached_tokens": min(r["cached_tokens"] or 0 for r in rows), "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0,
                                              "rejected_prediction_tokens": 0},
            },
            "system_fingerprint": None,
            **extra,
        }


def request_models(manifest: dict[str, Any], warnings: list[str] | None = None) -> dict[int, dict[int, str]]:
    """{input position: {line index: the request's ``model``}} for the job's OpenAI batch input files.

    A file is read only while it is the one the job read (its identity matches the manifest's
    fingerprint); a moved, changed or unreadable file is left out, with a line in ``warnings``."""
    from batchllm.io import readers

    identity = readers.input_identity  # how the pipeline fingerprints inputs (--split included)
    split = (manifest.get("job") or {}).get("split")
    files = manifest.get("input_files") or []
    identities = (manifest.get("fingerprint") or {}).get("inputs") or []
    out: dict[int, dict[int, str]] = {}
    for fid, path in enumerate(files):
        try:
            if is_uri(path) or not os.path.isfile(path):
                raise OSError("not a local file here")
            if readers.detect_format(path) != "openai":
                continue  # native rows: no request carries a model name
            if fid < len(identities) and identity(path, split) != identities[fid]:
                raise OSError("changed since the job read it")
            names: dict[str, str] = {}  # one string object per distinct name
            out[fid] = {index: names.setdefault(model, model) for index, model in body_models(path)}
        except (OSError, BatchLLMError) as e:
            if warnings is not None:
                reason = getattr(e, "strerror", None) or str(e)
                warnings.append(f"cannot read the requests' model names from {path} ({reason}): bodies name the served model")
    return out


def body_models(path: str) -> Iterator[tuple[int, str]]:
    """(line index, ``body.model``) for each line of a local OpenAI batch file whose body names a model;
    lines that do not parse are skipped (the job reports them). Raises OSError."""
    with open(path, "rb") as f:
        for index, raw in enumerate(f):
            if b'"model"' not in raw:
                continue
            try:
                body = json.loads(raw).get("body")
            except (ValueError, AttributeError):
                continue
            model = body.get("model") if isinstance(body, dict) else None
            if isinstance(model, str) and model:
                yield index, model


def _job_speller(manifest: dict[str, Any], warnings: list[str]) -> TokenSpeller | None:
    """The speller of the job's own tokenizer (never its weights), or None with a warning."""
    from batchllm.jobs.manifest import tokenizer_hash
    from batchllm.models import loader

    job = manifest.get("job") or {}
    spec = job.get("model")
    fallback = 'token log-probabilities name tokens as "token_id:<id>" with bytes: null'
    try:
        src = loader.resolve_model(spec)
        overrides = {k: job[k] for k in ("tokenizer", "chat_template") if job.get(k)}  # the job's --tokenizer
        tok = loader.load_tokenizer(src, overrides.get("tokenizer"), overrides.get("chat_template")) if overrides else loader.load_tokenizer(src)
    except Exception as e:  # noqa: BLE001  (no tokenizer, for whatever reason: the id spelling still exports)
        warnings.append(f"cannot load the tokenizer of {spec or 'the default model'} ({_one_line(e)}): {fallback}")
        return None
    expected = (manifest.get("fingerprint") or {}).get("tokenizer")
    if expected and tokenizer_hash(tok) != expected:
        warnings.append(f"the tokenizer of {spec} is not the one the job ran with: {fallback}")
        return None
    return TokenSpeller(tok)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _tok(t: int) -> str:
    return f"token_id:{t}"


def _chat_logprobs(r: dict[str, Any], speller: TokenSpeller | None = None) -> dict[str, Any] | None:
    if r.get("logprobs") is None:
        return None
    tops = r.get("top_logprobs") or [[] for _ in r["logprobs"]]

    def entry(t: int, lp: float) -> dict[str, Any]:
        if speller is None:
            return {"token": _tok(t), "logprob": lp, "bytes": None}
        text, raw = speller.spell(t)
        return {"token": text, "logprob": lp, "bytes": list(raw)}

    content = [
        {**entry(t, lp), "top_logprobs": [entry(a["token_id"], a["logprob"]) for a in alts]}
        for t, lp, alts in zip(r["token_ids"], r["logprobs"], tops)
    ]
    return {"content": content, "refusal": None}


def _completion_logprobs(r: dict[str, Any], speller: TokenSpeller | None = None) -> dict[str, Any] | None:
    if r.get("logprobs") is None:
        return None
    tops = r.get("top_logprobs") or [[] for _ in r["logprobs"]]
    ids = r["token_ids"][: len(r["logprobs"])]
    if speller is None:
        return {
            "tokens": [_tok(t) for t in ids],
            "token_logprobs": list(r["logprobs"]),
            "top_logprobs": [{_tok(a["token_id"]): a["logprob"] for a in alts} for alts in tops],
            "text_offset": None,
        }
    offsets, decoder, chars = [], codecs.getincrementaldecoder("utf-8")("replace"), 0
    for t in ids:
        offsets.append(chars)
        chars += len(decoder.decode(speller.spell(t)[1]))
    return {
        "tokens": [speller.spell(t)[0] for t in ids],
        "token_logprobs": list(r["logprobs"]),
        "top_logprobs": [{speller.spell(a["token_id"])[0]: a["logprob"] for a in alts} for alts in tops],
        "text_offset": offsets,
    }


def _prompt_logprobs(r: dict[str, Any], speller: TokenSpeller | None) -> list[dict[str, Any] | None]:
    """A row's ``prompt_logprobs`` in vLLM's response shape: per prompt token, None for the first, else
    {token id as text: {"logprob", "rank", "decoded_token"}} for the prompt's token and the top tokens
    (ranks 1..k)."""
    def spell(t: int) -> str:
        return speller.spell(t)[0] if speller is not None else _tok(t)

    out: list[dict[str, Any] | None] = []
    for e in r["prompt_logprobs"]:
        if e is None:
            out.append(None)
            continue
        d = {str(a["token_id"]): {"logprob": a["logprob"], "rank": k, "decoded_token": spell(a["token_id"])}
             for k, a in enumerate(e["top_logprobs"] or [], start=1)}
        d[str(e["token_id"])] = {"logprob": e["logprob"], "rank": e["rank"], "decoded_token": spell(e["token_id"])}
        out.append(d)
    return out


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
