"""Read prompt files into ``Request`` / ``RowError`` records, one record per input row, streaming.

Formats (``detect_format``):
- ``jsonl`` (``.jsonl``, ``.ndjson``, ``.json`` not starting with ``[``): one native row per line, read
  line by line. Blank lines yield nothing but still count: ``input_index`` is the 0-based line number.
- ``openai``: a JSONL file whose first JSON-object line has ``custom_id``, ``method``, ``url`` and
  ``body`` (the OpenAI Batch API input format); see ``_openai_request`` for how a body maps.
- ``parquet`` (``.parquet``, ``.pq``): native rows, read ``batch_rows`` rows at a time, only the columns
  the reader can use.
- ``hf-disk`` (a ``Dataset.save_to_disk`` folder) and ``hf-file`` (``.csv``, ``.arrow``, ``.json``
  holding one array), through the ``datasets`` package, imported only for these formats.

Where an input comes from (``_locate`` / ``_open``): a local path; a ``file://`` URI (the same local
file); any other pyarrow filesystem URI (``s3://``, ``gs://``, ``abfs://``..., or a scheme registered with
``batchllm.io.storage.register_filesystem``), resolved as output folders are; or a Hugging Face hub
dataset name (``org/name``: a string that is no local file or folder and looks like a repo id), loaded
through ``datasets.load_dataset`` (format ``hub``; offline, only from the local cache). JSONL and OpenAI
files may be compressed (``.jsonl.gz``, ``.jsonl.zst``: pyarrow's codecs, the gzip module or the
``zstandard`` package where pyarrow lacks one); line numbers count decompressed lines. Parquet is read
from any filesystem; datasets files and ``save_to_disk`` folders from local paths only. ``split``
(``--split``) picks one split of a ``DatasetDict`` (a ``save_to_disk`` folder of one, or a hub dataset);
without it a dict with one split uses that split and a dict with several is refused, naming them.

A native row carries:
- ``custom_id`` (column set by ``ColumnMapping.id_column``): a string or an integer. Absent or null: the
  row index as a string with one input file, ``"<file basename>:<row index>"`` with several.
- exactly one of ``prompt`` (raw text sent as it is), ``messages`` (a chat: a list of ``{role,
  content}``) or ``prompt_token_ids`` (a list of non-negative ints). With
  ``ColumnMapping.prompt_template`` the rendered template is the prompt instead, and the prompt and
  messages columns are plain data the template may use.
- sampling fields with vLLM's names (``SamplingParams``), flat on the row and/or nested in a
  ``sampling_params`` object; a nested value overrides the flat one, and both override the job's
  defaults. ``max_new_tokens`` / ``max_completion_tokens`` alias ``max_tokens``. Flat fields share the
  row's namespace, so a data column called e.g. ``n`` is read as a sampling field.
- structured-output fields (``sampling_params.STRUCTURED_FIELDS``: ``response_format``, ``guided_json``...),
  flat (unless the job names the column as data) or in ``sampling_params``; in OpenAI bodies too. A
  conflicting or misshapen one is an ``invalid_parameter`` error, a malformed schema / regex / grammar an
  ``invalid_structured_output`` one, and while the engine does not apply them
  (``sampling_params.structured_refusal``) a row that asks for one is ``unsupported_parameter``.

Null (JSON null, a null Parquet cell, NaN) means "not given" everywhere. Per-row problems become a
``RowError`` (codes in ``batchllm.io.requests``) and the job goes on; problems with a whole input (missing,
unreadable, unknown format, an empty JSONL file, a bad template, a mapped column a file lacks) raise
``BatchLLMError`` before anything from that input is yielded. A ``custom_id`` seen before in the job
(any file) makes that later row a ``DUPLICATE_CUSTOM_ID`` error; the first row keeps its fate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os
import re
import string
from typing import Any, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from batchllm.errors import BatchLLMError
from batchllm.io.requests import (
    AMBIGUOUS_PROMPT,
    DUPLICATE_CUSTOM_ID,
    INVALID_MESSAGES,
    INVALID_PARAMETER,
    INVALID_STRUCTURED_OUTPUT,
    MALFORMED_JSON,
    MISSING_PROMPT,
    PROMPT_TOO_LONG,
    TEMPLATE_ERROR,
    UNSUPPORTED_ENDPOINT,
    UNSUPPORTED_PARAMETER,
    Request,
    RowError,
)
from batchllm.sampling_params import (
    FLAT_UNSUPPORTED,
    MAX_TOKENS_ALIASES,
    NEUTRAL_BODY_FIELDS,
    SAMPLING_FIELD_NAMES,
    STRUCTURED_FIELDS,
    UNSUPPORTED_FIELDS,
    InvalidStructuredOutput,
    SamplingParams,
    structured_refusal,
    unsupported_field,
)

__all__ = ["ColumnMapping", "detect_format", "read_requests", "count_rows", "resolve_keep_columns", "input_identity", "is_hub_dataset_name"]

_SAMPLING_KEYS = frozenset(SAMPLING_FIELD_NAMES) | frozenset(MAX_TOKENS_ALIASES) | frozenset(STRUCTURED_FIELDS)
_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
_CHAT_URL, _COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
_OPENAI_KEYS = ("custom_id", "method", "url", "body")
_JSONL_EXTS = (".jsonl", ".ndjson")
_PARQUET_EXTS = (".parquet", ".pq")
_HF_BUILDERS = {".csv": "csv", ".arrow": "arrow", ".json": "json"}
_SNIPPET_CHARS = 120
# How many non-blank lines to look at for the first parseable object when sniffing an OpenAI batch file.
_SNIFF_LINES = 100
# Compressed JSONL: the suffix after the format's extension -> pyarrow's codec name.
_CODECS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
# A Hugging Face hub repo id ("imdb", "org/name"): what a missing input must look like to be loaded as one.
_HUB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_FILE_EXTS = (*_JSONL_EXTS, ".json", *_PARQUET_EXTS, *_HF_BUILDERS, *_CODECS)


@dataclasses.dataclass(frozen=True)
class ColumnMapping:
    """Where a native row's fields come from. Does not apply to OpenAI batch files (their layout is fixed).

    ``prompt_template`` is a ``str.format`` template over the row's fields (plain ``{name}`` fields
    only, with optional conversion and format spec); its rendering is the row's raw-text prompt. It
    cannot be combined with ``prompt_column`` / ``messages_column``.
    ``chat`` (``--chat``): a native row's raw-text prompt (a template's rendering included) is sent as
    a chat of one user message, through the model's chat template; a native ``prompt_token_ids`` row
    is then an error record (tokens cannot be wrapped). OpenAI batch lines are not changed: their url
    says whether they are chats.
    ``system_prompt`` is prepended as a system message to chat rows (native ``messages``, prompts
    wrapped by ``chat``, OpenAI chat bodies) whose first message is not already a system or developer
    message. It cannot apply to a raw-text or token-id prompt: such a row is an error record, and a
    template without ``chat`` is refused (every row would lose it).
    """

    id_column: str | None = None  # default "custom_id"
    prompt_column: str | None = None  # default "prompt"
    messages_column: str | None = None  # default "messages"
    prompt_template: str | None = None
    system_prompt: str | None = None
    chat: bool = False


class _RowFailure(Exception):
    """Internal: a row cannot run; becomes a ``RowError``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


