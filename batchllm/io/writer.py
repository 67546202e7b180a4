"""Parquet shard writer: results go out in shards, each committed atomically, listed in a manifest.

Commit protocol (``ShardWriter.flush``): the shard is serialised in memory and hashed, written durably
under a hidden pending name ``.shard-NNNNN.parquet.pending`` (fsynced), listed in ``.manifest.json``
(itself rewritten through a temporary file and a rename: the commit point), and only then renamed to
``shard-NNNNN.parquet`` (directory fsynced). The manifest is the only source of truth: a pending file it
does not list (the process died before the manifest write) is an orphan that the next writer in the
folder deletes, and its rows are redone; a listed shard still under its pending name (the process died
between the manifest write and the rename) is committed, read under that name by batchllm, and renamed
by the next writer. So whatever instant the process dies at, a reader that trusts the manifest sees
every committed row exactly once and never a half-written file.

The folder reads as a dataset (``pyarrow.parquet.read_table(DIR)``, ``pandas.read_parquet(DIR)``,
``datasets.load_dataset("parquet", data_dir=DIR)``): those readers skip hidden names (pyarrow and
pandas also skip a leading ``_``; ``datasets`` does not, so ``.``), and every job file is named so
(``.manifest.json``, ``.status.json``, the ``.NAME.tmp`` and ``.NAME.pending`` files, the ``.batchllm.lock`` lock and the ``.batchllm-job`` mark), so what they see is
the visible shards, and a visible shard is always a listed one: they read exactly the committed rows.
The one gap: a listed shard left pending by a kill is missing from them until the next ``run`` /
``resume`` in the folder renames it (``batchllm show`` names such shards). Folders written by earlier
versions (``manifest.json``, ``status.json``, shards visible before they were listed) are read as they
are; the next writer moves them to the new names and deletes their unlisted shards.

Shards written by other processes (the Ray replicas of ``batchllm.distributed``): the writer reserves a
name (``reserve_shard_name``, never handed out twice), the other process serialises its rows
(``encode_shard``) and writes the pending file durably (``write_shard_file``) without touching the
manifest, and the writer lists the returned entry and renames it (``commit_entries``) or deletes the
file (``discard_shard``).
The manifest stays the only source of truth and has one writer.

Whole requests only: ``add_request(rows)`` buffers all rows of one request (its ``n`` samples, or its
one error record) together and a shard is cut only between requests, so a shard may exceed
``shard_rows`` by at most ``n - 1`` rows. ``add(row)`` is ``add_request([row])``. That is what lets each
shard's manifest entry record, compactly (``batchllm.jobs.completed``), which input rows it finished:
resume reads those records, never the shards.

Every row has the same schema (``OUTPUT_SCHEMA``): completions fill the result columns, error records
(rows that could not run) fill ``error_code`` / ``error_message`` and leave the result columns null.
``request_type`` is "chat" or "completion" (how the prompt was given), used by the OpenAI export.

The folder is a local path or any pyarrow filesystem URI (``s3://bucket/job``): every file goes through
``batchllm.io.storage``, which says what is atomic where (temporary + fsync + rename on local disks; one
write-once PUT per file on object stores) and how the folder is locked (``flock`` locally, a renewed
lease object on object stores). The protocol above is the same on both: a shard is complete before the
manifest lists it, and the manifest is replaced whole.

Which module owns what (imports point one way, downwards): ``batchllm.io.storage`` the folder itself
(files, atomic writes, locks, ``storage_of``); ``batchllm.jobs.manifest`` the manifest's names and its
one reader (``read_manifest``) and the job's fingerprint; this module the shard encoding (``encode_shard``,
``shard_bytes_problem``, pending names), the commit protocol, the folder's ownership and reading results
back; ``batchllm.jobs.integrity`` checks and repairs of a whole folder on top of it.

Failures to write (disk full, a deleted or read-only folder) raise ``CommitError``, a BatchLLMError
with one line; what was committed before stays valid and the job can resume.

Ownership (``claim_job_folder``): batchllm deletes or replaces only files it wrote. Before the first
write or removal in a folder it marks the folder as a job folder (``.batchllm-job``); a folder without
that mark (or a batchllm manifest) that already holds files named like batchllm's own
(``.manifest.json``, ``.status.json``, the legacy ``manifest.json`` and ``status.json``,
``shard-NNNNN.parquet`` and their ``.NAME.tmp`` / ``.NAME.pending`` files) is refused, never cleaned. Inside a marked folder those names are batchllm's: an unlisted shard is an
orphan of a killed commit and is deleted. An input file inside the output folder (or an output folder
inside an input folder) is refused before anything is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections import Counter, defaultdict
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from batchllm.errors import BatchLLMError
from batchllm.io.storage import FolderLock, Lease, Storage, is_uri, storage_of
from batchllm.jobs.completed import encode_done
from batchllm.jobs.manifest import LEGACY_MANIFEST, MANIFEST, MANIFEST_VERSION, read_manifest

# a log-probability entry's token text (``jobs.results.token_text``): ``bytes`` only where the text is not
# the token's exact UTF-8 (OpenAI's convention); shards written before these fields read them as nulls
_TOKEN_TEXT = [("token", pa.string()), ("bytes", pa.list_(pa.uint8()))]
_TOKEN_LOGPROB = pa.struct([("token_id", pa.int32()), *_TOKEN_TEXT, ("logprob", pa.float32())])

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
        pa.field("top_logprobs", pa.list_(pa.list_(_TOKEN_LOGPROB))),
        # vLLM's prompt_logprobs (requests that ask): entry j scores prompt token j (entry 0 is null)
        pa.field("prompt_logprobs", pa.list_(pa.struct([
            ("token_id", pa.int32()), *_TOKEN_TEXT, ("logprob", pa.float32()), ("rank", pa.int32()),
            ("top_logprobs", pa.list_(_TOKEN_LOGPROB)),
        ]))),
        pa.field("error_code", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("request_type", pa.string()),
        pa.field("logprob_tokens", pa.list_(pa.struct(_TOKEN_TEXT))),  # the text of each ``logprobs`` entry's token
    ]
)

# --keep-columns: a job's output schema is OUTPUT_SCHEMA followed by one column per kept input column
# (``output_schema``); a kept column stored as JSON text carries this field metadata.
KEPT_JSON_METADATA = {b"batchllm.kept": b"json"}


def output_schema(extra_fields: Iterable[pa.Field] = ()) -> pa.Schema:
    """The schema of a job's shards: ``OUTPUT_SCHEMA`` and then ``extra_fields`` (the kept input columns)."""
    extra = list(extra_fields)
    return pa.schema([*OUTPUT_SCHEMA, *extra]) if extra else OUTPUT_SCHEMA


