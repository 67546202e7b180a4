"""The Ray driver: whole prefix groups to engine replicas, their shards into the job's manifest.

``run_distributed`` replaces the engine stage of ``pipeline.run_job`` when ``--replicas N > 1`` or
``--ray-address`` is given. Reading, tokenizing and planning have already happened in this process,
once, over the whole (remaining) input; so has committing the read phase's error rows.

Contracts:
- Groups are never split (``assign``): each unit sent to a replica is ``plan.subset`` of whole groups
  of the job's plan (with the outer prefixes they extend), and the replica's engine computes each
  shared prefix once.
- Balance: groups go to replicas by estimated cost (LPT, ``assign.balance``), cut into units of about
  1/``UNITS_PER_REPLICA`` of a replica's share (and at most ``--shard-rows`` rows). A replica that runs
  out of its own units steals the last unit of the most loaded replica.
- Exactly once: every unit attempt writes one shard under a name this driver reserved
  (``ShardWriter.reserve_shard_name``); the shard becomes part of the job only when the replica's call
  returns and the driver lists its entry in the manifest (``ShardWriter.commit_entries``). The driver is
  the only writer of the manifest and the status file and holds the folder lock throughout.
- Failure of a unit: the replica died (actor crash, OOM kill, node loss: ``RayActorError``, lost
  objects), or its ``run_unit`` raised (an engine error). Either way the unit's shard, if written, is
  deleted and never committed, and its work is retried: a unit of several groups is cut in two halves
  (so one bad group cannot take its neighbours down with it), a single group is retried as it is, at
  most ``MAX_ATTEMPTS`` times in all; after that its requests are committed as ``engine_error`` rows
  (with the last error) and the job goes on. A retry goes first to a replica the unit has not failed on
  (``WorkQueue.requeue``). A dead replica's queued units go to the live ones. A replica whose run raised
  stays in service (its engine starts every run from a fresh KV pool), unless ``RETIRE_AFTER`` of its
  units in a row failed, each one that had not failed elsewhere before (a broken GPU, not a poison
  request): it is then killed, its queue handed on; the last live replica is never retired. A replica
  that cannot start is left out. When no replica is left the job fails with a one-line error, committed
  shards kept, and resumes later with any replica count (``batchllm resume``).
- Job-level errors raised in a replica (``BatchLLMError``: a shard that cannot be written, a full disk,
  a missing bucket) are not retried: they fail the job, as they would in one process.
- Stop (SIGINT / SIGTERM in this process): every replica ends its unit after the current engine step;
  complete requests are committed, then ``pipeline`` raises ``JobInterrupted``.
- Progress: replicas are polled every ``POLL_S``; the status file counts committed plus in-flight work
  of every replica and lists the replicas (``batchllm.replicas``); ``progress`` gets 'step' events as in
  a single-process run, plus 'replica_ready', 'unit_started', 'unit_committed', 'unit_failed',
  'replica_failed' and 'group_failed'.
- Outputs do not depend on the replica that runs a request: seeds derive from (job seed, custom_id,
  sample index), never from placement.

Ray is imported only here, when a distributed run starts (``pip install 'batchllm[ray]'``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
import uuid
from typing import Any, Callable

import numpy as np

from batchllm.config import JobConfig
from batchllm.distributed import assign
from batchllm.distributed.replica import Replica, ReplicaHooks, UnitResult
from batchllm.errors import BatchLLMError
from batchllm.io import requests as rq
from batchllm.io.requests import Request, RowError
from batchllm.io.token_store import detach
from batchllm.io.writer import ShardWriter, discard_shard
from batchllm.jobs.recorder import ResultRecorder
from batchllm.jobs.results import JobSummary, batch_stats, record_error
from batchllm.jobs.signals import StopFlag
from batchllm.plan.plan import Plan

UNITS_PER_REPLICA = 4  # units per replica's share: more = finer stealing and commits, more calls
MAX_ATTEMPTS = 3  # runs of one group that fail before its requests become ENGINE_ERROR rows
RETIRE_AFTER = 3  # units failing in a row on one replica (no success between) before it is retired
ENGINE_ERROR = rq.ENGINE_ERROR  # row error code of requests whose group failed MAX_ATTEMPTS times
POLL_S = 0.5  # progress polling / status refresh period
# ray.init: a local instance starts in seconds (7 s measured on a 2-core machine at load 4), a remote one
# connects in less; past this the job fails with one line instead of waiting with no output


class _StartTimeout(Exception):
    """Internal: ray.init ran past the job's ray_start_timeout."""