# ----------------------------------------------------------------------------------------------- public


def detect_format(path: str) -> str:
    """Return ``"jsonl" | "openai" | "parquet" | "hf-disk" | "hf-file" | "hub"`` for ``path`` (a local
    path, a filesystem URI or a hub dataset name; see the module docstring).

    Looks at the extension (under a ``.gz`` / ``.zst`` suffix) and, for JSON files, the first bytes /
    lines. Raises ``BatchLLMError`` for a missing or unreadable path, an unknown extension, a folder that
    is not a ``save_to_disk`` dataset, or a JSONL file with no non-blank line. A hub name is not loaded
    here (``read_requests`` loads it before returning).
    """
    path = os.fspath(path)
    fs, where = _locate(path)
    kind = _file_type(fs, where)
    if kind == "dir":
        if fs is None and any(os.path.exists(os.path.join(where, f)) for f in ("dataset_dict.json", "state.json")):
            return "hf-disk"
        if fs is not None:
            raise BatchLLMError(f"{path} is a folder: give a file (datasets folders are read from local paths only)")
        raise BatchLLMError(f"{path} is a folder but not a datasets save_to_disk folder")
    if kind is None:
        if fs is None and is_hub_dataset_name(path):
            return "hub"
        raise BatchLLMError(f"input not found: {path}")
    ext, codec = _extension(path)
    if codec is not None and ext not in (*_JSONL_EXTS, ".json"):
        raise BatchLLMError(f"{path}: only JSONL files are read compressed (.jsonl.gz, .jsonl.zst); "
                            f"decompress it first")
    if fs is not None and ext in (".csv", ".arrow"):
        raise BatchLLMError(f"{path}: {ext} files are read from local paths only; copy it locally or convert it "
                            "to JSONL or Parquet")
    if ext in _PARQUET_EXTS:
        _check_parquet(path)
        return "parquet"
    if ext in (".csv", ".arrow"):
        return "hf-file"
    if ext in _JSONL_EXTS or ext == ".json":
        _check_utf8(path)
    if ext == ".json" and _first_byte(path) == b"[":
        if fs is not None or codec is not None:
            raise BatchLLMError(f"{path}: a JSON array is read from an uncompressed local file only; use JSONL "
                                "(one object per line) instead")
        return "hf-file"
    if ext in _JSONL_EXTS or ext == ".json":
        return _sniff_jsonl(path)
    raise BatchLLMError(
        f"unknown input format for {path}: expected .jsonl, .ndjson, .json, .parquet, .pq, .csv, .arrow "
        "or a datasets save_to_disk folder"
    )


def read_requests(
    paths: Sequence[str],
    mapping: ColumnMapping = ColumnMapping(),
    defaults: SamplingParams = SamplingParams(),
    batch_rows: int = 4096,
    skip: Sequence[Any] | None = None,
    max_prompt_chars: int | None = None,
    split: str | None = None,
    keep: Mapping[str, bool] | None = None,
) -> Iterator[Request | RowError]:
    """Yield one ``Request`` or ``RowError`` per input row, files in the given order, rows in file order.

    Job-level checks (every path's format, the template, the mapping against OpenAI inputs) run now and
    raise ``BatchLLMError`` before the iterator is returned; per-file checks (mapped columns present)
    raise when that file is reached. ``batch_rows`` bounds the rows converted to Python at a time for
    Parquet and datasets inputs.

    ``skip`` (resume): per path, None or a bool array whose true entries are row indices to pass over
    unread: such a row yields nothing, is not parsed (a JSONL line is not even decoded) and claims no
    ``custom_id``. The caller must know that skipped rows cannot change the others' fate (see
    ``batchllm.jobs.folder``).

    ``max_prompt_chars``: a raw-text prompt (a template's rendering included, checked before it is
    built) longer than this is a ``PROMPT_TOO_LONG`` error (the pipeline passes the most characters the
    model's context can hold, so a huge prompt never reaches the tokenizer).

    ``keep`` (``--keep-columns``, from ``resolve_keep_columns``): column name -> whether its values are
    stored as JSON text (else as read). Every record's ``kept`` then holds the row's value of each (None
    where the row lacks the column, and for a line that is not a JSON object).

    ``split`` (``--split``): the split of every dataset-dict input (``_choose_split``); checked, and hub
    datasets loaded, before the iterator is returned. Given while no input has splits, it is refused.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise BatchLLMError("no input files given")
    if batch_rows < 1:
        raise BatchLLMError(f"batch_rows must be at least 1, got {batch_rows}")
    template_fields = _template_fields(mapping.prompt_template) if mapping.prompt_template is not None else ()
    if mapping.prompt_template is not None and (mapping.prompt_column or mapping.messages_column):
        raise BatchLLMError("a prompt template cannot be combined with a prompt or messages column")
    if mapping.prompt_template is not None and mapping.system_prompt is not None and not mapping.chat:
        raise BatchLLMError("--system-prompt cannot apply to --prompt-template prompts, which are raw text: add --chat "
                            "to send each rendered prompt as a user message after the system message")
    formats = [detect_format(p) for p in paths]
    maps_columns = (mapping.id_column, mapping.prompt_column, mapping.messages_column, mapping.prompt_template)
    if any(x is not None for x in maps_columns) and "openai" in formats:
        raise BatchLLMError("column mapping and prompt templates do not apply to OpenAI batch files")
    if skip is not None and len(skip) != len(paths):
        raise ValueError("skip must have one entry per path")
    _check_splits(paths, formats, split)
    return _generate(paths, formats, mapping, template_fields, defaults, batch_rows, skip, max_prompt_chars, split, keep=dict(keep or {}))


def count_rows(paths: Sequence[str], split: str | None = None) -> int | None:
    """The number of records ``read_requests(paths)`` will yield, or None where that is not cheap.

    Parquet: file metadata; JSONL: a pass counting non-blank lines; save_to_disk folders: the dataset's
    row count; hub datasets: the (cached) dataset's. CSV / Arrow / JSON-array files would need a full
    conversion first: None.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    total = 0
    for path in map(os.fspath, paths):
        fmt = detect_format(path)
        try:
            if fmt == "parquet":
                total += pq.ParquetFile(_parquet_source(path)).metadata.num_rows
            elif fmt in ("jsonl", "openai"):
                with _open(path) as f:
                    total += sum(1 for line in f if line.strip())
            elif fmt in ("hf-disk", "hub"):
                total += _load_dataset(path, fmt, split).num_rows
            else:
                return None
        except _READ_ERRORS as e:
            raise BatchLLMError(f"cannot read {path}: {_one_line(e)}") from e
    return total


# -------------------------------------------------------------------------------------------- driving