STATUS = ".status.json"
LEGACY_STATUS = "status.json"  # what earlier versions wrote: still read, removed when the folder moves on
MARKER = ".batchllm-job"  # marks a folder as a batchllm job folder (see ``claim_job_folder``)
_SHARD_RE = re.compile(r"^shard-\d{5,}(-[0-9a-f]{8})?\.parquet$")


class CommitError(BatchLLMError):
    """A shard or the manifest could not be written; committed shards are intact."""


class DamagedJob(BatchLLMError):
    """A listed shard is missing or does not match the manifest; the message says how to repair."""


def lock_folder(storage: Storage, output_dir: str):
    """Take the job folder's lock (a flock or a lease) and return it held; BatchLLMError in one line when
    it cannot be taken (another batchllm process holds it, or the folder is not writable)."""
    lock = storage.lock()
    try:
        lock.acquire()
    except OSError as e:
        raise BatchLLMError(f"cannot write to output folder {output_dir}: {e.strerror or e}") from None
    return lock


def is_job_file(name: str) -> bool:
    """Whether batchllm writes files of this name in a job folder: the manifest, the status file (and
    their legacy names), shards, and the ``.NAME.tmp`` / ``.NAME.pending`` files of those (the lock and
    the marker are not counted)."""
    for suffix in (".tmp", PENDING_SUFFIX):
        if name.startswith(".") and name.endswith(suffix):
            name = name[1:-len(suffix)]
            break
    return name in (MANIFEST, STATUS, LEGACY_MANIFEST, LEGACY_STATUS) or bool(_SHARD_RE.match(name))


PENDING_SUFFIX = ".pending"


def pending_name(name: str) -> str:
    """The hidden name a shard is written under until the manifest lists it (see the module docstring)."""
    return f".{name}{PENDING_SUFFIX}"