@contextlib.contextmanager
def _deadline(seconds: float):
    """Raise _StartTimeout in the main thread after ``seconds`` (SIGALRM; no limit elsewhere or when an
    alarm is already set)."""
    if (seconds <= 0 or not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread()
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0):
        yield
        return

    def fire(signum, frame):
        raise _StartTimeout()

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def import_ray():
    try:
        import ray
    except ImportError:
        raise BatchLLMError("--replicas / --ray-address need Ray, which is not installed: pip install 'batchllm[ray]'") from None
    return ray


@dataclasses.dataclass
class _Running:
    replica: int
    unit_id: int
    groups: np.ndarray
    shard: str
    started: float


@dataclasses.dataclass
class _ReplicaState:
    replica: int
    actor: Any
    name: str
    info: dict = dataclasses.field(default_factory=dict)
    state: str = "starting"  # starting | running | idle | failed | stopped
    units_done: int = 0
    requests_done: int = 0
    failures_in_a_row: int = 0  # units of this replica that failed since its last success
    live: dict = dataclasses.field(default_factory=dict)  # the running unit's counts (Replica.progress)
    error: str | None = None


class RayCluster:
    """This job's connection to Ray: ``ray.init`` (unless the caller already did it; then it is left
    running) and the device the replicas will use, checked against the cluster's resources.

    ``device`` is "cuda" (one GPU per replica) when ``--device`` asks for CUDA, or is auto and the
    cluster has GPUs; else "cpu". ``dtype`` is set by the pipeline (it resolves "auto" for ``device``)
    and given to every replica, so the fingerprint's dtype is the one the replicas run.
    """

    def __init__(self, cfg):
        self.ray = ray = import_ray()
        self.started = False
        if not ray.is_initialized():
            where = cfg.ray_address or "a new local instance"
            # ray.init replaces the SIGTERM handler with sys.exit(15): a SIGTERM while Ray starts (or before
            # the job's own handlers) would end the process with no message; ours goes back afterwards
            sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
            try:
                with _deadline(cfg.ray_start_timeout):
                    ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            except _StartTimeout:
                try:
                    ray.shutdown()
                except Exception:  # noqa: BLE001  (half-started: nothing more to do)
                    pass
                raise BatchLLMError(f"Ray ({where}) did not start within {cfg.ray_start_timeout:.0f} s (a busy machine "
                                    "starts it slowly: --ray-start-timeout SECONDS waits longer)") from None
            except Exception as e:  # ConnectionError, a bad address...
                raise BatchLLMError(f"cannot connect to Ray at {where}: {_one_line(e)}") from None
            finally:
                if sigterm is not None:
                    signal.signal(signal.SIGTERM, sigterm)
            self.started = True
        try:
            self.device, self.num_gpus = self._placement(cfg)
        except BaseException:
            self.close()
            raise
        self.dtype = None

    def _placement(self, cfg) -> tuple[str, int]:
        R = cfg.replicas
        res = self.ray.cluster_resources()
        gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 0))
        use_gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and gpus > 0)
        if use_gpu and gpus < R:
            raise BatchLLMError(f"--replicas {R} needs {R} GPUs (one per replica) but the Ray cluster has {gpus}; "
                                "use fewer replicas, or --device cpu for CPU replicas")
        if cpus < R:
            raise BatchLLMError(f"--replicas {R} needs {R} CPUs (one per replica) but the Ray cluster has {cpus}")
        # Ray sets CUDA_VISIBLE_DEVICES per actor: its one GPU is always cuda (index 0) inside it
        return ("cuda" if use_gpu else "cpu"), (1 if use_gpu else 0)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False


@dataclasses.dataclass(frozen=True)
class DistributedJob:
    """A job's engine stage as the driver runs it: the planned requests, and where rows, counts, progress
    events and stop requests go."""

    cfg: JobConfig
    requests: list[Request]  # the job's (remaining) requests; ``plan`` indexes them
    plan: Plan
    emit: Callable[[str, dict], None]  # run_job's progress hook
    summary: JobSummary
    writer: ShardWriter  # the manifest's only writer: commits the replicas' shards
    recorder: ResultRecorder
    stop: StopFlag
    model_name: str
    hooks: ReplicaHooks | None = None  # given to every replica (tests)


