"""One engine replica: loads the model once, then runs work units (whole prefix groups) on request.

``Replica`` is a plain class; the driver turns it into a Ray actor (``ray.remote(...)(Replica)``, one
GPU each, or none with ``--device cpu``), so this module imports no Ray and can run in-process in tests.
The actor is threaded (``max_concurrency=2``): ``run_unit`` runs in one thread while ``progress`` and
``stop`` answer from the other.

Contracts:
- ``run_unit`` runs the given groups through the same engine and ``build_sources`` as a single-process
  run, so a request's samples (seeded from job seed, custom_id and sample index) are the same whichever
  replica runs them and with whatever neighbours.
- Results go to ONE shard file under the name the driver reserved, written durably but not committed:
  the returned manifest entry is what the driver lists in the manifest. A replica never touches the
  manifest, the folder lock or the status file.
- Whole requests only, as in ``jobs.recorder``: after ``stop`` the unit ends after the current engine
  step and its shard holds the requests that completed; the others are not in its done record, so a
  resume redoes them.
- Prompts longer than this replica's KV pool holds (``engine.cfg.max_model_len``, which ``make_engine``
  lowers to the pool size when the pool is smaller than the context) become ``prompt_too_long`` error
  rows in the unit's shard, as the single-process pipeline makes them: they never reach the engine,
  which could not schedule them.
- Failures: an exception out of the engine (or anything else in ``run_unit``) propagates to the driver,
  which retries the unit elsewhere (see ``driver``); the engine starts each run from a fresh page pool,
  so the replica stays usable. A shard that cannot be written raises ``CommitError`` (a job-level
  failure: a full disk or a missing bucket is not fixed by another replica).
- The output folder is a path or a pyarrow filesystem URI (``batchllm.io.storage``); the replica writes
  its shard through the same storage as the driver, never the manifest, status or lock.
- Tensor parallelism later: a replica is the unit that owns "one model instance"; a TP replica would
  hold several GPUs (``num_gpus=k``, placement group) and run a TP engine behind this same interface.
"""

from __future__ import annotations

import os
import threading
import time
import types
from typing import Any

import numpy as np

from batchllm.config import JobConfig
from batchllm.io import requests as rq
from batchllm.io.requests import Request, RowError
from batchllm.io.writer import CommitError, encode_shard, storage_of, write_shard_file
from batchllm.plan.plan import PrefixGroup

# Test hook: "PATH:SECONDS" makes a replica append "<replica> <shard name>" to PATH each time it has
# written a shard, and sleep after its first one, so a test can kill it between writing a shard and the driver committing it. The
# driver forwards it (and every BATCHLLM_TEST_* variable) to the actors; unset in normal use.
REPLICA_HOOK_ENV = "BATCHLLM_TEST_REPLICA_HOOK"
# Test hook (fault injection), forwarded to the actors like the one above; comma-separated items:
#   start@R     replica R raises while starting (before its model loads)
#   raise@R#K   replica R's engine raises during the K-th unit it runs (1-based), after one engine step
#   exit@R#K    replica R's process exits (os._exit) during the K-th unit it runs, after one engine step
#   poison=ID   every replica's engine raises, after one step, in any unit holding custom_id ID
# Unset in normal use.
FAULTS_ENV = "BATCHLLM_TEST_REPLICA_FAULTS"


class InjectedFault(RuntimeError):
    """Raised by the ``FAULTS_ENV`` test hook, standing for any engine error."""


class _Stopped(Exception):
    """Internal: ``stop`` was called; raised from the engine's step callback to leave its loop."""