def _generate(paths, formats, mapping, template_fields, defaults, batch_rows, skip=None, max_chars=None, split=None, keep=None) -> Iterator[Request | RowError]:
    seen: dict[str, bool] = {}  # custom_id -> whether it was generated (the row index of a row without an id)
    several = len(paths) > 1
    wanted, required = _wanted_columns(mapping, template_fields)
    keep = keep or {}
    wanted |= set(keep)
    # columns the job names as data (mapped, template fields, kept) are never read as unsupported request fields
    data = {mapping.id_column, mapping.prompt_column, mapping.messages_column, *template_fields, *keep}
    flat_checked = tuple(sorted(FLAT_UNSUPPORTED - data))
    flat_data = frozenset(STRUCTURED_FIELDS) & data
    for i, (path, fmt) in enumerate(zip(paths, formats)):
        prefix = os.path.basename(os.path.normpath(path)) + ":" if several else ""
        mask = skip[i] if skip is not None and skip[i] is not None and len(skip[i]) else None
        mask = mask.tolist() if hasattr(mask, "tolist") else mask  # list indexing: the per-row check stays cheap
        if fmt in ("jsonl", "openai"):
            rows = _jsonl_rows(path, mask)
        else:
            if fmt == "parquet":
                rows = _parquet_rows(path, fmt, wanted, required, batch_rows)
            else:
                rows = _dataset_rows(path, fmt, wanted, required, batch_rows, split)
            if mask is not None:
                rows = ((index, row) for index, row in rows if index >= len(mask) or not mask[index])
        for index, row in rows:
            yield _record(path, fmt, index, row, prefix, seen, mapping, template_fields, defaults, max_chars, keep,
                          flat_checked, flat_data)


def _record(path, fmt, index, row, prefix, seen, mapping, template_fields, defaults, max_chars=None, keep=None,
            flat_checked=(), flat_data=frozenset()) -> Request | RowError:
    """Turn one parsed row (or a parse failure) into a record; claims the row's custom_id in ``seen``."""
    if isinstance(row, _RowFailure):
        return RowError(path, index, row.code, row.message, kept=dict.fromkeys(keep) if keep else None)
    kept = {name: _kept_value(row.get(name), as_json) for name, as_json in keep.items()} if keep else None
    id_key = "custom_id" if fmt == "openai" else mapping.id_column or "custom_id"
    null_id = id_key in row and _is_null(row[id_key])
    row = {k: (None if _is_null(v) else v) for k, v in row.items()}
    custom_id = None
    try:
        if null_id and fmt != "openai":
            # a null id is not "no id": defaulting it to the row index could collide with another row's id
            raise _RowFailure(INVALID_PARAMETER, f"{id_key} is null: give this row an id (or leave the column out "
                                                 "of every row to number rows by their index)")
        generated = row.get(id_key) is None
        custom_id = _custom_id(row.get(id_key), None if fmt == "openai" else f"{prefix}{index}")
        if custom_id in seen:
            if generated and not seen[custom_id]:
                why = (f"this row has no {id_key} and its default id {custom_id!r} (the row index) is an earlier row's "
                       f"{id_key}: give every row an id, or none")
            elif not generated and seen[custom_id]:
                why = (f"custom_id {custom_id!r} is also the default id (the row index) of an earlier row that has no "
                       f"{id_key}: give every row an id, or none")
            else:
                why = f"custom_id {custom_id!r} appeared earlier in the job"
            raise _RowFailure(DUPLICATE_CUSTOM_ID, why)
        seen[custom_id] = generated
        if fmt == "openai":
            prompt, fields, unsupported = _openai_request(row)
        else:
            prompt = _native_prompt(row, mapping, template_fields, max_chars)
            fields, unsupported = _native_sampling(row, flat_checked, flat_data)
        if max_chars is not None and len(prompt.get("prompt") or "") > max_chars:
            raise _RowFailure(PROMPT_TOO_LONG, f"prompt has {len(prompt['prompt']):,} characters, more than the "
                                               f"model's context can hold (at most {max_chars:,})")
        prompt = _chat_rules(prompt, mapping, fmt)
        try:
            sampling = SamplingParams.from_fields(fields, defaults) if fields else defaults
        except InvalidStructuredOutput as e:
            raise _RowFailure(INVALID_STRUCTURED_OUTPUT, str(e)) from None
        except ValueError as e:
            raise _RowFailure(INVALID_PARAMETER, str(e)) from None
        found = unsupported_field(unsupported, sampling.n) if unsupported else None
        if found is not None:
            raise _RowFailure(UNSUPPORTED_PARAMETER, found[1])
        refused = structured_refusal(sampling)
        if refused is not None:
            raise _RowFailure(UNSUPPORTED_PARAMETER, refused)
    except _RowFailure as f:
        return RowError(path, index, f.code, f.message, custom_id, kept=kept)
    return Request(custom_id=custom_id, input_file=path, input_index=index, sampling=sampling, kept=kept, **prompt)


def _chat_rules(prompt: dict[str, Any], mapping: ColumnMapping, fmt: str) -> dict[str, Any]:
    """--chat wraps a native raw-text prompt as one user message; --system-prompt goes before a chat's first
    message; a combination that cannot be honoured for this row is a failure, never silently dropped."""
    if mapping.chat and fmt != "openai":
        if "prompt" in prompt:
            prompt = {"messages": [{"role": "user", "content": prompt["prompt"]}]}
        elif "prompt_token_ids" in prompt:
            raise _RowFailure(INVALID_PARAMETER, "--chat cannot wrap prompt_token_ids (they are tokens, not text): give "
                                                 "this row a prompt or messages, or run it without --chat")
    if mapping.system_prompt is None:
        return prompt
    if "messages" in prompt:
        return {"messages": _with_system(prompt["messages"], mapping.system_prompt)}
    if fmt == "openai":
        why = "this /v1/completions line is raw text; --system-prompt applies to /v1/chat/completions lines"
    elif "prompt" in prompt:
        why = "this row's prompt is raw text: add --chat to send prompts as user messages after the system message"
    else:
        why = "this row's prompt_token_ids are tokens, not a chat: give it as messages, or drop --system-prompt"
    raise _RowFailure(INVALID_PARAMETER, f"--system-prompt cannot apply here: {why}")


def _kept_value(value: Any, as_json: bool) -> Any:
    """A kept column's value for the output row: as read, or (JSON-text columns) its JSON text; null stays null."""
    if not as_json:
        return value
    if _is_null(value):
        return None
    return json.dumps(value, ensure_ascii=False, default=str)


# ------------------------------------------------------------------------------------------ row rules