def read_shard_bytes(output_dir: str | Storage, name: str) -> bytes | None:
    """A listed shard's bytes, under its visible name or still under its pending one (committed, not yet
    renamed); None when neither exists. The pending name is read first: once it is gone the rename has
    happened, so a read racing the rename still finds the file. Raises OSError."""
    storage = storage_of(output_dir)
    data = storage.read_bytes(pending_name(name))
    return data if data is not None else storage.read_bytes(name)


def store_manifest(output_dir: str | Storage, data: bytes) -> None:
    """Replace ``.manifest.json`` whole, then remove a legacy ``manifest.json`` (and ``status.json``) of
    batchllm's, so the folder keeps one manifest and reads as a dataset. Raises OSError."""
    storage = storage_of(output_dir)
    storage.replace(MANIFEST, data)
    _drop_legacy(storage)


def _drop_legacy(storage: Storage) -> None:
    if _is_batchllm_manifest(storage.read_bytes(LEGACY_MANIFEST)):  # written before: the new one replaces it
        storage.remove(LEGACY_MANIFEST)
        storage.remove(LEGACY_STATUS)


def check_inputs_outside(location: str, inputs: Iterable[str]) -> None:
    """BatchLLMError when an input lies inside the output folder ``location`` (batchllm would count it as
    one of its own files) or the output folder inside an input folder (the job would read its own output)."""
    out = _normalised(location)
    for inp in inputs or ():
        if not inp or str(inp) == "-":
            continue
        p = _normalised(str(inp))
        if is_uri(location) != is_uri(str(inp)):
            continue
        if _within(p, out):
            raise BatchLLMError(f"input {inp} is inside the output folder {location}: batchllm owns the files there "
                                "and could delete or overwrite it; move the input or choose another --output folder")
        if _within(out, p):
            raise BatchLLMError(f"the output folder {location} is inside the input folder {inp}: the job would read "
                                "its own output; choose an --output folder outside it")


def _normalised(location: str) -> str:
    if is_uri(location):
        return location.rstrip("/")
    return os.path.realpath(os.path.expanduser(location))


def _within(path: str, folder: str) -> bool:
    sep = "/" if is_uri(folder) else os.sep
    return path == folder or path.startswith(folder.rstrip(sep) + sep)


def claim_job_folder(output_dir: str | Storage, inputs: Iterable[str] = ()) -> None:
    """Make sure batchllm may write and delete its files in the folder, before it removes anything.

    Refuses (BatchLLMError) an input inside the folder, and a folder not marked as a job folder that
    already holds files named like batchllm's (``is_job_file``): they are the user's, and a new job
    would delete or overwrite them. Otherwise marks the folder (a folder with a batchllm manifest but no
    mark, written before the mark existed, is marked too). Raises OSError when the folder cannot be read
    or written."""
    storage = storage_of(output_dir)
    check_inputs_outside(storage.location, inputs)
    names = storage.names()
    if MARKER in names:
        return
    if any(m in names and _is_batchllm_manifest(storage.read_bytes(m)) for m in (MANIFEST, LEGACY_MANIFEST)):
        storage.replace(MARKER, _marker_bytes())
        return
    theirs = sorted(n for n in names if is_job_file(n))
    if theirs:
        more = f" and {len(theirs) - 3} more" if len(theirs) > 3 else ""
        raise BatchLLMError(
            f"{storage.location} is not a batchllm job folder but holds files named like batchllm's own "
            f"({', '.join(theirs[:3])}{more}); batchllm never deletes or overwrites files it did not write: "
            "choose an empty or new --output folder, or move those files")
    storage.replace(MARKER, _marker_bytes())


def is_job_folder(output_dir: str | Storage) -> bool:
    """Whether a folder is a batchllm job folder (marked, or holding a batchllm manifest); False when it
    cannot be read."""
    try:
        storage = storage_of(output_dir)
        if storage.exists(MARKER):
            return True
        manifest = read_manifest(storage)
        return manifest is not None and "job_id" in manifest
    except (OSError, BatchLLMError):
        return False


def _is_batchllm_manifest(data: bytes | None) -> bool:
    if not data:
        return False
    try:
        m = json.loads(data)
    except ValueError:
        return False
    return isinstance(m, dict) and isinstance(m.get("shards"), list) and "job_id" in m


def _marker_bytes() -> bytes:
    return json.dumps({"batchllm": "job folder: batchllm owns .manifest.json, .status.json and shard-*.parquet here",
                       "marked_at": time.time()}).encode()