class Replica:
    def __init__(self, job_spec: dict[str, Any], input_files: list[str], replica_id: int):
        # imported here: the driver process never needs torch's engine stack for this module
        from batchllm import pipeline

        t0 = time.perf_counter()
        self.cfg = JobConfig.from_spec(job_spec)
        self.replica_id = replica_id
        self._faults = _parse_faults(os.environ.get(FAULTS_ENV, ""), replica_id)
        if self._faults["start"]:
            raise InjectedFault(f"injected start failure of replica {replica_id} ({FAULTS_ENV})")
        self._units_run = 0
        self.storage = storage_of(self.cfg.output)  # one filesystem client for every shard
        self.file_ids = {p: i for i, p in enumerate(input_files)}
        self.lm = pipeline.load_model(self.cfg)
        self.max_model_len = pipeline.model_max_len(self.cfg, self.lm.config)
        self.engine, self.eos = pipeline.make_engine(self.cfg, self.lm, self.max_model_len)
        self.load_seconds = time.perf_counter() - t0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._live = self._zero()
        self._hook = os.environ.get(REPLICA_HOOK_ENV)

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

    def run_unit(self, unit_id: int, shard_name: str, groups: list[tuple[int, list[int]]],
                 requests: dict[int, Request]) -> dict[str, Any]:
        """Run ``groups`` ((prefix_len, member request indices), in order) and write their rows as
        ``shard_name``. Returns the shard's manifest entry (None if nothing completed) and the unit's
        statistics."""
        from batchllm.pipeline import (
            _prompt_preview,
            build_sources,
            completion_row,
            error_row,
        )

        cfg, engine = self.cfg, self.engine
        self._units_run += 1
        with self._lock:
            self._live = self._zero()
            self._live["unit"] = unit_id
        rows: list[dict[str, Any]] = []
        # prompts this replica's KV pool cannot hold: error rows, as in pipeline._run (same message)
        fits = engine.cfg.max_model_len
        kept_groups = []
        error_samples = 0
        for plen, members in groups:
            kept = []
            for i in members:
                r = requests[i]
                if len(r.token_ids) < fits:
                    kept.append(i)
                    continue
                error_samples += r.sampling.n
                rows.append(error_row(RowError(
                    r.input_file, r.input_index, rq.PROMPT_TOO_LONG,
                    f"prompt has {len(r.token_ids)} tokens; the KV cache holds at most {fits} tokens per sequence "
                    "(raise --kv-cache-tokens or lower --max-model-len)", r.custom_id)))
            if kept:  # the kept members still share the group's prefix
                kept_groups.append((plen, kept))
        plan = types.SimpleNamespace(groups=[PrefixGroup(k, plen, np.asarray(m, dtype=np.int64)) for k, (plen, m) in enumerate(kept_groups)])
        fault = self._fault_for(requests, kept_groups)
        pending: dict[int, list[dict[str, Any]]] = {}
        preview: list[dict[str, Any]] = []
        steps_before = len(engine.step_stats)

        def on_finish(seq) -> None:
            req = requests[seq.request_index]
            row = completion_row(req, seq)
            got = pending.setdefault(seq.request_index, [])
            got.append(row)
            if len(preview) < cfg.preview:
                preview.append({"custom_id": req.custom_id, "prompt": _prompt_preview(req), "text": seq.text})
            done = len(got) == req.sampling.n
            if done:
                del pending[seq.request_index]
                rows.extend(sorted(got, key=lambda r: r["sample_index"]))
            with self._lock:
                live = self._live
                live["samples"] += 1
                live["prompt"] += seq.prompt_len
                live["completion"] += len(seq.output_ids)
                live["cached"] += seq.num_cached
                live["requests"] += int(done)

        def on_step(stats) -> None:
            with self._lock:
                self._live["new_tokens"] += stats.new_output_tokens
            if fault is not None:
                fault()
            if self._stop.is_set():
                raise _Stopped

        t0 = time.perf_counter()
        stopped = False
        try:
            engine.run(build_sources(requests, plan, self.eos, cfg.seed, cfg.page_size), on_finish, on_step)
        except _Stopped:
            stopped = True
        seconds = time.perf_counter() - t0
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
            if self._hook:
                self._test_hook(shard_name)
        steps = engine.step_stats[steps_before:]
        sched = engine.scheduler
        return {
            "unit": unit_id,
            "replica": self.replica_id,
            "entry": entry,
            "stopped": stopped,
            "error_samples": error_samples,  # samples the driver planned for the prompt_too_long rows
            "seconds": seconds,
            "preview": preview,
            "prompt_tokens_computed": sched.prompt_tokens_computed if sched is not None else 0,
            "num_preemptions": sched.num_preemptions if sched is not None else 0,
            "step_seqs": np.array([s.num_seqs for s in steps], dtype=np.int32),
            "step_tokens": np.array([s.num_tokens for s in steps], dtype=np.int32),
        }

    def _test_hook(self, shard_name: str) -> None:
        path, _, seconds = self._hook.rpartition(":")
        with open(path, "a") as f:
            f.write(f"{self.replica_id} {shard_name}\n")
        if not getattr(self, "_hook_slept", False):
            self._hook_slept = True
            time.sleep(float(seconds or 0))

    def _fault_for(self, requests: dict[int, Request], groups: list[tuple[int, list[int]]]):
        """The ``FAULTS_ENV`` fault this unit meets (a callable for the engine's step callback), or None."""
        f = self._faults
        if self._units_run in f["exit"]:
            return lambda: os._exit(1)
        poisoned = f["poison"] and any(requests[i].custom_id in f["poison"] for _, m in groups for i in m)
        if self._units_run in f["raise"] or poisoned:
            what = f"unit {self._units_run} of replica {self.replica_id}"

            def fail() -> None:
                raise InjectedFault(f"injected engine error in {what} ({FAULTS_ENV})")

            return fail
        return None

    def _file_id(self, path: str) -> int:
        fid = self.file_ids.get(path)
        if fid is None:  # the driver sends rows named after the manifest's input_files only
            raise ValueError(f"row from an input file the job does not list: {path}")
        return fid


def _parse_faults(spec: str, replica_id: int) -> dict[str, Any]:
    """``FAULTS_ENV``'s items that concern replica ``replica_id``."""
    out: dict[str, Any] = {"start": False, "raise": set(), "exit": set(), "poison": set()}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        if item.startswith("poison="):
            out["poison"].add(item.removeprefix("poison="))
            continue
        kind, _, where = item.partition("@")
        replica, _, unit = where.partition("#")
        if int(replica) != replica_id:
            continue
        if kind == "start":
            out["start"] = True
        elif kind in ("raise", "exit"):
            out[kind].add(int(unit))
        else:
            raise ValueError(f"{FAULTS_ENV}: unknown fault {item!r}")
    return out