def _custom_id(value: Any, default: str | None) -> str:
    """A row's custom_id: a string, or an integer (an integral float too: CSV id columns with gaps load as
    floats) written in decimal; ``default`` when absent (None: required)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if value is None:
        if default is None:
            raise _RowFailure(INVALID_PARAMETER, "custom_id is required in an OpenAI batch line")
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _RowFailure(INVALID_PARAMETER, f"custom_id must be a string or an integer, got {_short(value)}")
    if value == "":
        raise _RowFailure(INVALID_PARAMETER, "custom_id must not be empty")
    return str(value)


def _native_prompt(row: dict, mapping: ColumnMapping, template_fields: tuple[str, ...], max_chars: int | None = None) -> dict[str, Any]:
    """The Request keyword (prompt / messages / prompt_token_ids) for a native row."""
    if mapping.prompt_template is not None:
        return {"prompt": _check_prompt(_render(mapping.prompt_template, template_fields, row, max_chars))}
    names = {
        "prompt": mapping.prompt_column or "prompt",
        "messages": mapping.messages_column or "messages",
        "prompt_token_ids": "prompt_token_ids",
    }
    given = [kind for kind, column in names.items() if row.get(column) is not None]
    if not given:
        raise _RowFailure(MISSING_PROMPT, "row has none of " + ", ".join(repr(c) for c in names.values()))
    if len(given) > 1:
        both = " and ".join(repr(names[k]) for k in given)
        raise _RowFailure(AMBIGUOUS_PROMPT, f"row has both {both}; give exactly one")
    kind = given[0]
    value = row[names[kind]]
    if kind == "prompt":
        return {"prompt": _check_prompt(value)}
    if kind == "messages":
        return {"messages": _check_messages(value)}
    return {"prompt_token_ids": _check_token_ids(value)}


def _native_sampling(row: dict, flat_checked: Sequence[str] = (),
                     flat_data: frozenset[str] = frozenset()) -> tuple[dict[str, Any], dict[str, Any]]:
    """(sampling fields, request fields batchllm does not implement) of a native row: flat fields, overridden
    by those nested in ``sampling_params``. Of the flat fields only ``flat_checked`` names count as request
    fields batchllm lacks (the others share the row with data); in ``sampling_params`` every one does.
    ``flat_data``: structured-output field names the job uses as data columns, not read as requests."""
    fields = _sampling_subset(row)
    for name in flat_data:
        fields.pop(name, None)
    unsupported = {k: row[k] for k in flat_checked if not _is_null(row.get(k))}
    nested = row.get("sampling_params")
    if nested is not None:
        if not isinstance(nested, dict):
            raise _RowFailure(INVALID_PARAMETER, f"sampling_params must be an object, got {_short(nested)}")
        # Strict here (unlike flat fields, which share the row with data): a typo must not pass silently.
        unknown = sorted(k for k, v in nested.items()
                         if k not in _SAMPLING_KEYS and k not in UNSUPPORTED_FIELDS and not _is_null(v))
        if unknown:
            raise _RowFailure(INVALID_PARAMETER, f"unknown sampling parameter {unknown[0]!r} in sampling_params")
        fields.update(_sampling_subset(nested))
        unsupported.update({k: v for k, v in nested.items() if k in UNSUPPORTED_FIELDS and not _is_null(v)})
    return fields, unsupported


def _sampling_subset(source: dict) -> dict[str, Any]:
    """The non-null sampling fields of ``source``, aliases folded into ``max_tokens``."""
    fields = {k: v for k, v in source.items() if k in _SAMPLING_KEYS and not _is_null(v)}
    for alias in MAX_TOKENS_ALIASES:
        value = fields.pop(alias, None)
        if value is not None:
            fields.setdefault("max_tokens", value)
    return fields


def _openai_request(line: dict) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(Request keyword, sampling fields, request fields batchllm does not implement) for one OpenAI Batch
    API line.

    chat (``/v1/chat/completions``): ``body.messages``; ``logprobs: true`` with ``top_logprobs: k`` means
    ``logprobs=k`` (alone: 0, the sampled token only). completions (``/v1/completions``): ``body.prompt``,
    a string or a list of token ids; ``logprobs`` is an int. Any vLLM sampling name in the body applies
    (OpenAI's own names are a subset). ``NEUTRAL_BODY_FIELDS`` (``model``, ``user``, ``metadata``...)
    change nothing and are accepted (the job's model runs). Any other non-null body field is an
    ``unsupported_parameter`` failure: one batchllm does not implement (``UNSUPPORTED_FIELDS``; returned
    for the caller to check, as its neutral value is accepted), or one neither OpenAI nor vLLM defines.
    """
    missing = [k for k in ("method", "url", "body") if line.get(k) is None]
    if missing:
        raise _RowFailure(INVALID_PARAMETER, "OpenAI batch line lacks " + ", ".join(repr(k) for k in missing))
    url, body = line["url"], line["body"]
    if url not in (_CHAT_URL, _COMPLETIONS_URL):
        raise _RowFailure(UNSUPPORTED_ENDPOINT, f"url {url!r} is not supported: use {_CHAT_URL} or {_COMPLETIONS_URL}")
    if line["method"] != "POST":
        raise _RowFailure(UNSUPPORTED_ENDPOINT, f"method {line['method']!r} is not supported: use POST")
    if not isinstance(body, dict):
        raise _RowFailure(INVALID_PARAMETER, "body must be a JSON object")
    chat = url == _CHAT_URL
    known = _SAMPLING_KEYS | NEUTRAL_BODY_FIELDS | ({"logprobs", "messages", "top_logprobs"} if chat else {"logprobs", "prompt"})
    unsupported: dict[str, Any] = {}
    for key, value in body.items():
        if key in known or _is_null(value):
            continue
        if key == ("prompt" if chat else "messages"):
            raise _RowFailure(UNSUPPORTED_PARAMETER, f"{key!r} is not a field of {url} bodies (use "
                                                     f"{'messages' if chat else 'prompt'}, or the other url)")
        if key == "top_logprobs" and not chat:
            raise _RowFailure(UNSUPPORTED_PARAMETER, f"top_logprobs is a {_CHAT_URL} field; {url} takes logprobs: K")
        if key not in UNSUPPORTED_FIELDS:
            raise _RowFailure(UNSUPPORTED_PARAMETER, f"unknown field {key!r} in the body: not an OpenAI or vLLM "
                                                     "request field that batchllm knows (remove it)")
        unsupported[key] = value
    fields = _sampling_subset({k: v for k, v in body.items() if k != "logprobs"})
    logprobs = body.get("logprobs")
    if url == _CHAT_URL:
        top = body.get("top_logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise _RowFailure(INVALID_PARAMETER, f"logprobs must be true or false for chat, got {logprobs!r}")
        if top is not None and not logprobs:
            raise _RowFailure(INVALID_PARAMETER, "top_logprobs requires logprobs: true")
        if logprobs:
            fields["logprobs"] = 0 if top is None else top
        if body.get("messages") is None:
            raise _RowFailure(MISSING_PROMPT, "chat body has no 'messages'")
        return {"messages": _check_messages(body["messages"])}, fields, unsupported
    if logprobs is not None:
        fields["logprobs"] = logprobs
    prompt = body.get("prompt")
    if prompt is None:
        raise _RowFailure(MISSING_PROMPT, "completions body has no 'prompt'")
    if isinstance(prompt, list) and all(isinstance(x, str) for x in prompt):
        raise _RowFailure(INVALID_PARAMETER, "a list of prompts is not supported: write one line per prompt")
    if isinstance(prompt, list):
        return {"prompt_token_ids": _check_token_ids(prompt)}, fields, unsupported
    return {"prompt": _check_prompt(prompt)}, fields, unsupported


def _check_prompt(value: Any) -> str:
    if not isinstance(value, str):
        raise _RowFailure(INVALID_PARAMETER, f"prompt must be a string, got {type(value).__name__}")
    if not value:
        raise _RowFailure(MISSING_PROMPT, "prompt is empty")
    return value


def _check_token_ids(value: Any) -> list[int]:
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    ):
        raise _RowFailure(INVALID_PARAMETER, "prompt_token_ids must be a non-empty list of non-negative integers")
    return list(value)


