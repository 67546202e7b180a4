"""One engine replica: loads the model once, then runs work units (whole prefix groups) on request.

``Replica`` is a plain class; the driver turns it into a Ray actor (``ray.remote(...)(Replica)``, one
GPU each, or none with ``--device cpu``), so this module imports no Ray and can run in-process in tests.
The actor is threaded (``max_concurrency=2``): ``run_unit`` runs in one thread while ``progress`` and
``stop`` answer from the other.

Contracts:
- ``run_unit`` runs a subset of the job's plan (``Plan.subset``: whole groups with their outer
  prefixes) through the same engine and the same ``execute.run_plan`` as a single-process run, so a
  request's samples (seeded from job seed, custom_id and sample index) are the same whichever replica
  runs them and with whatever neighbours.
- Prompts' ids: a request whose ids are in the job's token store (``io.token_store``; local job folders)
  arrives without them, and the replica reads them from the shared job folder (mapped read-only, by
  input file and row); other requests (object-store folders) carry their ids.
- Results go to ONE shard file under the name the driver reserved, written durably but not committed:
  the returned manifest entry is what the driver lists in the manifest. A replica never touches the
  manifest, the folder lock or the status file.
- Whole requests only, as in ``jobs.recorder``: after ``stop`` the unit ends after the current engine
  step and its shard holds the requests that completed; the others are not in its done record, so a
  resume redoes them.
- Prompts longer than this replica's KV pool holds (``engine.cfg.max_model_len``, which ``make_engine``
  lowers to the pool size when the pool is smaller than the context) become ``prompt_too_long`` error
  rows in the unit's shard, as in one process (``run_plan``): they never reach the engine, which could
  not schedule them.
- Failures: an exception out of the engine (or anything else in ``run_unit``) propagates to the driver,
  which retries the unit elsewhere (see ``driver``); the engine starts each run from a fresh page pool,
  so the replica stays usable. A shard that cannot be written raises ``CommitError`` (a job-level
  failure: a full disk or a missing bucket is not fixed by another replica).
- The output folder is a path or a pyarrow filesystem URI (``batchllm.io.storage``); the replica writes
  its shard through the same storage as the driver, never the manifest, status or lock.
- ``ReplicaHooks``: an optional object the job passes in (``run_job(..., replica_hooks=...)``), pickled
  to every replica, called where tests inject faults: at start, after every engine step, after a shard
  is written. Production runs pass none.
- Tensor parallelism later: a replica is the unit that owns "one model instance"; a TP replica would
  hold several GPUs (``num_gpus=k``, placement group) and run a TP engine behind this same interface.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

import numpy as np

from batchllm.config import JobConfig
from batchllm.io.requests import Request, RowError
from batchllm.io.token_store import TokenStore, attach
from batchllm.io.storage import storage_of
from batchllm.io.writer import CommitError, encode_shard, write_shard_file
from batchllm.plan.plan import Plan


class ReplicaHooks(Protocol):
    """Points where the job's caller acts inside every replica (tests inject faults here). The object is
    pickled to each replica, which calls its own copy; an exception from a hook is a failure at that point:
    the replica cannot start (``started``), the unit fails (``engine_step``, ``shard_written``)."""

    def started(self, replica_id: int) -> None:
        """The replica starts, before its model loads."""

    def engine_step(self, replica_id: int, unit_id: int, requests: Mapping[int, Request]) -> None:
        """An engine step of unit ``unit_id`` (its requests) ended."""

    def shard_written(self, replica_id: int, shard_name: str) -> None:
        """A unit's shard was written, before the driver has it (or commits it)."""


class UnitResult(NamedTuple):
    """What ``Replica.run_unit`` returns to the driver."""

    unit: int
    replica: int
    entry: dict[str, Any] | None  # the shard's manifest entry; None when no row was written
    stopped: bool
    error_samples: int  # samples of the prompt_too_long rows (the driver's progress planned them)
    seconds: float
    preview: list[dict[str, str]]
    prompt_tokens_computed: int
    num_preemptions: int
    step_seqs: np.ndarray  # sequences per engine step
    step_tokens: np.ndarray  # tokens per engine step