class ShardWriter:
    """Buffers result rows and commits them as Parquet shards of about ``shard_rows`` rows.

    ``manifest``: an existing manifest (``read_manifest``) to continue; its shards stay and numbering
    goes on after them. Without it a new job starts and any previous job's files in the folder are
    deleted (only in a folder batchllm may claim: ``claim_job_folder``; the new manifest replaces the
    old one before any old shard is removed). ``fingerprint`` and ``input_files`` (the file-id order) go into a new manifest. ``lock``:
    the folder's lock (``FolderLock`` or ``Lease``) when the caller already holds it; the writer checks
    it before every manifest write and releases it on close. ``output_dir``: a path or a URI.
    ``on_commit_phase``: called with each phase's name as a shard commit passes it ("shard-written": the
    pending file is durable; "manifest-written": the commit point; "shard-renamed": visible), so a test
    can land a kill inside a phase; it may block, never raise.
    """

    def __init__(
        self,
        output_dir: str | Storage,
        shard_rows: int = 10_000,
        job_spec: dict[str, Any] | None = None,
        *,
        manifest: dict[str, Any] | None = None,
        fingerprint: dict[str, Any] | None = None,
        input_files: list[str] | None = None,
        lock: FolderLock | Lease | None = None,
        extra_fields: Iterable[pa.Field] = (),
        on_commit_phase: Callable[[str], None] | None = None,
    ):
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be at least 1, got {shard_rows}")
        self.storage = storage_of(output_dir)
        self.output_dir = self.storage.location
        self.shard_rows = shard_rows
        self.extra_fields = list(extra_fields)  # --keep-columns: the kept input columns, after OUTPUT_SCHEMA's
        self.schema = output_schema(self.extra_fields)
        own_lock = lock is None
        try:
            self.storage.ensure_folder()
            if lock is None:  # a caller that already holds the folder's lock passes it in
                lock = self.storage.lock()
                lock.acquire()
            self._lock = lock
        except OSError as e:
            raise BatchLLMError(f"cannot write to output folder {output_dir}: {e.strerror or e}") from None
        now = time.time()
        if manifest is not None:
            self.manifest = manifest
            if job_spec is not None:
                self.manifest["job"] = job_spec
            self.manifest.setdefault("runs", []).append({"started_at": now})
        else:
            files = list(input_files if input_files is not None else (job_spec or {}).get("inputs") or [])
            self.manifest = {
                "version": MANIFEST_VERSION,
                "job_id": uuid.uuid4().hex,
                "created_at": now,
                "job": job_spec or {},
                "fingerprint": fingerprint or {},
                "input_files": files,
                "shards": [],
                "runs": [{"started_at": now}],
            }
        self._file_ids = {p: i for i, p in enumerate(self.manifest.setdefault("input_files", []))}
        self._next_index = 1 + max((_shard_number(s["file"]) for s in self.manifest["shards"]), default=-1)
        # Under a lease (object stores) a run whose lease was taken over may still write late; names of
        # its own keep it from replacing (or deleting) a shard the new holder committed under the same
        # number. A local folder's flock cannot be lost, so local names stay plain.
        self._run_tag = f"-{uuid.uuid4().hex[:8]}" if isinstance(lock, Lease) else ""
        self._buffer: list[dict[str, Any]] = []
        self._buffer_requests = 0
        self.rows_written = 0  # rows committed by this writer (this run)
        self._on_phase = on_commit_phase or _no_phase
        self._unpromoted: list[str] = []  # listed shards whose rename failed: retried at close
        inputs = [*(input_files or []), *((job_spec or {}).get("inputs") or []), *self.manifest["input_files"]]
        try:
            claim_job_folder(self.storage, inputs)  # before anything in the folder is replaced or removed
            self._legacy = _is_batchllm_manifest(self.storage.read_bytes(LEGACY_MANIFEST))
            self._write_manifest()  # a new job's manifest replaces an old one first: old shards become orphans
            self._remove_orphans(new_job=manifest is None)
        except BaseException as e:
            if own_lock:
                lock.release()
            if isinstance(e, OSError):
                raise CommitError(f"cannot write to output folder {output_dir}: {e.strerror or e}") from None
            raise

    # ------------------------------------------------------------------------------------------ rows

    def add(self, row: dict[str, Any]) -> None:
        """Buffer one row that is a whole request by itself (an error record, or a single sample)."""
        self.add_request([row])

    def add_request(self, rows: Iterable[dict[str, Any]]) -> None:
        """Buffer every row of one request together; commits a shard once ``shard_rows`` are buffered."""
        self._buffer.extend(rows)
        self._buffer_requests += 1
        if len(self._buffer) >= self.shard_rows:
            self.flush()

    @property
    def buffered_rows(self) -> int:
        return len(self._buffer)

    # ------------------------------------------------------------------------------------------ commit

    def flush(self) -> None:
        """Commit the buffered rows as one shard (no-op when empty), then the manifest."""
        if not self._buffer:
            return
        name = f"shard-{self._next_index:05d}{self._run_tag}.parquet"
        data, entry = encode_shard(self._buffer, self.file_id, self.schema)
        entry["file"] = name
        self._lock.check()  # a run that lost its folder writes nothing more into it
        try:
            write_shard_file(self.storage, name, data)  # hidden, pending: no reader sees it yet
            self._on_phase("shard-written")
            self.manifest["shards"].append(entry)
            try:
                self._write_manifest()  # the commit point
            except BaseException:
                self.manifest["shards"].pop()  # the pending file is now an orphan: the next writer deletes it
                raise
            self._on_phase("manifest-written")
        except OSError as e:
            raise CommitError(
                f"cannot commit {name} to {self.output_dir}: {e.strerror or e} (the {len(self.manifest['shards'])} "
                "shards committed before stay valid)"
            ) from None
        self._next_index += 1
        self.rows_written += entry["rows"]
        self._buffer = []
        self._buffer_requests = 0
        self._promote(name)

    # ------------------------------------------------------------------ shards written by other processes

    def reserve_shard_name(self) -> str:
        """A shard name no other shard of this job uses, for another process to write
        (``write_shard_file``) and this writer to commit (``commit_entries``) or discard
        (``discard_shard``). Reserved names are never handed out twice, committed or not."""
        name = f"shard-{self._next_index:05d}{self._run_tag}.parquet"
        self._next_index += 1
        return name

    def commit_entries(self, entries: list[dict[str, Any]]) -> None:
        """List shards another process wrote (``encode_shard`` entries, ``file`` set to a reserved name)
        in the manifest: from this point they are done. The file must already be durable on disk."""
        if not entries:
            return
        try:
            for e in entries:
                if not (self.storage.exists(pending_name(e["file"])) or self.storage.exists(e["file"])):
                    raise CommitError(f"cannot commit {e['file']} to {self.output_dir}: the shard file is missing")
        except OSError as err:
            raise CommitError(f"cannot commit to {self.output_dir}: {err.strerror or err}") from None
        self.manifest["shards"].extend(entries)
        try:
            self._write_manifest()
        except BaseException as err:
            del self.manifest["shards"][-len(entries):]  # not listed: the files stay orphans, deleted later
            if isinstance(err, OSError):
                raise CommitError(f"cannot write the manifest in {self.output_dir}: {err.strerror or err}") from None
            raise
        self.rows_written += sum(e["rows"] for e in entries)
        for e in entries:
            self._promote(e["file"])

    def _promote(self, name: str) -> None:
        """Rename a just-listed shard from its pending name to its visible one. It is committed either
        way: a failure here is retried at ``close`` and by the next writer in the folder."""
        try:
            if self.storage.exists(pending_name(name)):
                self.storage.promote(pending_name(name), name)
        except OSError:
            self._unpromoted.append(name)
            return
        self._on_phase("shard-renamed")

    def write_manifest(self, **extra: Any) -> None:
        """Replace .manifest.json whole, after checking this process still holds the folder (a lost lease
        raises BatchLLMError and writes nothing); a failed write (disk full) raises ``CommitError``."""
        try:
            self._write_manifest(**extra)
        except OSError as e:
            raise CommitError(f"cannot write the manifest in {self.output_dir}: {e.strerror or e} (the "
                              f"{len(self.manifest['shards'])} shards committed before stay valid)") from None

    def _write_manifest(self, **extra: Any) -> None:
        """``write_manifest`` raising OSError."""
        self._lock.check()
        self.manifest.update(extra)
        self.manifest["updated_at"] = time.time()
        data = json.dumps(self.manifest, indent=1, sort_keys=True).encode()
        self.storage.replace(MANIFEST, data)
        if self._legacy:  # a folder of an earlier version: one manifest from now on, the new one
            _drop_legacy(self.storage)
            self._legacy = False

    def close(self, **summary: Any) -> None:
        """Commit what is buffered and record ``summary`` in the manifest; releases the folder lock."""
        try:
            self.flush()
            runs = self.manifest.get("runs") or [{}]
            runs[-1]["ended_at"] = time.time()
            self.write_manifest(**summary)
            for name in self._unpromoted[:]:
                self._unpromoted.remove(name)
                self._promote(name)
        finally:
            self._lock.release()

    def holds_folder(self) -> bool:
        """False once this process has lost the folder's lease (object stores): it must write nothing more."""
        return self._lock.holds()

    def abandon(self) -> None:
        """Drop buffered rows without committing (they will be redone) and release the folder lock."""
        self._buffer = []
        self._lock.release()

    # --------------------------------------------------------------------------------------- helpers

    def file_id(self, path: str) -> int:
        fid = self._file_ids.get(path)
        if fid is None:  # a row from a file the job spec did not list (direct library use)
            fid = self._file_ids[path] = len(self.manifest["input_files"])
            self.manifest["input_files"].append(path)
        return fid

    def _remove_orphans(self, new_job: bool = False) -> None:
        """Finish the rename of listed shards still under their pending name (a kill after the manifest
        write), then delete temporaries, pending files and shard files the manifest does not list (left
        by a killed process, an earlier version, or a previous job), and a new job's stale status file;
        only ever in a claimed folder, and only names batchllm writes (``is_job_file``)."""
        listed = {s["file"] for s in self.manifest["shards"]}
        names = set(self.storage.names())
        for name in sorted(listed):
            if pending_name(name) in names:  # the pending file is the committed bytes, whatever is visible
                self.storage.promote(pending_name(name), name)
        keep = listed | {MANIFEST, LEGACY_MANIFEST, LEGACY_STATUS} | ({STATUS} if not new_job else set())
        for name in self.storage.names():
            if is_job_file(name) and name not in keep:
                self.storage.remove(name)