def _check_messages(value: Any) -> list[dict[str, Any]]:
    """Validate a chat; returns copies with ``content`` as one string (text parts joined by newlines,
    as vLLM does) and null-valued keys dropped (Parquet structs carry every key). Errors number the
    messages from 1."""
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        # datasets' legacy Sequence({...}) feature hands a list of dicts over as a dict of lists
        value = [dict(zip(value, items)) for items in zip(*value.values())]
    if not isinstance(value, list) or not value:
        raise _RowFailure(INVALID_MESSAGES, "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(value, 1):
        if not isinstance(message, dict):
            raise _RowFailure(INVALID_MESSAGES, f"message {i} is not an object")
        role, content = message.get("role"), message.get("content")
        if role is None:
            raise _RowFailure(INVALID_MESSAGES, f"message {i} has no role")
        if not isinstance(role, str) or role not in _ROLES:
            raise _RowFailure(INVALID_MESSAGES, f"unknown role {role!r} in message {i}")
        if isinstance(content, list):
            content = _join_text_parts(content, i)
        elif content is None and role == "assistant" and message.get("tool_calls"):
            pass  # an assistant turn that only calls tools
        elif not isinstance(content, str):
            raise _RowFailure(
                INVALID_MESSAGES,
                f"message {i}: content must be a string or a list of text parts, got {_short(content)}",
            )
        cleaned = {k: v for k, v in message.items() if v is not None}
        cleaned["content"] = content
        out.append(cleaned)
    return out


def _join_text_parts(parts: list, i: int) -> str:
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            shown = repr(kind) if kind is not None else _short(part)
            raise _RowFailure(INVALID_MESSAGES, f"message {i}: content part {shown} is not supported (text only)")
        texts.append(part["text"])
    return "\n".join(texts)


def _with_system(messages: list[dict], system_prompt: str) -> list[dict]:
    if messages[0]["role"] in ("system", "developer"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def _template_fields(template: str) -> tuple[str, ...]:
    """The field names of a prompt template; raises BatchLLMError unless every field is a plain name with
    at most a small static format spec (``_template_parts``)."""
    return tuple(dict.fromkeys(name for _, name, _, _ in _template_parts(template) if name is not None))


# A format spec may pad or extend a value by at most this many characters ("{x:>1000000000}" would build a
# gigabyte prompt from every row before any length check could see it).
MAX_SPEC_WIDTH = 100


@functools.lru_cache(maxsize=16)
def _template_parts(template: str) -> tuple[tuple[str, str | None, str | None, str], ...]:
    """(literal, field name, conversion, format spec) pieces of a prompt template, checked.

    Plain names only: attribute access and indexing (``{x.__class__}``, ``{x[0]}``) could reach into
    Python objects, and positional fields have nothing to bind to. Format specs must be static (no nested
    ``{field}``) with widths and precisions of at most ``MAX_SPEC_WIDTH``, so a rendered prompt is never
    much longer than the row's own text.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise BatchLLMError(f"bad prompt template: {e}") from None
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise BatchLLMError(
                f"bad prompt template field {{{name}}}: use plain column names, no attribute access, "
                "indexing or positional fields"
            )
        if spec and ("{" in spec or "}" in spec):
            raise BatchLLMError(
                f"bad prompt template field {{{name}:{spec}}}: a format spec cannot hold other fields; use a "
                "static spec such as {name:>4} or none"
            )
        if spec and any(int(d) > MAX_SPEC_WIDTH for d in re.findall(r"\d+", spec)):
            raise BatchLLMError(
                f"bad prompt template field {{{name}:{spec}}}: format spec widths and precisions are limited "
                f"to {MAX_SPEC_WIDTH}"
            )
    return tuple((lit, name, conv, spec or "") for lit, name, spec, conv in parsed)


def _render(template: str, fields: tuple[str, ...], row: dict, max_chars: int | None = None) -> str:
    """The template over ``row``, as ``str.format`` renders it; a PROMPT_TOO_LONG failure when it would be
    longer than ``max_chars`` (checked from the pieces' lengths before they are joined)."""
    for name in fields:
        if name not in row:
            raise _RowFailure(TEMPLATE_ERROR, f"template field {name!r} is not in this row")
        if row[name] is None:
            raise _RowFailure(TEMPLATE_ERROR, f"template field {name!r} is null in this row")
    pieces: list[str] = []
    done: dict[tuple[str, str | None, str], str] = {}  # each distinct field rendered once
    total = 0
    try:
        for literal, name, conv, spec in _template_parts(template):
            pieces.append(literal)
            total += len(literal)
            if name is None:
                continue
            key = (name, conv, spec)
            if key not in done:
                value = row[name]
                if conv == "r":
                    value = repr(value)
                elif conv == "a":
                    value = ascii(value)
                elif conv == "s":
                    value = str(value)
                elif conv is not None:
                    raise ValueError(f"unknown conversion specifier {conv}")
                done[key] = format(value, spec)
            pieces.append(done[key])
            total += len(done[key])
            if max_chars is not None and total > max_chars:
                raise _RowFailure(PROMPT_TOO_LONG, f"the rendered prompt has more than {max_chars:,} characters, "
                                                    "more than the model's context can hold")
    except (ValueError, TypeError, KeyError) as e:  # a format spec that does not fit the value
        raise _RowFailure(TEMPLATE_ERROR, f"cannot render the template: {e}") from None
    return "".join(pieces)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SNIPPET_CHARS else text[:_SNIPPET_CHARS] + "..."


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


# --------------------------------------------------------------------------------------------- formats


_WIDE_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")  # UTF-16 LE / BE, UTF-32 BE (UTF-32 LE starts like UTF-16 LE)


def _check_utf8(path: str) -> None:
    """BatchLLMError for a JSON / JSONL file in UTF-16 or UTF-32: its lines would split inside characters
    (a UTF-16 newline is two bytes), so rows would be lost or garbled rather than read."""
    try:
        with _open(path) as f:
            head = f.read(4096)
    except _READ_ERRORS as e:
        raise BatchLLMError(f"cannot read {path}: {_one_line(e)}") from e
    if head.startswith(_WIDE_BOMS) or b"\x00" in head:
        raise BatchLLMError(f"{path} is not UTF-8 (it looks UTF-16 or UTF-32 encoded): JSON input must be UTF-8, "
                            f"e.g. iconv -f UTF-16 -t UTF-8 {os.path.basename(path)} > converted.jsonl")


def _check_parquet(path: str) -> None:
    """BatchLLMError for a Parquet file that cannot be opened or has no rows (as for an empty JSONL file)."""
    try:
        rows = pq.ParquetFile(_parquet_source(path)).metadata.num_rows
    except (OSError, pa.ArrowException) as e:
        raise BatchLLMError(f"cannot read {path}: {_one_line(e)}") from None
    if rows == 0:
        raise BatchLLMError(f"{path} has no rows: nothing to run")


def _first_byte(path: str) -> bytes:
    try:
        with _open(path) as f:
            while chunk := f.read(4096):
                stripped = chunk.lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()
                if stripped:
                    return stripped[:1]
    except _READ_ERRORS as e:
        raise BatchLLMError(f"cannot read {path}: {_one_line(e)}") from e
    return b""


def _sniff_jsonl(path: str) -> str:
    """``openai`` if the first parseable JSON-object line has the OpenAI batch keys, else ``jsonl``."""
    nonblank = 0
    try:
        with _open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                nonblank += 1
                if nonblank > _SNIFF_LINES:
                    break
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    return "openai" if all(k in obj for k in _OPENAI_KEYS) else "jsonl"
    except _READ_ERRORS as e:
        raise BatchLLMError(f"cannot read {path}: {_one_line(e)}") from e
    if nonblank == 0:
        raise BatchLLMError(f"{path} is empty: no rows to run")
    return "jsonl"


def _jsonl_rows(path: str, skip: list[bool] | None = None) -> Iterator[tuple[int, dict | _RowFailure]]:
    """(line index, parsed object or failure) for every non-blank line not in ``skip``, streaming in binary."""
    n_skip = len(skip) if skip is not None else 0
    try:
        with _open(path) as f:
            for index, raw in enumerate(f):
                if index < n_skip and skip[index]:
                    continue
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
                    reason = getattr(e, "msg", None) or str(e)
                    yield index, _RowFailure(MALFORMED_JSON, f"invalid JSON ({reason}): {_snippet(raw)}")
                    continue
                if not isinstance(obj, dict):
                    kind = {list: "an array", str: "a string"}.get(type(obj), "a " + type(obj).__name__)
                    yield index, _RowFailure(MALFORMED_JSON, f"expected a JSON object, got {kind}: {_snippet(raw)}")
                    continue
                yield index, obj
    except _READ_ERRORS as e:  # a truncated or corrupt compressed stream too
        raise BatchLLMError(f"cannot read {path}: {_one_line(e)}") from e


def _snippet(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    return text if len(text) <= _SNIPPET_CHARS else text[:_SNIPPET_CHARS] + "..."


def _wanted_columns(mapping: ColumnMapping, template_fields: tuple[str, ...]) -> tuple[set[str], list[str]]:
    """(columns worth reading, columns the mapping names explicitly and a file must have)."""
    required = [c for c in (mapping.id_column, mapping.prompt_column, mapping.messages_column) if c is not None]
    required += template_fields
    wanted = {
        mapping.id_column or "custom_id",
        mapping.prompt_column or "prompt",
        mapping.messages_column or "messages",
        "prompt_token_ids",
        "sampling_params",
        *_SAMPLING_KEYS,
        *FLAT_UNSUPPORTED,
        *template_fields,
    }
    return wanted, required


def _select(path: str, names: Sequence[str], wanted: set[str], required: list[str]) -> list[str]:
    missing = [c for c in required if c not in names]
    if missing:
        raise BatchLLMError(
            f"{path} has no column {missing[0]!r} (named by the column mapping or template); "
            f"columns: {', '.join(names)}"
        )
    return [c for c in names if c in wanted]


def _parquet_rows(path, fmt, wanted, required, batch_rows) -> Iterator[tuple[int, dict]]:
    try:
        pf = pq.ParquetFile(_parquet_source(path))
        columns = _select(path, pf.schema_arrow.names, wanted, required)
        index = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            for row in batch.to_pylist():
                yield index, row
                index += 1
    except (OSError, pa.ArrowException) as e:
        raise BatchLLMError(f"cannot read {path}: {_one_line(e)}") from e
    except UnicodeDecodeError as e:  # a string column whose bytes are not UTF-8: a damaged file
        raise BatchLLMError(f"cannot read {path}: row {index} holds a string that is not UTF-8 ({e.reason}); "
                            "the file is damaged") from None


def _dataset_rows(path, fmt, wanted, required, batch_rows, split=None) -> Iterator[tuple[int, dict]]:
    ds = _load_dataset(path, fmt, split)
    columns = _select(path, ds.column_names, wanted, required)
    if not columns:  # keep one column so the row count survives; every row then lacks a prompt
        columns = ds.column_names[:1]
    ds = ds.select_columns(columns)
    index = 0
    try:
        for batch in ds.iter(batch_size=batch_rows):
            for values in zip(*(batch[c] for c in columns)):
                yield index, dict(zip(columns, values))
                index += 1
    except (OSError, pa.ArrowException, UnicodeDecodeError) as e:  # a damaged Arrow cache or file
        raise BatchLLMError(f"cannot read {path} at row {index}: {_one_line(e)}") from None


def _load_dataset(path: str, fmt: str, split: str | None = None):
    """A ``datasets.Dataset`` for a save_to_disk folder, a datasets file or a hub dataset name; a dataset
    dict's split is chosen by ``_choose_split``."""
    try:
        import datasets
    except ImportError:
        raise BatchLLMError(f"reading {path} needs the 'datasets' package (pip install datasets)") from None
    if fmt == "hub":
        return _choose_split(path, _load_hub_dataset(datasets, path, split), split)
    local = _locate(path)[1]
    try:
        if fmt == "hf-file":
            builder = _HF_BUILDERS[os.path.splitext(local)[1].lower()]
            return datasets.load_dataset(builder, data_files=local, split="train")
        ds = datasets.load_from_disk(local)
    except Exception as e:  # datasets raises many types for unreadable input; all mean "cannot load"
        raise BatchLLMError(f"cannot load {path} with datasets: {_one_line(e)}") from e
    return _choose_split(path, ds, split)


def _choose_split(path: str, ds, split: str | None):
    """The split of a ``DatasetDict`` to read: ``split`` when given; else its only split. Several splits
    and no ``split``, or an unknown split: BatchLLMError. A single dataset is read whole (a ``split``
    naming another split than the one it was saved from is refused)."""
    import datasets

    if not isinstance(ds, (datasets.DatasetDict, dict)):
        saved = getattr(ds, "split", None)
        if split is not None and saved is not None and str(saved) != split:
            raise BatchLLMError(f"{path} holds split {saved}, not the requested split {split}")
        return ds
    splits = list(ds)
    if split is not None:
        if split not in ds:
            raise BatchLLMError(f"{path} has no split {split!r}; its splits: {', '.join(splits)}")
        return ds[split]
    if len(splits) == 1:
        return ds[splits[0]]
    raise BatchLLMError(f"{path} has splits {', '.join(splits)}: choose one with --split")


def _check_splits(paths: list[str], formats: list[str], split: str | None) -> None:
    """Job-level split checks before any row is read: hub datasets load now (a missing one fails here);
    a ``save_to_disk`` dict's splits are read from its ``dataset_dict.json`` (no load); ``split`` given
    while no input has splits is refused."""
    has_splits = False
    for path, fmt in zip(paths, formats):
        if fmt == "hub":
            _load_dataset(path, fmt, split)
            has_splits = True
        elif fmt == "hf-disk":
            names = _saved_splits(_locate(path)[1])
            if names is None:
                continue
            has_splits = True
            if split is not None and split not in names:
                raise BatchLLMError(f"{path} has no split {split!r}; its splits: {', '.join(names)}")
            if split is None and len(names) > 1:
                raise BatchLLMError(f"{path} has splits {', '.join(names)}: choose one with --split")
    if split is not None and not has_splits:
        raise BatchLLMError(f"--split {split}: no input has splits (--split picks a split of a saved DatasetDict "
                            "folder or a hub dataset)")


def _saved_splits(folder: str) -> list[str] | None:
    """The split names in a ``DatasetDict.save_to_disk`` folder's ``dataset_dict.json``; None for a single
    dataset's folder (or an unreadable file: loading it reports why)."""
    try:
        with open(os.path.join(folder, "dataset_dict.json"), "rb") as f:
            splits = json.load(f).get("splits")
    except (OSError, ValueError, AttributeError):
        return None
    return [s for s in splits if isinstance(s, str)] if isinstance(splits, list) else None


# ---------------------------------------------------------------------------------------------- sources


_READ_ERRORS = (OSError, EOFError, pa.ArrowException)  # EOFError: the gzip module on a truncated stream


def looks_like_repo_id(spec: str) -> bool:
    """Whether ``spec`` is spelled like a Hugging Face hub repo id (``name`` or ``org/name``)."""
    return bool(_HUB_NAME_RE.match(str(spec))) and ".." not in str(spec)


def is_hub_dataset_name(spec: str) -> bool:
    """Whether ``spec`` reads as a Hugging Face hub dataset name (``imdb``, ``org/name``) rather than a
    path: no URI, no local file or folder of that name, no input file extension."""
    from batchllm.io.storage import is_uri

    spec = str(spec)
    if is_uri(spec) or not looks_like_repo_id(spec) or os.path.exists(spec):
        return False
    return not spec.lower().endswith(_FILE_EXTS)


def _locate(path: str) -> tuple[Any, str]:
    """(pyarrow FileSystem or None for a local file, the path on it) of an input, resolved as output
    folders are (``batchllm.io.storage``: registered schemes, ``file://`` as a local path, else
    ``pyarrow.fs.FileSystem.from_uri``)."""
    from batchllm.io import storage

    if not storage.is_uri(path):
        return None, path
    scheme = path.split("://", 1)[0].lower()
    try:
        if scheme in storage._FACTORIES:  # noqa: SLF001  (the scheme registry output folders use)
            return storage._FACTORIES[scheme](path)  # noqa: SLF001
        if scheme == "file":
            return None, storage._file_uri_path(path)  # noqa: SLF001
        from pyarrow import fs as pafs

        return pafs.FileSystem.from_uri(path)
    except BatchLLMError:
        raise
    except (OSError, ValueError, ImportError, pa.ArrowException) as e:  # unknown scheme, credentials, region lookup
        raise BatchLLMError(f"cannot open input {path}: {_one_line(e)}") from None


def _file_type(fs: Any, where: str) -> str | None:
    """``"file"``, ``"dir"`` or None (missing) for a located input."""
    if fs is None:
        return "dir" if os.path.isdir(where) else "file" if os.path.exists(where) else None
    from pyarrow import fs as pafs

    try:
        t = fs.get_file_info(where).type
    except (OSError, pa.ArrowException) as e:
        raise BatchLLMError(f"cannot read {where}: {_one_line(e)}") from None
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(t)


def _extension(path: str) -> tuple[str, str | None]:
    """(the format's extension, lower case, the compression suffix removed; the codec or None)."""
    name = path.rsplit("/", 1)[-1] if "://" in path else os.path.basename(path)
    stem, ext = os.path.splitext(name.lower())
    if ext in _CODECS:
        return os.path.splitext(stem)[1], _CODECS[ext]
    return ext, None


class _RawStream(io.RawIOBase):
    """A pyarrow input stream as a ``RawIOBase``, for ``io.BufferedReader``'s line iteration."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
        super().close()


def _open(path: str) -> io.BufferedIOBase:
    """A binary, line-iterable reader of an input's (decompressed) bytes. An uncompressed local file is a
    plain ``open``; otherwise pyarrow's stream (with its codec), or the gzip module / ``zstandard`` where
    pyarrow was built without the codec."""
    fs, where = _locate(path)
    codec = _extension(path)[1]
    if fs is None and codec is None:
        return open(where, "rb")
    if fs is None:
        from pyarrow import fs as pafs

        fs = pafs.LocalFileSystem()
    if codec is None or pa.Codec.is_available(codec):
        return io.BufferedReader(_RawStream(fs.open_input_stream(where, compression=codec)), 1 << 16)
    raw = io.BufferedReader(_RawStream(fs.open_input_stream(where)), 1 << 16)
    if codec == "gzip":
        import gzip

        return gzip.GzipFile(fileobj=raw)
    try:
        import zstandard
    except ImportError:
        raw.close()
        raise BatchLLMError(f"reading {path} needs zstd: pyarrow was built without it; pip install zstandard") from None
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))


def _parquet_source(path: str) -> Any:
    """What ``pq.ParquetFile`` reads: the local path, or a random-access file on the input's filesystem."""
    fs, where = _locate(path)
    return where if fs is None else fs.open_input_file(where)


def input_identity(path: str, split: str | None = None) -> str:
    """The identity of one input in the job's fingerprint (resume refuses another). A local path (or
    ``file://`` URI): ``batchllm.jobs.manifest.input_identity``, unchanged; a file on another filesystem:
    the same ``size:sha256(first MB + last MB)`` read through it; a hub dataset: its name, row count and
    ``datasets`` fingerprint. A given ``split`` is part of it."""
    from batchllm.jobs import manifest

    suffix = f"|split={split}" if split is not None else ""
    fs, where = _locate(path)
    if fs is None:
        if _file_type(None, where) is None and is_hub_dataset_name(path):
            ds = _load_dataset(path, "hub", split)
            return f"hub:{path}:{ds.num_rows}:{getattr(ds, '_fingerprint', '')}{suffix}"
        return manifest.input_identity(where) + suffix
    probe = manifest._INPUT_PROBE_BYTES  # noqa: SLF001  (the same probe as local files)
    import hashlib

    try:
        size = fs.get_file_info(where).size
        h = hashlib.sha256()
        with fs.open_input_file(where) as f:
            h.update(f.read(probe))
            if size > 2 * probe:
                f.seek(size - probe)
            h.update(f.read(probe))
    except (OSError, pa.ArrowException) as e:
        raise BatchLLMError(f"cannot read {path}: {_one_line(e)}") from None
    return f"{size}:{h.hexdigest()}{suffix}"


def _hf_env_state() -> str:
    """Where datasets looks for cached hub datasets, and whether it may go online, for messages."""
    import datasets

    offline = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False)) or _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE")
    hub_cache = os.environ.get("HF_HUB_CACHE")
    if not hub_cache:
        from huggingface_hub import constants

        hub_cache = constants.HF_HUB_CACHE
    return (f"looked in HF_DATASETS_CACHE={datasets.config.HF_DATASETS_CACHE} and HF_HUB_CACHE={hub_cache}; "
            f"HF_HUB_OFFLINE={'1' if offline else '0'}")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


@contextlib.contextmanager
def quiet_hub_logs() -> Iterator[None]:
    """huggingface_hub's and datasets' warnings (retries while the network is down, one per attempt) held
    back to errors while a hub lookup runs, unless logging is at DEBUG (``--verbose``): the failure
    becomes one line of its own."""
    import logging

    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "datasets")]
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        yield
        return
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved):
            lg.setLevel(level)