def run_distributed(cluster: RayCluster, job: DistributedJob) -> bool:
    """Run ``job.requests`` on ``cfg.replicas`` Ray replicas, each unit a ``plan.subset``, committing
    through ``job.writer``. Fills ``job.summary``; returns True when stopped by a signal."""
    groups, requests = job.plan.groups, job.requests
    lens = np.fromiter((len(r.token_ids) for r in requests), dtype=np.int64, count=len(requests))
    n = np.fromiter((r.sampling.n for r in requests), dtype=np.int64, count=len(requests))
    max_tokens = np.fromiter((r.sampling.max_tokens for r in requests), dtype=np.int64, count=len(requests))
    costs, rows = assign.group_costs([g.members for g in groups], [g.prefix_len for g in groups], lens, n, max_tokens)
    run = _Driver(cluster, job, costs, rows)
    try:
        return run.run()
    finally:
        run.shutdown()


class _Driver:
    def __init__(self, cluster: RayCluster, job: DistributedJob, costs: np.ndarray, rows: np.ndarray):
        self.cluster, self.ray, self.cfg = cluster, cluster.ray, job.cfg
        self.requests, self.plan, self.groups = job.requests, job.plan, job.plan.groups
        self.hooks = job.hooks
        self.costs, self.rows = costs, rows  # per group: estimated cost, output rows
        self.emit, self.summary, self.writer, self.recorder, self.stop = job.emit, job.summary, job.writer, job.recorder, job.stop
        self.model_name = job.model_name
        self.replicas: dict[int, _ReplicaState] = {}
        self.inflight: dict[Any, _Running] = {}  # ObjectRef of run_unit -> what it runs
        self.attempts: dict[int, int] = {}  # group -> failed runs of it alone
        self.next_unit_id = 0
        self.stopping = False
        self.step_seqs: list[np.ndarray] = []
        self.step_tokens: list[np.ndarray] = []
        self.reported = {"samples": 0, "new_tokens": 0}  # what the progress hook has been told
        self._last_poll = 0.0

    # ----------------------------------------------------------------------------------------- start

    def start(self) -> None:
        t_start = time.perf_counter()
        ray, cfg, cluster = self.ray, self.cfg, self.cluster
        device, num_gpus = cluster.device, cluster.num_gpus
        dtype = str(cluster.dtype).removeprefix("torch.") if cluster.dtype is not None else cfg.dtype
        spec = dataclasses.replace(cfg, device=device, dtype=dtype, replicas=1, ray_address=None).to_dict()
        options: dict[str, Any] = {"num_cpus": 1, "num_gpus": num_gpus, "max_concurrency": 2}
        actor_cls = ray.remote(Replica)
        # unique per run: a killed actor's name may stay taken for a moment after ray.kill
        tag = f"{self.writer.manifest['job_id'][:12]}-{uuid.uuid4().hex[:8]}"
        self.summary.replicas = cfg.replicas
        for r in range(cfg.replicas):
            name = f"batchllm-{tag}-r{r}"
            actor = actor_cls.options(name=name, **options).remote(
                spec, list(self.writer.manifest["input_files"]), self.writer.manifest["job_id"], r, self.hooks)
            self.replicas[r] = _ReplicaState(r, actor, name)
        pending = {rs.actor.ready.remote(): rs for rs in self.replicas.values()}
        deadline = time.monotonic() + cfg.replica_start_timeout  # model download + load
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            for ref in ready:
                rs = pending.pop(ref)
                try:
                    rs.info = ray.get(ref)
                    rs.state = "idle"
                    self.emit("replica_ready", {"replica": rs.replica, "actor_name": rs.name, **rs.info})
                except Exception as e:  # the actor died or its __init__ raised: the job goes on without it
                    rs.state, rs.error = "failed", _one_line(getattr(e, "cause", None) or e)
                    self.summary.replica_failures += 1
                    self.emit("replica_failed", {"replica": rs.replica, "error": rs.error})
            if self.stop:
                return
            if pending and time.monotonic() > deadline:
                raise BatchLLMError(f"{len(pending)} replica(s) did not load the model within {cfg.replica_start_timeout:.0f} s "
                                    "(--replica-start-timeout SECONDS waits longer)")
        live = self.live()
        if not live:
            errors = "; ".join(sorted({rs.error or "unknown error" for rs in self.replicas.values()}))
            raise BatchLLMError(f"no replica could start: {errors}")
        info = self.replicas[live[0]].info
        # as in one process, "model load" is the wait before generation (Ray workers, imports, weights)
        self.summary.load_seconds = time.perf_counter() - t_start
        self.emit("loaded", {"model": info.get("model", self.model_name), "device": f"{len(live)} replicas x {info.get('device')}",
                             "dtype": info.get("dtype", "")})

    # ------------------------------------------------------------------------------------------- run

    def live(self) -> list[int]:
        return [r for r, rs in self.replicas.items() if rs.state not in ("failed", "starting")]

    def run(self) -> bool:
        self.start()
        if self.stop:
            return True
        live = self.live()
        per_replica = assign.balance(self.costs, len(live))
        share = float(self.costs.sum()) / max(1, len(live))
        max_cost = max(share / UNITS_PER_REPLICA, 1.0)
        units = [assign.make_units(ids, self.costs, self.rows, max_cost, self.cfg.shard_rows) for ids in per_replica]
        self.queue = assign.WorkQueue([[] for _ in range(len(self.replicas))], self.costs)
        for r, us in zip(live, units):
            self.queue.queues[r].extend(us)
        for r in list(self.queue.queues):  # replicas that failed to start own no queue
            if r not in live:
                del self.queue.queues[r]
        total_samples = int(self.rows.sum())
        self.emit("planned", {"requests": len(self.requests), "samples": total_samples, "errors": self.summary.errors,
                              "done_before": self.summary.done_before, "replicas": len(live),
                              "units": sum(len(u) for u in units)})
        self.recorder.status.generation_started(self.recorder.done_before)
        self.recorder.update_status(stage="generating", force=True)
        for r in live:
            self.dispatch(r)
        while self.inflight:
            if self.stop and not self.stopping:
                self.stopping = True
                for r in self.live():
                    self.replicas[r].actor.stop.remote()
            ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=POLL_S)
            for ref in ready:
                self.finish(ref)
            if time.monotonic() - self._last_poll >= POLL_S:
                self.poll()
        seqs = np.concatenate(self.step_seqs) if self.step_seqs else np.zeros(0, dtype=np.int32)
        toks = np.concatenate(self.step_tokens) if self.step_tokens else np.zeros(0, dtype=np.int32)
        s = self.summary
        s.num_steps, s.batch_seqs, s.batch_tokens = batch_stats(seqs.tolist(), toks.tolist())
        self.refresh_status(force=True)
        return self.stopping

    def dispatch(self, r: int) -> None:
        """Give replica ``r`` its next unit (own queue, else stolen), or mark it idle."""
        rs = self.replicas[r]
        unit = None if self.stopping else self.queue.next_for(r)
        if unit is None:
            rs.state = "idle"
            return
        uid = self.next_unit_id
        self.next_unit_id += 1
        shard = self.writer.reserve_shard_name()
        sub = self.plan.subset(unit.tolist())
        # ids in the job's token store stay there: the replica reads its unit's from the job folder
        reqs = {i: detach(self.requests[i]) for g in sub.groups for i in g.members.tolist()}
        ref = rs.actor.run_unit.remote(uid, shard, sub, reqs)
        self.inflight[ref] = _Running(r, uid, unit, shard, time.time())
        rs.state = "running"
        self.emit("unit_started", {"replica": r, "unit": uid, "shard": shard, "groups": len(sub.groups), "requests": len(reqs)})

    def finish(self, ref) -> None:
        run = self.inflight.pop(ref)
        rs = self.replicas[run.replica]
        try:
            res: UnitResult = self.ray.get(ref)
        except _lost_errors(self.ray) as e:
            self.unit_failed(run, e, lost=True)
            return
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, BatchLLMError):  # job-level (CommitError: the shard could not be written)
                self.writer_discard(run.shard)
                raise cause from None
            self.unit_failed(run, cause, lost=False)
            return
        except self.ray.exceptions.RayError as e:  # out of memory, cancelled, system errors: the replica is unusable
            self.unit_failed(run, e, lost=True)
            return
        rs.failures_in_a_row = 0
        entry = res.entry
        if entry is not None:
            self.writer.commit_entries([entry])
            self.recorder.add_committed(entry)
            self._account(entry)
            rs.requests_done += entry["requests"]["completed"] + entry["requests"]["failed"]
            for code, k in (entry.get("errors_by_code") or {}).items():  # prompt_too_long for this replica's pool
                self.summary.errors += k
                self.summary.errors_by_code[code] = self.summary.errors_by_code.get(code, 0) + k
        rs.units_done += 1
        self.summary.prompt_tokens_computed += res.prompt_tokens_computed
        self.summary.num_preemptions += res.num_preemptions
        self.step_seqs.append(res.step_seqs)
        self.step_tokens.append(res.step_tokens)
        room = self.cfg.preview - len(self.summary.preview)
        if room > 0:
            self.summary.preview.extend(res.preview[:room])
        # the progress bar learns the unit's last samples now (polling saw only part of them)
        # (samples of prompt_too_long rows count too: the bar's total planned them)
        done_samples = (entry["samples"] if entry is not None else 0) + res.error_samples
        self._report(done_samples - rs.live.get("samples", 0), res_new_tokens=0)
        rs.live = {}
        self.emit("unit_committed", {"replica": run.replica, "unit": run.unit_id, "shard": run.shard,
                                     "rows": entry["rows"] if entry else 0, "stopped": res.stopped})
        self.dispatch(run.replica)
        self.refresh_status()

    def unit_failed(self, run: _Running, err: BaseException, lost: bool) -> None:
        """``run`` failed: its replica is gone (``lost``) or its call raised. Discard its shard, retry
        its work elsewhere (see the module docstring), keep or retire the replica."""
        rs = self.replicas[run.replica]
        msg = _one_line(err)
        self.writer_discard(run.shard)
        self._report(-rs.live.get("samples", 0), res_new_tokens=0)  # those samples will be redone
        rs.live = {}
        self.emit("unit_failed", {"replica": run.replica, "unit": run.unit_id, "shard": run.shard, "error": msg, "lost": lost})
        if lost:
            self._drop_replica(rs, msg)
        elif not self.queue.failed_on.get(self.queue.key(run.groups)):
            # only work that never failed elsewhere counts against the replica: a unit that already failed
            # on another replica points at the work (a poison request), not at this replica
            rs.failures_in_a_row += 1
            if rs.failures_in_a_row >= RETIRE_AFTER and [r for r in self.live() if r != run.replica]:
                self._drop_replica(rs, f"retired after {rs.failures_in_a_row} failed units in a row (last: {msg})")
        self._retry(run.groups, run.replica, msg, lost)
        for r in self.live():  # idle replicas (the failed one too, if it stays) take the retried work now
            if self.replicas[r].state == "idle" or (r == run.replica and not lost and rs.state == "running"):
                self.dispatch(r)
        self.refresh_status(force=True)

    def _drop_replica(self, rs: _ReplicaState, error: str) -> None:
        """Take ``rs`` out of service (dead or retired): kill it (a replica cut off from the driver must not
        go on writing), hand its queue on; fail the job when it was the last."""
        rs.state, rs.error = "failed", error
        self.summary.replica_failures += 1
        self.ray.kill(rs.actor)  # a no-op on a dead actor
        self.emit("replica_failed", {"replica": rs.replica, "error": error})
        if not self.live():
            self.refresh_status(force=True)  # the status file shows every replica failed, then the job failure
            done = len(self.writer.manifest["shards"])
            raise BatchLLMError(f"every replica was lost (last: {error}); the {done} shards committed so far are kept: "
                                f"batchllm resume {self.cfg.output}")
        self.queue.remove_replica(rs.replica)

    def _retry(self, groups: np.ndarray, failed_on: int, error: str, lost: bool = False) -> None:
        """Requeue failed work: halves of a multi-group unit; a single group until MAX_ATTEMPTS, then its
        requests become ENGINE_ERROR rows, committed now. Only failures of the work itself count: a lost
        replica (node loss, spot preemption) says nothing about the requests."""
        if len(groups) > 1:
            halves = [h for h in np.array_split(groups, 2) if len(h)]
            self.queue.requeue(halves, failed_on, parent=groups)
            return
        g = int(groups[0])
        if not lost:
            self.attempts[g] = self.attempts.get(g, 0) + 1
        if lost or self.attempts[g] < MAX_ATTEMPTS:
            self.queue.requeue([groups], failed_on)
            return
        message = f"the request's prefix group failed on {MAX_ATTEMPTS} attempts on the replicas (last: {error})"
        for i in self.groups[g].members.tolist():
            r = self.requests[i]
            record_error(self.summary, self.recorder, RowError(r.input_file, r.input_index, ENGINE_ERROR, message, r.custom_id))
        self.writer.flush()  # committed now: a later job failure must not lose the verdict
        self._report(int(self.rows[g]), res_new_tokens=0)
        self.emit("group_failed", {"group": g, "requests": len(self.groups[g].members), "error": error})

    def writer_discard(self, shard: str) -> None:
        discard_shard(self.writer.storage, shard)

    # ----------------------------------------------------------------------------------- accounting

    def _account(self, entry: dict) -> None:
        s, tok = self.summary, entry.get("tokens") or {}
        s.samples += entry.get("samples", 0)
        s.prompt_tokens += tok.get("prompt", 0)
        s.cached_tokens += tok.get("cached", 0)
        s.output_tokens += tok.get("completion", 0)

    def _report(self, samples: int, res_new_tokens: int) -> None:
        if samples or res_new_tokens:
            self.reported["samples"] += samples
            self.emit("step", {"finished": samples, "new_tokens": res_new_tokens})

    def poll(self) -> None:
        """Ask running replicas for their counts; forward the news to ``progress`` and the status file."""
        self._last_poll = time.monotonic()
        running = {self.replicas[run.replica].actor.progress.remote(): run for run in self.inflight.values()}
        if not running:
            return
        ready, _ = self.ray.wait(list(running), num_returns=len(running), timeout=POLL_S)
        for ref in ready:
            run = running[ref]
            rs = self.replicas[run.replica]
            try:
                live = self.ray.get(ref)
            except Exception:  # a dying replica: its run_unit call reports it
                continue
            if live.get("unit") != run.unit_id:
                continue  # the replica has not started this unit yet
            before = rs.live or {"samples": 0, "new_tokens": 0}
            self._report(live["samples"] - before["samples"], live["new_tokens"] - before["new_tokens"])
            rs.live = live
        self.emit("replicas", {"replicas": self.replica_table()})
        self.refresh_status()

    def replica_table(self) -> list[dict]:
        return [{"replica": r, "state": rs.state, "node": rs.info.get("node"), "device": rs.info.get("device"),
                 "units_done": rs.units_done, "requests_done": rs.requests_done + rs.live.get("requests", 0),
                 **({"error": rs.error} if rs.error else {})} for r, rs in self.replicas.items()]

    def refresh_status(self, force: bool = False) -> None:
        live = {"requests": 0, "samples": 0, "prompt": 0, "completion": 0, "cached": 0}
        for rs in self.replicas.values():
            for k in live:
                live[k] += rs.live.get(k, 0)
        self.recorder.status.set_replicas(self.replica_table())
        self.recorder.update_status(force=force, live=live)

    # -------------------------------------------------------------------------------------- cleanup

    def shutdown(self) -> None:
        """Kill every replica and delete the shards of units that never committed (an error or
        interruption left them in flight): nothing a replica wrote outlives the driver uncommitted."""
        for rs in self.replicas.values():
            try:
                self.ray.kill(rs.actor)
            except Exception:
                pass
        for run in self.inflight.values():
            self.writer_discard(run.shard)
        self.inflight.clear()


def _lost_errors(ray) -> tuple[type[BaseException], ...]:
    """Errors that mean the replica (its process or node) is gone, not that its code failed."""
    ex = ray.exceptions
    return tuple(getattr(ex, n) for n in ("RayActorError", "ObjectLostError", "WorkerCrashedError", "NodeDiedError")
                 if hasattr(ex, n))


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    return f"{type(e).__name__}: {text}"[:300] if not isinstance(e, BatchLLMError) else text[:300]