def encode_shard(rows: list[dict[str, Any]], file_id: Callable[[str], int], schema: pa.Schema = OUTPUT_SCHEMA) -> tuple[bytes, dict[str, Any]]:
    """Serialise whole-request ``rows`` as one Parquet shard: its bytes and its manifest entry (all but
    ``file``): rows, sha256, counts, tokens, errors by code and the compact record of the input rows it
    finishes. ``file_id`` maps an input path to its position in the manifest's ``input_files``."""
    table = pa.Table.from_pylist(rows, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    entry = {"rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
             "committed_at": time.time()}
    entry.update(shard_stats(rows, file_id))
    return data, entry


def shard_bytes_problem(entry: dict[str, Any], data: bytes | None) -> str | None:
    """Why a shard's bytes (None: missing) do not match what ``encode_shard`` recorded in its manifest
    entry (size, then sha256; the full integrity check), or None when they do."""
    if data is None:
        return "missing"
    want = entry.get("bytes")
    if want is not None and len(data) != want:
        return f"{len(data):,} bytes, the manifest records {want:,}"
    if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return "sha256 differs from the manifest's"
    return None


def write_shard_file(output_dir: str | Storage, name: str, data: bytes) -> None:
    """Write shard bytes durably under the hidden ``pending_name(name)`` (locally: fsynced; on an object
    store: one PUT). Not yet committed: only a manifest entry makes a shard part of the job, and only
    then is it renamed to ``name`` (``ShardWriter.commit_entries``). Raises OSError (nothing is left)."""
    storage_of(output_dir).write_direct(pending_name(name), data)


def discard_shard(output_dir: str | Storage, name: str) -> None:
    """Delete an uncommitted shard (its pending file, temporary, or visible file of an earlier version),
    e.g. one a failed process wrote; a no-op when absent. Never call it on a name the manifest lists."""
    storage = storage_of(output_dir)
    storage.remove(pending_name(name))
    storage.remove(name)
    storage.remove(f".{name}.tmp")


def shard_stats(rows: list[dict[str, Any]], file_id: Callable[[str], int]) -> dict[str, Any]:
    """Counts for a shard's manifest entry and the compact record of the input rows it finishes."""
    done: dict[int, set[int]] = defaultdict(set)
    failed: set[tuple[int, int]] = set()
    errors: Counter[str] = Counter()
    prompt = completion = cached = samples = 0
    for r in rows:
        fid = file_id(r.get("input_file") or "")
        idx = int(r["input_index"])
        done[fid].add(idx)
        code = r.get("error_code")
        if code is not None:
            failed.add((fid, idx))
            errors[code] += 1
        else:
            samples += 1
            prompt += r.get("prompt_tokens") or 0
            completion += r.get("completion_tokens") or 0
            cached += r.get("cached_tokens") or 0
    total = sum(len(v) for v in done.values())
    return {
        "requests": {"completed": total - len(failed), "failed": len(failed)},
        "samples": samples,
        "tokens": {"prompt": prompt, "completion": completion, "cached": cached},
        "errors_by_code": dict(sorted(errors.items())),
        "done": encode_done({fid: sorted(v) for fid, v in done.items()}),
    }


def _shard_number(name: str) -> int:
    return int(name.removeprefix("shard-").split(".")[0].split("-")[0])


def _no_phase(phase: str) -> None:
    pass


def committed_totals(manifest: dict[str, Any]) -> dict[str, Any]:
    """Sums over the manifest's shards: rows, requests completed/failed, samples, tokens, errors by code."""
    out: dict[str, Any] = {"shards": 0, "rows": 0, "completed": 0, "failed": 0, "samples": 0,
                           "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0, "errors_by_code": Counter()}
    for s in manifest.get("shards", []):
        out["shards"] += 1
        out["rows"] += s.get("rows", 0)
        req = s.get("requests") or {}
        out["completed"] += req.get("completed", 0)
        out["failed"] += req.get("failed", 0)
        out["samples"] += s.get("samples", 0)
        tok = s.get("tokens") or {}
        out["prompt_tokens"] += tok.get("prompt", 0)
        out["completion_tokens"] += tok.get("completion", 0)
        out["cached_tokens"] += tok.get("cached", 0)
        out["errors_by_code"].update(s.get("errors_by_code") or {})
    out["errors_by_code"] = dict(sorted(out["errors_by_code"].items()))
    return out


def read_results(output_dir: str | Storage, verify: bool = False) -> pa.Table:
    """All committed rows of a job folder (shards listed in the manifest), in commit order.

    ``verify`` checks each shard's size and sha256 against the manifest (``DamagedJob`` on a mismatch).
    Shards written before ``request_type`` existed get it as a null column. BatchLLMError when the
    folder holds no job (``read_manifest``).
    """
    storage = storage_of(output_dir)
    manifest = read_manifest(storage)
    if manifest is None:
        raise BatchLLMError(f"{storage.location} holds no batchllm job (no {MANIFEST})")
    tables = [_read_shard(storage, s, verify) for s in manifest["shards"]]
    if not tables:
        return OUTPUT_SCHEMA.empty_table()
    return pa.concat_tables(tables)


def _read_shard(output_dir: str | Storage, entry: dict[str, Any], verify: bool) -> pa.Table:
    """One listed shard as a table of ``OUTPUT_SCHEMA``; ``verify``: its bytes must match the manifest's
    size and sha256 (``DamagedJob`` otherwise, naming the repair)."""
    storage = storage_of(output_dir)
    if verify:
        data = read_shard_bytes(storage, entry["file"])
        problem = shard_bytes_problem(entry, data)
        if problem is not None:
            raise DamagedJob(f"{storage.display(entry['file'])}: {problem}; repair with: batchllm resume "
                             f"{storage.location} --repair (drops the damaged shards and reruns their rows)")
        return shard_table(data)
    try:
        f = storage.open_input(pending_name(entry["file"]))  # committed, not renamed yet (see read_shard_bytes)
    except (FileNotFoundError, OSError):
        f = storage.open_input(entry["file"])
    with f:
        table = pq.read_table(f)
    return _conform(table)


def shard_table(data: bytes) -> pa.Table:
    """A shard's bytes as a table of ``OUTPUT_SCHEMA``."""
    return _conform(pq.read_table(pa.BufferReader(data)))


def _conform(table: pa.Table) -> pa.Table:
    # shards written before a column existed (``request_type``, ``prompt_logprobs``, ``logprob_tokens``)
    # get it as nulls, and struct fields added since (``token``, ``bytes``) come as nulls from the cast
    for field in OUTPUT_SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    kept = [name for name in table.column_names if name not in OUTPUT_SCHEMA.names]  # --keep-columns, as written
    conformed = table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
    for name in kept:
        conformed = conformed.append_column(table.schema.field(name), table[name])
    return conformed