def _load_hub_dataset(datasets, name: str, split: str | None):
    """``datasets.load_dataset(name, split=split)``: from the local cache when offline, else downloading
    as datasets does. A dataset that cannot be loaded: one line naming where it looked."""
    offline = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False)) or _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE")
    try:
        with quiet_hub_logs():
            return datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001  (datasets and huggingface_hub raise many types; all mean "cannot load")
        text = _one_line(e)
        if split is not None and ("split" in text.lower() and ("unknown" in text.lower() or "not" in text.lower())):
            raise BatchLLMError(f"dataset {name}: {text}") from None
        where = _hf_env_state()
        if offline:
            raise BatchLLMError(f"input not found: {name} is no local file or folder, and as a Hugging Face dataset it "
                                f"is not in the local cache ({where})") from None
        raise BatchLLMError(f"input not found: {name} is no local file or folder, and as a Hugging Face dataset it "
                            f"could not be loaded ({type(e).__name__}: {text}; {where})") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ------------------------------------------------------------------------------------------ kept columns


def resolve_keep_columns(paths: Sequence[str], spec: str, mapping: ColumnMapping = ColumnMapping(),
                         reserved: Sequence[str] = (), split: str | None = None) -> list[tuple[str, Any]]:
    """``--keep-columns``: the input columns to carry into the output rows, each with its Arrow type, or
    None where its values are stored as JSON text. Raises BatchLLMError (one line) for a bad spec.

    ``spec``: ``"A,B"`` (those columns, in that order) or ``"all"`` (every column of every input, in order
    of first appearance, less the id column, which is the output's ``custom_id`` already; for JSON lines
    inputs the keys of every line, read once more now). Types: a Parquet or datasets column keeps its
    type (dictionary-encoded: its value type) when every input holding it agrees; a column of a JSON
    lines input, or whose types differ between inputs, is JSON text. ``reserved``: the output's own
    columns, which no kept column may be named. A named column that no input has is refused where every
    input's columns are known (no JSON lines input); a row lacking a kept column gets null.
    """
    paths = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    spec = (spec or "").strip()
    every = spec == "all"
    per_file = [_input_columns(path, detect_format(path), every, split) for path in paths]
    if every:
        names = [n for n in dict.fromkeys(n for cols in per_file for n in cols) if n != (mapping.id_column or "custom_id")]
        clash = [n for n in names if n in reserved]
        if clash:
            raise BatchLLMError(f"--keep-columns all: the input column {clash[0]!r} has the name of an output column; "
                                "name the columns to keep instead (--keep-columns A,B)")
    else:
        names = [n.strip() for n in spec.split(",")]
        if not spec or any(not n for n in names):
            raise BatchLLMError(f"--keep-columns {spec!r}: give column names separated by commas, or all")
        twice = [n for i, n in enumerate(names) if n in names[:i]]
        if twice:
            raise BatchLLMError(f"--keep-columns: {twice[0]!r} is named twice")
        clash = [n for n in names if n in reserved]
        if clash:
            raise BatchLLMError(f"--keep-columns: {clash[0]!r} is the name of an output column; an input column of that "
                                "name cannot be kept")
        if all(cols is not None and not _is_json_columns(cols) for cols in per_file):
            missing = [n for n in names if not any(n in cols for cols in per_file)]
            if missing:
                known = ", ".join(dict.fromkeys(n for cols in per_file for n in cols))
                raise BatchLLMError(f"--keep-columns: no input has a column {missing[0]!r}; columns: {known}")
    decoded = [n for n in names if any(cols is not None and cols.get(n) is _DECODED for cols in per_file)]
    if decoded:
        raise BatchLLMError(f"--keep-columns: {decoded[0]!r} is a datasets column decoded on read (an image or audio "
                            "feature), which an output column cannot hold; leave it out")
    out = []
    for name in names:
        types = [None if cols is None or _is_json_columns(cols) else cols.get(name, _ABSENT) for cols in per_file]
        typed = {t for t in types if t is not _ABSENT and t is not None and t != pa.null()}
        if any(t is None for t in types) or len(typed) > 1:
            out.append((name, None))
        else:
            out.append((name, typed.pop() if typed else pa.null()))
    return out