class Replica:
    def __init__(self, job_spec: dict[str, Any], input_files: list[str], job_id: str, replica_id: int,
                 hooks: ReplicaHooks | None = None):
        # imported here: the driver process never needs torch's engine stack for this module
        from batchllm.build import load_model, make_engine, model_max_len

        t0 = time.perf_counter()
        self.cfg = JobConfig.from_spec(job_spec)
        self.replica_id = replica_id
        self.hooks = hooks
        if hooks is not None:
            hooks.started(replica_id)
        self.storage = storage_of(self.cfg.output)  # one filesystem client for every shard
        self.file_ids = {p: i for i, p in enumerate(input_files)}
        self.job_id = job_id
        self._store: TokenStore | None = None  # the job folder's token store, mapped at the first unit needing it
        self.lm = load_model(self.cfg)
        self.max_model_len = model_max_len(self.cfg, self.lm.config)
        self.engine, self.eos = make_engine(self.cfg, self.lm, self.max_model_len)
        self.load_seconds = time.perf_counter() - t0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._live = self._zero()

    @staticmethod
    def _zero() -> dict[str, Any]:
        return {"unit": None, "requests": 0, "samples": 0, "new_tokens": 0, "prompt": 0, "completion": 0, "cached": 0}

    def ready(self) -> dict[str, Any]:
        """Who and where this replica is; answering at all means the model is loaded."""
        node = None
        try:
            import ray

            node = ray.util.get_node_ip_address()
        except Exception:  # in-process use, no Ray
            pass
        return {"replica": self.replica_id, "pid": os.getpid(), "node": node, "device": str(self.lm.device),
                "dtype": str(self.lm.dtype).removeprefix("torch."), "model": self.lm.source.display_name,
                "load_seconds": self.load_seconds}

    def stop(self) -> None:
        """Finish the running unit after its current engine step (complete requests are kept)."""
        self._stop.set()

    def progress(self) -> dict[str, Any]:
        """The running unit's counts so far (requests whole, samples, tokens); zeros when idle."""
        with self._lock:
            return dict(self._live)

    def run_unit(self, unit_id: int, shard_name: str, plan: Plan, requests: dict[int, Request]) -> UnitResult:
        """Run ``plan`` (a ``Plan.subset`` of the job's plan; ``requests``: its members by global index) and
        write its rows, whole requests only, as ``shard_name``."""
        from batchllm.execute import EngineCallbacks, run_plan
        from batchllm.jobs.results import error_row

        with self._lock:
            self._live = self._zero()
            self._live["unit"] = unit_id
        rows: list[dict[str, Any]] = []
        pending: dict[int, list[dict[str, Any]]] = {}  # request index -> its finished samples' rows so far
        error_samples = 0

        def too_long(req: Request, err: RowError) -> None:
            nonlocal error_samples
            error_samples += req.sampling.n
            rows.append(error_row(err))

        def finished(index: int, req: Request, seq, row: dict[str, Any]) -> None:
            got = pending.setdefault(index, [])
            got.append(row)
            done = len(got) == req.sampling.n
            if done:  # the shard holds whole requests only
                del pending[index]
                rows.extend(sorted(got, key=lambda r: r["sample_index"]))
            with self._lock:
                live = self._live
                live["samples"] += 1
                live["prompt"] += seq.prompt_len
                live["completion"] += len(seq.output_ids)
                live["cached"] += seq.num_cached
                live["requests"] += int(done)

        def step(stats) -> None:
            with self._lock:
                self._live["new_tokens"] += stats.new_output_tokens
            if self.hooks is not None:
                self.hooks.engine_step(self.replica_id, unit_id, requests)

        self._attach_tokens(requests)
        cfg = self.cfg
        run = run_plan(self.engine, self.eos, requests, plan, seed=cfg.seed, page_size=cfg.page_size, preview=cfg.preview,
                       callbacks=EngineCallbacks(too_long, finished, step, self._stop.is_set))
        entry = None
        if rows:
            data, entry = encode_shard(rows, self._file_id)
            entry["file"] = shard_name
            entry["replica"] = self.replica_id
            try:
                write_shard_file(self.storage, shard_name, data)
            except OSError as e:
                raise CommitError(f"replica {self.replica_id} cannot write {shard_name} to {cfg.output}: "
                                  f"{e.strerror or e} (the shards committed before stay valid)") from None
            if self.hooks is not None:
                self.hooks.shard_written(self.replica_id, shard_name)
        return UnitResult(unit_id, self.replica_id, entry, run.stopped, error_samples, run.seconds, run.preview,
                          run.prompt_tokens_computed, run.num_preemptions,
                          np.array([s.num_seqs for s in run.steps], dtype=np.int32),
                          np.array([s.num_tokens for s in run.steps], dtype=np.int32))

    def _attach_tokens(self, requests: dict[int, Request]) -> None:
        """Read the ids the driver left in the job's token store (``token_store.detach``) from the job folder."""
        missing = [r for r in requests.values() if r.token_ids is None]
        if not missing:
            return
        if self._store is None:
            self._store = TokenStore.open(self.cfg.output, self.job_id)
            if self._store is None:
                raise ValueError(f"replica {self.replica_id}: no token store of job {self.job_id} in {self.cfg.output}")
        for r in missing:
            attach(self._store, self._file_id(r.input_file), r)

    def _file_id(self, path: str) -> int:
        fid = self.file_ids.get(path)
        if fid is None:  # the driver sends rows named after the manifest's input_files only
            raise ValueError(f"row from an input file the job does not list: {path}")
        return fid
