"""The job driver: read -> tokenize -> plan -> engine -> write.

``run_job`` is what ``batchllm run`` and ``batchllm resume`` call. Each stage lives in its own module;
this one only wires them together and keeps the counters for the summary: reading and tokenizing
(``read_and_tokenize``, ``io.tokenize``), planning (``plan_requests``), a model and an engine
(``batchllm.build``), the engine run (``batchllm.execute.run_plan``), output rows and the summary
(``jobs.results``).

Durable jobs (``batchllm.jobs``): before the weights load, the job's fingerprint is checked against the
output folder's manifest (a new job, a resume, or a refusal naming what changed); rows the manifest
records as done are skipped while reading, so planning sees only the remaining requests; SIGINT /
SIGTERM stop admission after the current engine step, commit every complete request and raise
``JobInterrupted``; the status file (``.status.json``) follows the job throughout.

Scale-out (``--replicas N`` / ``--ray-address``): reading, tokenizing, planning and every manifest write
stay in this process; the engine stage runs on Ray replicas (``batchllm.distributed``), which get
subsets of the job's plan and write their shards for this process to commit. Ray is imported only then.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import torch

from batchllm.build import EngineFactory, LoadedModel, load_model, make_engine, model_max_len, resolve_device, resolve_dtype
from batchllm.config import JobConfig
from batchllm.engine.engine import StepStats
from batchllm.engine.sequence import Sequence
from batchllm.errors import BatchLLMError
from batchllm.execute import EngineCallbacks, run_plan
from batchllm.io.readers import ColumnMapping, input_identity, read_requests, resolve_keep_columns
from batchllm.io.requests import Request, RowError
from batchllm.io.storage import is_uri
from batchllm.io.token_store import TokenSpill, TokenStore, drop_ids, set_ids
from batchllm.io.tokenize import max_prompt_chars, read_ahead, tokenize
from batchllm.io.writer import KEPT_JSON_METADATA, OUTPUT_SCHEMA, CommitError, ShardWriter, check_inputs_outside
from batchllm.jobs.folder import JobFolder, open_job_folder
from batchllm.jobs.manifest import build_fingerprint
from batchllm.jobs.recorder import ResultRecorder
from batchllm.jobs.results import JobSummary, batch_stats, record_error
from batchllm.jobs.signals import JobInterrupted, StopFlag, stop_on_signals
from batchllm.jobs.status import CANCELLED, COMPLETED, FAILED, StatusFile
from batchllm.models import loader
from batchllm.models.config import ModelConfig
from batchllm.plan.kv_estimate import estimate_peak_kv_tokens
from batchllm.plan.plan import Plan, plan_requests
from batchllm.plan.stats import plan_stats

if TYPE_CHECKING:
    from batchllm.distributed.driver import RayCluster
    from batchllm.distributed.replica import ReplicaHooks

ProgressHook = Callable[[str, dict], None]

def read_and_tokenize(
    cfg: JobConfig,
    tokenizer,
    mcfg: ModelConfig,
    max_model_len: int,
    on_error: Callable[[RowError], None],
    folder: JobFolder | None = None,
    stop: StopFlag | None = None,
    keep: dict[str, bool] | None = None,
    spill: TokenSpill | None = None,
    store: TokenStore | None = None,
) -> list[Request]:
    """READ + TOKENIZE: every valid request with its token ids; every bad row goes to ``on_error``.

    ``spill`` (a local job folder): each batch's token ids go to the job's token file as soon as they are
    tokenized and leave memory; once every row is read the store is committed and each request's
    ``token_ids`` (and a token-id row's ``prompt_token_ids``) is a read-only view of the mapped file. A
    run stopped while reading abandons the spill (its requests are not run). ``store`` (a resumed job
    whose earlier run committed its store): rows found there take their ids from it, untokenized; others
    are tokenized as usual.

    With a resumed ``folder``, rows it records as done are left out: unread when the earlier run got past
    its read phase (``JobFolder.skip_masks``), else read and dropped. ``keep``: the kept input columns
    (``kept_columns``), whose values the records carry. Records carry the input paths the
    job first recorded (``input_files``), so every shard of a job names its inputs the same way.

    A thread reads the next batch of ``_TOKENIZE_BATCH`` rows while this one tokenizes the current one
    (the tokenizer's batched encoding releases the GIL); at most ``_READ_AHEAD`` batches wait between
    them. Requests come back in input order; ``on_error`` is called on this thread only, a batch's read
    errors before its tokenization errors.
    """
    mapping = _column_mapping(cfg)
    skip = folder.skip_masks(cfg.inputs) if folder is not None and folder.resuming else None
    done = folder.done if folder is not None and folder.resuming and skip is None else None
    file_ids = {p: i for i, p in enumerate(cfg.inputs)}
    names = (folder.manifest.get("input_files") if folder is not None and folder.resuming else None) or cfg.inputs
    limit = max_prompt_chars(tokenizer, max_model_len)

    def batches() -> Iterator[list[Request | RowError]]:
        rows = read_requests(cfg.inputs, mapping, cfg.sampling_defaults(), skip=skip, max_prompt_chars=limit, keep=keep, split=cfg.split)
        batch: list[Request | RowError] = []
        for k, item in enumerate(rows):
            fid = file_ids[item.input_file]
            if done is not None and done.contains(fid, item.input_index):
                continue
            item.input_file = names[fid]
            batch.append(item)
            if len(batch) == _TOKENIZE_BATCH:
                yield batch
                batch = []
            if stop is not None and stop and k % 1024 == 0:
                break  # run_job notices the flag and stops before planning
        if batch:
            yield batch

    fid_of = {name: i for i, name in enumerate(names)}
    requests: list[Request] = []
    spans: list[np.ndarray] = []  # with ``spill``: per batch, (offset, length) of its requests' ids in the file
    try:
        for batch in read_ahead(batches(), _READ_AHEAD):
            rows: list[Request] = []
            todo: list[Request] = []
            for item in batch:
                if isinstance(item, RowError):
                    on_error(item)
                    continue
                rows.append(item)
                ids = store.lookup(fid_of[item.input_file], item.input_index) if store is not None else None
                if ids is None:
                    todo.append(item)
                else:  # tokenized by the earlier run of this job
                    set_ids(item, ids)
            ok, errors = tokenize(todo, tokenizer, max_model_len, mcfg.vocab_size)
            tokenized, asked = {id(r) for r in ok}, {id(r) for r in todo}
            ok = [r for r in rows if id(r) in tokenized or id(r) not in asked]  # input order; store hits included
            if spill is not None and ok:
                offsets = spill.add(np.fromiter((fid_of[r.input_file] for r in ok), np.int32, len(ok)),
                                    np.fromiter((r.input_index for r in ok), np.int64, len(ok)), [r.token_ids for r in ok])
                spans.append(np.stack([offsets, np.fromiter((len(r.token_ids) for r in ok), np.int64, len(ok))], axis=1))
                for r in ok:  # on disk now: the view of the mapped file replaces it once reading ends
                    drop_ids(r)
            requests.extend(ok)
            for e in errors:
                on_error(e)
        if spill is not None:
            if stop is not None and stop:
                spill.abandon()  # run_job stops before planning; a resume reads (and spills) again
            else:
                mapped = spill.commit()
                for r, (offset, length) in zip(requests, np.concatenate(spans) if spans else []):
                    set_ids(r, mapped.view(int(offset), int(length)))
    except BaseException:
        if spill is not None:
            spill.abandon()
        raise
    return requests


# Rows per tokenizer call: large enough that the Rust threads amortise their start, small enough that
# reading and tokenizing overlap from the first seconds of a job.
_TOKENIZE_BATCH = 4096
_READ_AHEAD = 2


def job_stats(cfg: JobConfig, kv_dtype_bytes: int = 2) -> dict:
    """``batchllm stats``: how much prefix sharing the job's prompts offer and what the plan gets.

    Loads only the model's config and tokenizer, never its weights. ``peak_kv_gb`` is the plan's peak KV
    memory for this model when requests run to their max_tokens with no memory limit (coarse model:
    ``estimate_peak_kv_tokens``), at ``kv_dtype_bytes`` per element, or one with an fp8
    ``cfg.kv_cache_dtype``.
    """
    src = loader.resolve_model(cfg.model)
    mcfg = loader.load_config(src)
    tok = loader.load_tokenizer(src, cfg.tokenizer, cfg.chat_template)
    max_model_len = model_max_len(cfg, mcfg)
    errors: dict[str, int] = {}
    requests = read_and_tokenize(cfg, tok, mcfg, max_model_len, lambda e: errors.__setitem__(e.error_code, errors.get(e.error_code, 0) + 1))
    if not requests:
        raise BatchLLMError("no valid request in the input")
    expected = np.array([r.sampling.max_tokens * r.sampling.n for r in requests], dtype=np.float64)
    lens = np.array([len(r.token_ids) for r in requests], dtype=np.int64)
    plan = plan_requests(requests, "batchllm", max_model_len, cfg.page_size)  # what `batchllm run` would plan
    out = plan_stats(plan, lens)
    kv = estimate_peak_kv_tokens(plan, lens, expected)
    out.update(
        model=src.display_name,
        row_errors=sum(errors.values()),
        errors_by_code=errors,
        expected_output_tokens=int(expected.sum()),
        peak_kv_tokens=kv.peak_kv_tokens,
        peak_kv_gb=kv.peak_kv_tokens * mcfg.kv_bytes_per_token(1 if cfg.kv_cache_dtype != "auto" else kv_dtype_bytes) / 1e9,
        peak_running=kv.peak_running,
    )
    return out



@dataclasses.dataclass(frozen=True)
class _Job:
    """What ``run_job`` was asked to do, as its stages see it (``cfg`` with absolute paths)."""

    cfg: JobConfig
    emit: ProgressHook
    summary: JobSummary
    loaded: LoadedModel | None  # a model already in memory (tests, bench), else loaded when needed
    engine_factory: EngineFactory | None  # in place of make_engine (one process)
    cluster: RayCluster | None  # Ray replicas run the engine stage (scale-out)
    replica_hooks: ReplicaHooks | None  # given to every replica (tests)


@dataclasses.dataclass(frozen=True)
class _Output:
    """The job's open output folder, and the model identity it was opened with."""

    src: loader.ModelSource
    tokenizer: Any
    folder: JobFolder
    writer: ShardWriter
    recorder: ResultRecorder
    stop: StopFlag


def run_job(cfg: JobConfig, progress: ProgressHook | None = None, loaded: LoadedModel | None = None, *, overwrite: bool = False,
            engine_factory: EngineFactory | None = None, replica_hooks: ReplicaHooks | None = None) -> JobSummary:
    """Run a whole job, or what is left of it; ``progress(event, info)`` gets 'ray_starting' (scale-out), 'resumed', 'read',
    'loaded', 'planned', 'step' and 'done' (no 'loaded' / 'planned' when nothing is left to generate).

    ``overwrite`` deletes a previous job's results in the output folder instead of resuming it.
    ``engine_factory`` builds the single-process engine in place of ``make_engine`` (same signature and
    contract: a fresh engine state for this run); ``batchllm bench`` passes one that reuses its KV cache
    and decode graphs across runs. ``replica_hooks`` goes to every Ray replica (``ReplicaHooks``: tests
    inject faults through it). Raises
    ``JobInterrupted`` after a SIGINT / SIGTERM (complete requests committed), ``CommitError`` when the
    output cannot be written (committed shards stay valid), ``BatchLLMError`` for other job-level failures.
    """
    cfg.validate()
    cfg = cfg.with_absolute_paths()
    if len(set(cfg.inputs)) != len(cfg.inputs):  # rows are keyed by (input position, row index)
        raise BatchLLMError("the same input file is given twice")
    check_inputs_outside(cfg.output, cfg.inputs)  # before the folder is opened, let alone claimed
    emit = progress or (lambda event, info: None)
    read_requests(cfg.inputs, _column_mapping(cfg), cfg.sampling_defaults(), split=cfg.split)  # unreadable inputs fail now, before any loading

    cluster = None
    if cfg.distributed:  # Ray first: the replicas' device (GPU or CPU) decides the dtype, part of the job's identity
        from batchllm.distributed.driver import RayCluster

        emit("ray_starting", {"address": cfg.ray_address, "replicas": cfg.replicas})
        cluster = RayCluster(cfg)
    try:
        job = _Job(cfg=cfg, emit=emit, summary=JobSummary(), loaded=loaded, engine_factory=engine_factory, cluster=cluster,
                   replica_hooks=replica_hooks)
        return _run_job(job, overwrite)
    finally:
        if cluster is not None:
            cluster.close()


def _run_job(job: _Job, overwrite: bool) -> JobSummary:
    """Open the job folder (identity first: the tokenizer and the weights' identity, not the weights), then
    run inside the signal handlers, keeping the status file true to the end."""
    cfg, loaded = job.cfg, job.loaded
    src = loader.resolve_model(cfg.model)
    if job.cluster is not None:
        dtype = job.cluster.dtype = resolve_dtype(cfg.dtype, torch.device(job.cluster.device))
    else:
        dtype = loaded.dtype if loaded is not None else resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    overridden = cfg.tokenizer is not None or cfg.chat_template is not None  # --tokenizer / --chat-template
    tok = loaded.tokenizer if loaded is not None and not overridden else loader.load_tokenizer(src, cfg.tokenizer, cfg.chat_template)
    if cfg.chat and not getattr(tok, "chat_template", None):
        raise BatchLLMError(f"--chat needs a chat template and {src.display_name}'s tokenizer has none: drop --chat (prompts "
                            "are then sent as raw text) or use a model that ships a chat template")
    extra_fields = output_fields(cfg)  # --keep-columns: checked before the folder is touched
    fingerprint = job_fingerprint(cfg, src, tok, dtype)
    folder = open_job_folder(cfg.output, fingerprint, overwrite=overwrite)
    try:
        writer = ShardWriter(cfg.output, cfg.shard_rows, job_spec=cfg.to_dict(), manifest=folder.manifest,
                             fingerprint=fingerprint, input_files=cfg.inputs, lock=folder.lock,
                             extra_fields=extra_fields)
    except BaseException:
        folder.lock.release()
        raise
    m = writer.manifest
    status = StatusFile(cfg.output, m["job_id"], m["created_at"], m["input_files"], src.display_name)
    recorder = ResultRecorder(writer, status)
    job.summary.done_before = recorder.done_before
    if folder.resuming:
        job.emit("resumed", {"done": recorder.done_before, "output": cfg.output})
    recorder.update_status(stage="loading", force=True)
    try:
        with stop_on_signals() as stop:
            _run(job, _Output(src=src, tokenizer=tok, folder=folder, writer=writer, recorder=recorder, stop=stop))
    except JobInterrupted:
        status.finish(CANCELLED)
        raise
    except CommitError as e:
        owned = writer.holds_folder()  # a run that lost the folder leaves its status to the new holder
        writer.abandon()
        if owned:
            status.finish(FAILED, str(e))
        raise CommitError(f"{e}; fix that, then resume with: batchllm resume {cfg.output}") from None
    except BaseException as e:
        owned = writer.holds_folder()
        writer.abandon()
        if owned:
            status.finish(FAILED, str(e) or type(e).__name__)
        raise
    status.finish(COMPLETED)
    job.emit("done", {})
    return job.summary


def _column_mapping(cfg: JobConfig) -> ColumnMapping:
    return ColumnMapping(cfg.id_column, cfg.prompt_column, cfg.messages_column, cfg.prompt_template, cfg.system_prompt, cfg.chat)


def output_fields(cfg: JobConfig) -> list[pa.Field]:
    """--keep-columns: the output columns after ``OUTPUT_SCHEMA``'s, one per kept input column, typed as in
    the input or JSON text (a string column with ``KEPT_JSON_METADATA``): ``readers.resolve_keep_columns``.
    Empty without the option; a bad one raises BatchLLMError."""
    if not cfg.keep_columns:
        return []
    kept = resolve_keep_columns(cfg.inputs, cfg.keep_columns, _column_mapping(cfg), OUTPUT_SCHEMA.names, split=cfg.split)
    return [pa.field(name, pa.string(), metadata=KEPT_JSON_METADATA) if t is None else pa.field(name, t) for name, t in kept]


def kept_columns(fields: list[pa.Field]) -> dict[str, bool]:
    """The reader's ``keep`` for ``output_fields``: column name -> stored as JSON text."""
    return {f.name: all((f.metadata or {}).get(k) == v for k, v in KEPT_JSON_METADATA.items()) for f in fields}


def job_fingerprint(cfg: JobConfig, src: loader.ModelSource, tok, dtype: torch.dtype) -> dict:
    """What changes this job's outputs (``batchllm.jobs.manifest.build_fingerprint``); ``cfg`` with
    absolute paths. Inputs are identified through ``readers.input_identity``: a local path as the
    manifest module does, a URI through its filesystem, a hub dataset by its cached data, ``--split``
    included."""
    sampling = dataclasses.asdict(cfg.sampling_defaults())
    for key in ("structured", "prompt_logprobs"):  # folders written before these fields have no such key: they resume
        if sampling[key] is None:
            del sampling[key]
    fp = build_fingerprint(
        weights=loader.weights_fingerprint(src), model_name=src.display_name, tokenizer=tok,
        sampling=sampling, seed=cfg.seed, columns=cfg.column_mapping_dict(),
        max_model_len=cfg.max_model_len, dtype=str(dtype).removeprefix("torch."), inputs=[],
    )
    fp["inputs"] = [input_identity(p, cfg.split) for p in cfg.inputs]
    if cfg.kv_cache_dtype != "auto":  # folders written before --kv-cache-dtype have no such key: they resume
        fp["kv_cache_dtype"] = "fp8_e4m3"  # fp8 and fp8_e4m3 are one format: one job
    return fp


def _run(job: _Job, out: _Output) -> None:
    """READ + TOKENIZE (remaining rows only) -> PLAN -> LOAD -> ENGINE -> WRITE, inside the signal handlers.

    The weights load only once there is something to generate: rerunning a finished job costs no load.
    """
    cfg, summary, writer, recorder = job.cfg, job.summary, out.writer, out.recorder
    mcfg = job.loaded.config if job.loaded is not None else loader.load_config(out.src)
    max_model_len = model_max_len(cfg, mcfg)
    t0 = time.perf_counter()
    recorder.update_status(stage="reading", force=True)
    spill, store = _token_files(cfg, out)
    requests = read_and_tokenize(cfg, out.tokenizer, mcfg, max_model_len, lambda e: record_error(summary, recorder, e), out.folder,
                                 out.stop, keep=kept_columns(writer.extra_fields), spill=spill, store=store)
    read_seconds = time.perf_counter() - t0
    _check_stop(out.stop, cfg, writer)
    # Commit the read phase's error records now: from here on a resume may skip finished rows unread
    # (every duplicate custom_id is then a committed error row; see batchllm.jobs.folder).
    writer.flush()
    writer.write_manifest(read_complete=True)
    summary.requests = recorder.done_before + len(requests) + summary.errors
    recorder.status.set_counts(total=summary.requests)

    job.emit("read", {"requests": len(requests), "errors": summary.errors, "model": out.src.display_name})
    if not requests:  # nothing (left) to generate
        _close_run(writer, recorder, summary)
        return
    plan = plan_requests(requests, cfg.policy, max_model_len, cfg.page_size)
    if cfg.policy != "fcfs-lru":  # the baseline plans no sharing: it promises no saving
        summary.planned_saving, summary.max_saving = plan.saving(), plan.max_saving()
    if job.cluster is not None:  # the engine runs on Ray replicas; this process plans, commits and reports
        from batchllm.distributed.driver import DistributedJob, run_distributed

        t0 = time.perf_counter() - read_seconds
        stopped = run_distributed(job.cluster, DistributedJob(
            cfg=cfg, requests=requests, plan=plan, emit=job.emit, summary=summary, writer=writer, recorder=recorder,
            stop=out.stop, model_name=out.src.display_name, hooks=job.replica_hooks))
        summary.wall_seconds = time.perf_counter() - t0 - summary.load_seconds  # reading counts, starting replicas not
    else:
        stopped = _generate(job, out, requests, plan, max_model_len, read_seconds)
    _close_run(writer, recorder, summary)
    if stopped:
        raise JobInterrupted(out.stop.signum, cfg.output, writer.rows_written)


def _token_files(cfg: JobConfig, out: _Output) -> tuple[TokenSpill | None, TokenStore | None]:
    """(a spill for this run's tokens, the store an earlier run of this job committed): at most one is
    set; neither for a job folder on an object store (``io.token_store``)."""
    if is_uri(cfg.output):
        return None, None
    job_id = out.writer.manifest["job_id"]
    store = TokenStore.open(cfg.output, job_id) if out.folder.resuming else None
    return (None, store) if store is not None else (TokenSpill(cfg.output, job_id), None)


def _generate(job: _Job, out: _Output, requests: list[Request], plan: Plan, max_model_len: int, read_seconds: float) -> bool:
    """LOAD -> ENGINE in this process: the model (unless given), the engine, ``run_plan`` with the job's
    recorder, progress and stop flag. Fills the summary; True when a signal stopped it."""
    cfg, summary, recorder, stop = job.cfg, job.summary, out.recorder, out.stop
    t_load = time.perf_counter()
    lm = job.loaded or load_model(cfg, src=out.src, tokenizer=out.tokenizer)  # the tokenizer the fingerprint saw
    if lm.tokenizer is not out.tokenizer:  # a preloaded model under --tokenizer / --chat-template: the job's tokenizer decodes
        lm = dataclasses.replace(lm, tokenizer=out.tokenizer)
    summary.load_seconds = time.perf_counter() - t_load
    job.emit("loaded", {"model": lm.source.display_name, "device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch.")})
    planned_budget = token_budget(requests, max_model_len)
    job.emit("planned", {"requests": len(requests), "samples": sum(r.sampling.n for r in requests), "errors": summary.errors,
                         "done_before": summary.done_before, "token_budget": planned_budget})
    _check_stop(stop, cfg, out.writer)
    t0 = time.perf_counter() - read_seconds  # wall time counts reading, not the weights' load

    engine, eos = (job.engine_factory or make_engine)(cfg, lm, max_model_len)
    # Progress over the output token budget (each sample's max_tokens): it moves with every generated
    # token, so it advances while requests run even when all of them run at once; a sample that stops
    # early releases the rest of its budget, and requests the KV pool cannot hold release theirs.
    max_len = engine.cfg.max_model_len
    progress = {"released": planned_budget - token_budget(requests, max_len), "done": 0}  # the context the pool cuts

    def too_long(req: Request, err: RowError) -> None:
        record_error(summary, recorder, err)
        progress["released"] += req.sampling.n * _sample_budget(req, max_len)  # its whole budget

    def finished(index: int, req: Request, seq: Sequence, row: dict) -> None:
        recorder.sample(index, req.sampling.n, row)
        summary.samples += 1
        summary.prompt_tokens += seq.prompt_len
        summary.cached_tokens += seq.num_cached
        summary.output_tokens += len(seq.output_ids)
        progress["released"] += max(0, _sample_budget(req, max_len) - len(seq.output_ids))  # stopped early

    def step(stats: StepStats) -> None:
        released, progress["released"] = progress["released"], 0
        prompt = stats.num_tokens - stats.num_decodes  # prompt tokens computed (prefill chunks, shared prefixes)
        progress["done"] += stats.new_output_tokens + released
        job.emit("step", {"finished": stats.num_finished, "new_tokens": stats.new_output_tokens, "prompt_tokens": prompt,
                          "released": released})
        recorder.engine_step(stats.new_output_tokens, prompt, progress["done"] / planned_budget if planned_budget else None)
        recorder.update_status()

    recorder.status.generation_started(recorder.done_before)
    recorder.update_status(stage="generating", force=True)
    run = run_plan(engine, eos, requests, plan, seed=cfg.seed, page_size=cfg.page_size, preview=cfg.preview,
                   callbacks=EngineCallbacks(too_long, finished, step, lambda: bool(stop)))
    summary.wall_seconds = time.perf_counter() - t0
    summary.preview = run.preview
    summary.num_steps, summary.batch_seqs, summary.batch_tokens = batch_stats([s.num_seqs for s in run.steps],
                                                                              [s.num_tokens for s in run.steps])
    summary.num_preemptions, summary.prompt_tokens_computed = run.num_preemptions, run.prompt_tokens_computed
    return run.stopped


def _close_run(writer: ShardWriter, recorder: ResultRecorder, summary: JobSummary) -> None:
    """Commit what is buffered with the run's summary, and bring the status file up to date."""
    writer.close(summary=summary.to_dict())
    recorder.update_status(force=True)


def _check_stop(stop: StopFlag, cfg: JobConfig, writer: ShardWriter) -> None:
    """Between stages: on a stop signal, commit what is complete and raise JobInterrupted."""
    if stop:
        writer.close()
        raise JobInterrupted(stop.signum, cfg.output, writer.rows_written)


def _sample_budget(req: Request, max_model_len: int) -> int:
    """The most output tokens one sample of ``req`` can get: max_tokens, or what the context leaves."""
    return max(1, min(req.sampling.max_tokens, max_model_len - len(req.token_ids)))


def token_budget(requests: list[Request], max_model_len: int) -> int:
    """The job's output token budget, the unit of the progress bar: every sample's ``_sample_budget``."""
    return sum(r.sampling.n * _sample_budget(r, max_model_len) for r in requests)