_ABSENT = object()


class _JsonColumns(dict):
    """The keys of a JSON lines input (no types: their values are kept as JSON text)."""


def _is_json_columns(cols: Any) -> bool:
    return isinstance(cols, _JsonColumns)


def _input_columns(path: str, fmt: str, every: bool, split: str | None = None) -> dict[str, Any] | None:
    """An input's columns and Arrow types; for JSON lines the keys of its lines (``_JsonColumns``) when
    ``every``, else None (not read)."""
    if fmt in ("jsonl", "openai"):
        if not every:
            return None
        keys = _JsonColumns()
        for _, obj in _jsonl_rows(path):
            if isinstance(obj, dict):
                keys.update(dict.fromkeys(obj))
        return keys
    if fmt == "parquet":
        try:
            schema = pq.ParquetFile(_parquet_source(path)).schema_arrow
        except (OSError, pa.ArrowException) as e:
            raise BatchLLMError(f"cannot read {path}: {_one_line(e)}") from None
        return {f.name: _value_type(f.type) for f in schema}
    ds = _load_dataset(path, fmt, split)
    # Image, Audio...: rows hold decoded objects (not the stored value), which an output column cannot hold
    return {name: _DECODED if getattr(ds.features.get(name), "decode", False)
            else _value_type(ds.features.arrow_schema.field(name).type) for name in ds.column_names}


_DECODED = object()


def _value_type(t: Any) -> Any:
    """The type a kept column is written with: a dictionary's value type, an extension type's storage type
    (python rows hold plain values)."""
    if isinstance(t, pa.BaseExtensionType):
        t = t.storage_type
    return t.value_type if pa.types.is_dictionary(t) else t

