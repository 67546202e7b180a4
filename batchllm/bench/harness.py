"""The benchmark harness: every listed policy and peer on the identical request set, in one process.

``run_bench`` builds the workload, loads the model once (its load time reported separately as
``load_s``), sets up one engine for all runs (``engines.BenchEngines``: KV pool sizing, KV cache, decode
graphs of the reachable batch sizes; ``engine_setup_s``), runs ``run_job`` once per policy (and per
repeat) on the same JSONL files, each run starting from an empty pool and prefix cache, then each peer
(``transformers``, ``transformers-cb``, ``vllm``) on the same rows and weights, and returns the report
dict that ``report.py`` prints, plots and writes. ``on_report`` gets the partial report after every
run (``complete: false``), so a bench cut off by a timeout has written every figure it finished.
Metrics follow ``docs/benchmarks.md`` ("Metrics"):

- ``wall_s``: run_job's wall time (first request read to last shard committed; the engine setup,
  shared by all runs, is not in it); the best of ``repeat`` runs, all of them in ``wall_s_runs``;
- ``total_tok_s`` = (prompt tokens as the user sees them + generated tokens) / wall; ``output_tok_s``;
- ``prefill_saving`` = 1 - prompt tokens computed / prompt tokens (achieved, not planned);
- ``effective_mfu`` = 2 x parameters x (unique prompt tokens + generated tokens) / wall / peak FLOP/s,
  on CUDA in bf16/fp16 only, against the spec dense bf16 peak of ``PEAK_BF16_FLOPS`` (the achievable
  matmul rate is lower: 784-790 TFLOP/s measured on an H200 against its 989 spec), else null;
- ``peak_kv_gb``: the most KV pages referenced at once (after each step's scheduling) x page bytes;
  for fcfs-lru, cached pages nothing references are not counted (they are evictable, like free ones);
- ``decode_batch``: sequences decoding per step, min / median / max over steps that decode.

The engine is observed, not edited: ``_Probe`` wraps a few engine methods (class attributes) for the
duration of one run to read the pool after each schedule, grab the engine's step statistics, and, with
``profile``, time each kind of work (``PROFILE_KINDS``, exclusive of nested kinds: ``forward`` is the
model minus ``attention``, which is the backend's KV store and attention calls). On CUDA, profiling
synchronises around each forward and attention call so GPU time lands where it is spent; that costs
some overlap, so profiled wall times run a little slow.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any, Callable

import torch

from batchllm.bench import peers as peers_mod
from batchllm.bench.peer_run import PeerRun
from batchllm.bench.workloads import Cell, make_workload, write_jsonl
from batchllm.config import DTYPE_CHOICES, JobConfig
from batchllm.errors import BatchLLMError
from batchllm.models import loader
from batchllm.plan.trie import PrefixTrie

POLICIES = ("batchllm", "fcfs-lru")
# (substring of torch.cuda.get_device_name, dense bf16 peak FLOP/s from the vendor spec sheet); first match wins
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))
PROFILE_KINDS = ("setup/teardown", "read+tokenize", "plan", "schedule", "prepare inputs", "forward", "attention", "sample+stop", "write", "other")

Log = Callable[[str], None]


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    try:
        info["load_avg"] = list(os.getloadavg())  # a busy machine shows here
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    return info


def versions() -> dict[str, str]:
    import transformers

    import batchllm

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "batchllm": getattr(batchllm, "__version__", "?"), "cuda": torch.version.cuda or "none"}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Spec dense bf16/fp16 peak of the CUDA device, None off CUDA, in fp32, or on an unlisted GPU."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS if k in name), None)


class _Probe:
    """Wraps engine methods for one run: peak pages in use, the engine's step stats, and timings.

    Keeps no reference to the engine or its pool, so the KV memory is free for the next run."""

    def __init__(self, profile: bool, cuda: bool):
        self.profile, self.cuda = profile, cuda
        self.peak_pages = 0
        self.page_bytes = 0
        self.steps: list = []  # the engine's StepStats (the engine itself is not kept: it holds the KV pool)
        self.engine = None  # the engine while it runs
        self.times: dict[str, float] = defaultdict(float)
        self._stack: list[float] = []  # child time of each open timed call (exclusive timing)
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> "_Probe":
        from batchllm import pipeline
        from batchllm.engine.attention_backend import AttentionBackend
        from batchllm.engine.engine import LLMEngine
        from batchllm.engine.kv_cache import KVCache
        from batchllm.engine.model_runner import ModelRunner
        from batchllm.engine.scheduler import Scheduler
        from batchllm.io.writer import ShardWriter

        probe = self

        def run(orig):
            def wrapper(engine, *a, **k):
                probe.engine = engine
                try:
                    return orig(engine, *a, **k)
                finally:
                    probe.steps, probe.engine = engine.step_stats, None
            return wrapper

        def forward(orig):
            def wrapper(runner, *a, **k):
                # the step is scheduled (every page it needs allocated) and nothing has finished yet: its peak
                pool = probe.engine.pool if probe.engine is not None else None
                if pool is not None:
                    probe.peak_pages = max(probe.peak_pages, pool.num_pages - pool.num_free)
                    if not probe.page_bytes:
                        probe.page_bytes = sum(layer[:, 0].numel() * layer.element_size() for layer in probe.engine.kv.layers)
                return orig(runner, *a, **k)
            return wrapper

        self._patch(LLMEngine, "run", run)
        self._patch(ModelRunner, "run", forward)
        if self.profile:
            for owner, name, kind in (
                (KVCache, "__init__", "setup/teardown"), (LLMEngine, "__init__", "setup/teardown"),
                (ShardWriter, "__init__", "setup/teardown"), (Scheduler, "check_idle_integrity", "setup/teardown"),
                (Scheduler, "schedule", "schedule"), (Scheduler, "advance", "schedule"), (Scheduler, "finish", "schedule"),
                (ModelRunner, "prepare", "prepare inputs"), (ModelRunner, "run", "forward"),
                (LLMEngine, "_sample_and_append", "sample+stop"), (ShardWriter, "add", "write"),
                (ShardWriter, "add_request", "write"), (ShardWriter, "close", "write"),
                (pipeline, "read_and_tokenize", "read+tokenize"), (pipeline, "plan_requests", "plan"),
            ):
                if hasattr(owner, name):  # the pipeline may change under us: time what exists
                    self._patch(owner, name, lambda orig, kind=kind: self._timed(kind, orig, sync=kind == "forward"))
            for backend in (AttentionBackend, *AttentionBackend.__subclasses__()):
                for name in ("store_kv", "forward"):
                    if name in backend.__dict__:
                        self._patch(backend, name, lambda orig: self._timed("attention", orig, sync=True))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, orig in reversed(self._saved):
            if orig is None:
                delattr(owner, name)
            else:
                setattr(owner, name, orig)
        self._saved.clear()

    def _patch(self, owner, name: str, make) -> None:
        orig = getattr(owner, name)
        self._saved.append((owner, name, orig if name in vars(owner) else None))  # None: inherited, delete on exit
        setattr(owner, name, make(orig))

    def _timed(self, kind: str, fn, sync: bool):
        probe = self

        def wrapper(*a, **k):
            if sync and probe.cuda:
                torch.cuda.synchronize()  # queued work before this call belongs to the caller
            probe._stack.append(0.0)
            t0 = time.perf_counter()
            try:
                out = fn(*a, **k)
                if sync and probe.cuda:
                    torch.cuda.synchronize()
                return out
            finally:
                dt = time.perf_counter() - t0
                child = probe._stack.pop()
                probe.times[kind] += dt - child
                if probe._stack:
                    probe._stack[-1] += dt
        return wrapper


def _free_memory() -> None:
    # run_job's KV pool is sized from free memory: what the last run's pool left in torch's cache counts as used
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _stats3(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": float(statistics.median(values)), "max": max(values)}


def _entry(name: str, kind: str, wall_runs: list[float], load_s: float, cell_info: dict, prompt_computed: int | None,
           output_tokens: int, flops_peak: float | None, params: int, **extra) -> dict[str, Any]:
    """One result entry; metrics from the best (fastest) of the runs."""
    wall = min(wall_runs)
    tokens = cell_info["prompt_tokens"] + output_tokens
    mfu = 2 * params * (cell_info["unique_prompt_tokens"] + output_tokens) / wall / flops_peak if flops_peak and wall else None
    return {
        "policy": name,
        "kind": kind,
        "wall_s": wall,
        "wall_s_runs": wall_runs,
        "load_s": load_s,
        "total_tok_s": tokens / wall if wall else None,
        "output_tok_s": output_tokens / wall if wall else None,
        "prefill_saving": 1 - prompt_computed / cell_info["prompt_tokens"] if prompt_computed is not None else None,
        "effective_mfu": mfu,
        "prompt_tokens": cell_info["prompt_tokens"],
        "prompt_tokens_computed": prompt_computed,
        "output_tokens": output_tokens,
        **extra,
    }


def _unavailable(name: str, reason: str) -> dict[str, Any]:
    return {"policy": name, "kind": "peer", "unavailable": reason, "wall_s": None, "wall_s_runs": [], "load_s": None,
            "total_tok_s": None, "output_tok_s": None, "prefill_saving": None, "effective_mfu": None,
            "peak_kv_gb": None, "decode_batch": None}


def run_bench(
    workload: str,
    shape: dict[str, Any] | None = None,
    *,
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    policies: list[str] | tuple[str, ...] = POLICIES,
    peers: list[str] | tuple[str, ...] = (),
    kv_cache_tokens: int | None = None,
    kv_cache_dtype: str = "auto",
    max_num_batched_tokens: int | None = None,
    repeat: int = 1,
    profile: bool = False,
    warmup: bool = True,
    peer_batch_size: int = 64,
    log: Log | None = None,
    on_report: Callable[[dict[str, Any]], None] | None = None,
    graphs: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns the report: ``workload``, ``model``, ``machine``, ``versions``,
    ``options``, ``results`` (one entry per policy / peer, in the order given: policies, then peers),
    and for multi-cell workloads ``cells`` (each with its own ``results``; the top-level entry then sums
    the cells, and ``wall_vs_first`` is the geometric mean of the cells' ratios), and ``complete``.

    ``wall_vs_first`` = entry wall / first entry's wall: how many times faster the first entry is.
    ``same_tokens_as_first``: fraction of requests whose (greedy) token ids equal the first entry's.
    ``warmup`` runs the first policy, and each peer, on 4 short requests first (untimed: CUDA context,
    kernels, allocator caches). ``machine.load_avg`` is taken before the runs, ``load_avg_end`` after:
    a busy machine shows there.

    ``on_report(report)`` gets the report so far, with ``complete: false``, after every policy run,
    every peer's cell and every unavailable peer (``batchllm bench --json`` rewrites its file each
    time, so a run cut off by a timeout keeps every figure it finished); an entry measured on fewer
    runs than ``repeat`` has ``runs_done``; a multi-cell total over fewer cells than the workload has
    ``cells_measured``. The returned report has ``complete: true``.

    The policies' runs share one engine setup (``engines.BenchEngines``: KV pool sizing, KV cache,
    decode graphs for the batch sizes this workload can reach), built before the first run and
    reported as ``model.engine_setup_s`` (not in any run's wall time); ``graphs`` overrides its graph
    mode ("static": the graph path run eagerly, for CPU tests).
    """
    from batchllm.build import resolve_device, resolve_dtype, resolve_kv_cache_dtype

    say = log or (lambda msg: None)
    policies, peers = list(policies), list(peers)
    for p in policies:
        if p not in POLICIES:
            raise BatchLLMError(f"unknown policy {p!r}; use {', '.join(POLICIES)}")
    for p in peers:
        peers_mod.unavailable_reason(p)  # raises for an unknown name
    if not policies and not peers:
        raise BatchLLMError("nothing to measure: give at least one policy or peer")
    if repeat < 1:
        raise BatchLLMError("--repeat must be at least 1")
    if dtype not in DTYPE_CHOICES:
        raise BatchLLMError(f"unknown dtype {dtype!r}: use {', '.join(DTYPE_CHOICES)}")

    machine = machine_info()
    src = loader.resolve_model(model)
    mcfg = loader.load_config(src)
    wl = make_workload(workload, shape, vocab_size=mcfg.vocab_size)
    base = JobConfig(model=model, device=device, dtype=dtype, temperature=0.0, preview=0,
                     kv_cache_tokens=kv_cache_tokens, kv_cache_dtype=kv_cache_dtype,
                     max_num_batched_tokens=max_num_batched_tokens)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    resolve_kv_cache_dtype(kv_cache_dtype, dt)  # a bad --kv-cache-dtype is one line before anything loads
    names = policies + peers
    options = {"policies": policies, "peers": peers, "kv_cache_tokens": kv_cache_tokens, "kv_cache_dtype": kv_cache_dtype,
               "max_num_batched_tokens": max_num_batched_tokens, "repeat": repeat, "warmup": warmup,
               "peer_batch_size": peer_batch_size}
    tmp = tempfile.mkdtemp(prefix="batchllm-bench-")
    try:
        cells = []
        for i, cell in enumerate(wl.cells):
            path = os.path.join(tmp, f"cell{i}.jsonl")
            write_jsonl(cell.rows, path)
            cells.append({"label": cell.label, "params": cell.params, "path": path, "cell": cell, **_token_counts(cell), "by_name": {}})
        ctx = _Context(tmp, cells, mcfg, dev, dt, repeat, say)
        ctx.graphs = graphs

        def report(complete: bool) -> dict[str, Any]:
            return _report(ctx, wl, src, model, machine, options, names, complete)

        ctx.emit = (lambda: on_report(report(False))) if on_report else (lambda: None)
        warm_rows = [dict(r, max_tokens=2) for r in wl.cells[0].rows[:4]] if warmup else None
        if policies:
            _run_policies(ctx, base, policies, profile, warm_rows)
        # vLLM last whatever the order given: its CPU worker binds this process's threads and memory to
        # its cores and NUMA node for good (the report keeps the order given)
        for peer in sorted(peers, key=lambda p: p == "vllm"):
            _run_peer(ctx, src, base, peer, peer_batch_size, max_num_batched_tokens, warm_rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report(True)


def _report(ctx: "_Context", wl, src, model: str | None, machine: dict, options: dict, names: list[str],
            complete: bool) -> dict[str, Any]:
    """The report from what has been measured so far (``run_bench``)."""
    cells = ctx.cells
    for ci, c in enumerate(cells):
        c["results"] = [c["by_name"][n] for n in names if n in c["by_name"]]
        measured = [n for n in names if n in c["by_name"]]
        _ratios(c["results"], [ctx.outputs.get((ci, n)) for n in measured], first_is_reference=bool(measured) and measured[0] == names[0])
    ver = versions()
    ver.update(ctx.peer_versions)
    out = {
        "complete": complete,
        "workload": {"name": wl.name, "params": wl.params, "requests": sum(len(c["cell"].rows) for c in cells),
                     "prompt_tokens": sum(c["prompt_tokens"] for c in cells),
                     "unique_prompt_tokens": sum(c["unique_prompt_tokens"] for c in cells),
                     "output_tokens": sum(c["cell"].output_tokens for c in cells)},
        "model": {"name": src.display_name, "spec": model, "parameters": ctx.nparams, "device": str(ctx.dev),
                  "dtype": str(ctx.dt).removeprefix("torch."), "peak_flops": ctx.flops_peak, "load_s": ctx.load_s,
                  "engine_setup_s": ctx.engine_setup_s, "graph_sizes": ctx.graph_sizes},
        "machine": {**machine, "load_avg_end": machine_info().get("load_avg")},
        "versions": ver,
        "options": options,
    }
    if len(cells) == 1:
        out["results"] = cells[0]["results"]
    else:
        out["results"] = _aggregate(cells, names, ctx.flops_peak, ctx.nparams)
        out["cells"] = [{"label": c["label"], "params": c["params"], "requests": len(c["cell"].rows),
                         "prompt_tokens": c["prompt_tokens"], "unique_prompt_tokens": c["unique_prompt_tokens"],
                         "results": c["results"]} for c in cells]
    return out


class _Context:
    """What the runs of one bench share: request files, the cells' results, outputs for agreement."""

    def __init__(self, tmp, cells, mcfg, dev, dt, repeat, say):
        self.tmp, self.cells, self.mcfg, self.dev, self.dt, self.repeat, self.say = tmp, cells, mcfg, dev, dt, repeat, say
        self.flops_peak = peak_flops(dev, dt)
        self.nparams = mcfg.num_parameters
        self.load_s: float | None = None  # batchllm's model load
        self.engine_setup_s: float | None = None  # the policies' shared engine setup (engines.BenchEngines)
        self.graph_sizes: list[int] | None = None
        self.graphs: str | None = None
        self.outputs: dict[tuple[int, str], dict[str, list[int]]] = {}  # (cell, name) -> custom_id -> token ids
        self.peer_versions: dict[str, str] = {}
        self.emit: Callable[[], None] = lambda: None  # hands the partial report to run_bench's on_report
        self._runs = 0

    @property
    def max_seqs(self) -> int:
        """The most sequences any run decodes at once at most: the largest cell's samples."""
        return max(sum(int(r.get("n", 1)) for r in c["cell"].rows) for c in self.cells)

    def fresh_dir(self) -> str:
        self._runs += 1
        return os.path.join(self.tmp, f"out{self._runs}")


def _run_policies(ctx: _Context, base: JobConfig, policies: list[str], profile: bool, warm_rows: list[dict] | None) -> None:
    """Each policy on each cell, ``ctx.repeat`` times, with one loaded model and one engine setup; fills
    the cells' results and hands the report to ``ctx.emit`` after every run."""
    from batchllm.bench.engines import BenchEngines
    from batchllm.build import load_model
    from batchllm.pipeline import run_job

    t = time.perf_counter()
    lm = load_model(base)
    ctx.load_s = time.perf_counter() - t
    ctx.say(f"model loaded in {ctx.load_s:.1f} s ({ctx.dev}, {str(ctx.dt).removeprefix('torch.')})")
    engines = BenchEngines(base, lm, policies, ctx.max_seqs, graphs=ctx.graphs, log=ctx.say)
    ctx.engine_setup_s, ctx.graph_sizes = engines.setup_s, engines.graph_sizes

    def job(path: str, policy: str) -> JobConfig:
        # a fresh output folder per run: an existing one could be resumed instead of rerun
        return JobConfig(**{**base.to_dict(), "inputs": [path], "output": ctx.fresh_dir(), "policy": policy})

    if warm_rows:
        path = os.path.join(ctx.tmp, "warmup.jsonl")
        write_jsonl(warm_rows, path)
        run_job(job(path, policies[0]), loaded=lm, engine_factory=engines)
        engines.release()
    for ci, c in enumerate(ctx.cells):
        # repeats are interleaved (A B A B, not A A B B): a machine that slows down or speeds up during
        # the bench then weighs on every policy alike instead of on whichever ran in the slow stretch
        walls: dict[str, list[float]] = {p: [] for p in policies}
        best: dict[str, tuple] = {}
        for rep in range(ctx.repeat):
            for policy in policies:
                _free_memory()
                cfg = job(c["path"], policy)
                with _Probe(profile, ctx.dev.type == "cuda") as probe:
                    s = run_job(cfg, loaded=lm, engine_factory=engines)
                engines.release()  # zero the KV cache for the next run, outside any timed region
                walls[policy].append(s.wall_seconds)
                ctx.say(f"{c['label']}: {policy} run {rep + 1}/{ctx.repeat}: {s.wall_seconds:.2f} s")
                if policy not in best or s.wall_seconds < best[policy][0].wall_seconds:
                    best[policy] = (s, probe)
                if rep == 0:
                    ctx.outputs[(ci, policy)] = _read_token_ids(cfg.output)
                shutil.rmtree(cfg.output, ignore_errors=True)
                c["by_name"][policy] = _policy_entry(ctx, c, policy, walls[policy], *best[policy], profile)
                ctx.emit()
    if engines.fresh_engines:
        ctx.say(f"note: {engines.fresh_engines} run(s) did not match the shared engine and built their own")
    engines.close()
    del lm, engines
    _free_memory()  # the peers load their own copy of the weights


def _policy_entry(ctx: _Context, c: dict, policy: str, walls: list[float], s, probe: _Probe, profile: bool) -> dict[str, Any]:
    e = _entry(policy, "policy", list(walls), ctx.load_s, c, s.prompt_tokens_computed, s.output_tokens, ctx.flops_peak, ctx.nparams,
               peak_kv_gb=probe.peak_pages * probe.page_bytes / 1e9 if probe.page_bytes else None,
               decode_batch=_stats3([st.num_decodes for st in probe.steps if st.num_decodes > 0]),
               num_steps=s.num_steps, num_preemptions=s.num_preemptions)
    if len(walls) < ctx.repeat:
        e["runs_done"] = len(walls)
    if profile:
        e["profile"] = _profile(probe.times, s.wall_seconds)
    return e


def _run_peer(ctx: _Context, src, base: JobConfig, peer: str, batch_size: int, max_batch_tokens: int | None,
              warm_rows: list[dict] | None) -> None:
    """One peer on each cell (or an 'unavailable' entry); fills the cells' results, hands the report to
    ``ctx.emit`` after each cell."""
    reason = peers_mod.unavailable_reason(peer)
    if reason is not None:
        ctx.say(f"{peer}: unavailable ({reason})")
        for c in ctx.cells:
            c["by_name"][peer] = _unavailable(peer, reason)
        ctx.emit()
        return
    t = time.perf_counter()
    extra: dict[str, Any] = {}
    closer = None
    if peer == "vllm":
        vp = _load_vllm(ctx, src, base, max_batch_tokens)
        closer = vp.close
        extra["version"] = ctx.peer_versions["vllm"] = vp.version or "?"

        def run(rows: list[dict]) -> PeerRun:
            r = vp.run(rows, ctx.dev)
            extra["torch_threads"] = vp.threads  # vLLM's CPU worker may set its own
            return r
    else:
        hf = peers_mod.load_hf_model(src, ctx.mcfg, ctx.dt, ctx.dev)

        def run(rows: list[dict]) -> PeerRun:
            if peer == "transformers":
                return peers_mod.run_static(hf, rows, ctx.dev, batch_size=batch_size)
            return peers_mod.run_continuous(hf, rows, ctx.dev, max_batch_tokens)
    load_s = time.perf_counter() - t
    ctx.say(f"{peer}: loaded in {load_s:.1f} s")

    try:
        if warm_rows:
            run(warm_rows)
        kv_token_bytes = ctx.mcfg.kv_bytes_per_token(torch.empty((), dtype=ctx.dt).element_size())
        for ci, c in enumerate(ctx.cells):
            walls, best = [], None
            for rep in range(ctx.repeat):
                _free_memory()
                r = run(c["cell"].rows)
                walls.append(r.wall_s)
                ctx.say(f"{c['label']}: {peer} run {rep + 1}/{ctx.repeat}: {r.wall_s:.2f} s")
                best = r if best is None or r.wall_s < best.wall_s else best
                if rep == 0:
                    ctx.outputs[(ci, peer)] = r.outputs
            c["by_name"][peer] = _entry(
                peer, "peer", walls, load_s, c, best.prompt_tokens_computed, sum(len(v) for v in best.outputs.values()),
                ctx.flops_peak, ctx.nparams,
                peak_kv_gb=best.peak_kv_tokens * kv_token_bytes / 1e9 if best.peak_kv_tokens is not None else None,
                decode_batch=peers_mod.decode_batch_stats(best.decode_batches), **extra,
            )
            ctx.emit()
    finally:
        if closer is not None:
            closer()
        run = hf = vp = None  # drop the weights before the next peer loads its own  # noqa: F841
        _free_memory()


def _load_vllm(ctx: _Context, src, base: JobConfig, max_batch_tokens: int | None):
    """The vLLM peer's engine on the bench's weights (``vllm_peer``), with the fcfs-lru baseline's limits."""
    from batchllm.bench import vllm_peer
    from batchllm.build import default_token_budget, kv_pool_pages, model_max_len

    folder = vllm_peer.export_hf_folder(src, ctx.mcfg, ctx.dt, os.path.join(ctx.tmp, "vllm-model"))
    longest = max(len(r["prompt_token_ids"]) + r["max_tokens"] for c in ctx.cells for r in c["cell"].rows)
    budget = max_batch_tokens or default_token_budget(ctx.dev)
    kv_tokens = base.kv_cache_tokens
    if kv_tokens is None and ctx.dev.type != "cuda":
        # vLLM's CPU default takes most of the RAM; give it batchllm's CPU pool (a quarter of it, <= 4 GiB)
        kv_tokens = kv_pool_pages(base, ctx.mcfg, ctx.dev, ctx.dt, budget) * base.page_size
    return vllm_peer.VllmPeer(
        folder, dtype=ctx.dt, device=ctx.dev, max_model_len=min(model_max_len(base, ctx.mcfg), max(longest, 16)),
        page_size=base.page_size, max_num_batched_tokens=budget, kv_cache_tokens=kv_tokens,
        gpu_memory_utilization=base.gpu_memory_utilization,
    )


def _token_counts(cell: Cell) -> dict[str, int]:
    trie = PrefixTrie.build([r["prompt_token_ids"] for r in cell.rows])
    return {"prompt_tokens": cell.prompt_tokens, "unique_prompt_tokens": int(trie.unique_tokens())}


def _read_token_ids(out_dir: str) -> dict[str, list[int]]:
    from batchllm.io.writer import read_results

    return {r["custom_id"]: r["token_ids"] for r in read_results(out_dir).to_pylist() if r.get("error_code") is None}


def _profile(times: dict[str, float], wall: float) -> dict[str, float]:
    out = {k: times.get(k, 0.0) for k in PROFILE_KINDS if k != "other"}
    # the engine loop itself, building sequences, job bookkeeping (status file), what the pipeline adds later
    out["other"] = max(0.0, wall - sum(out.values()))
    return out


def _ratios(results: list[dict], outputs: list[dict[str, list[int]] | None], first_is_reference: bool = True) -> None:
    """``wall_vs_first`` and ``same_tokens_as_first`` of each entry against ``results[0]``; None for all
    when the reference (the first name) has not been measured in this cell yet (a partial report)."""
    if not results:
        return
    first, first_out = results[0], outputs[0]
    for e, out in zip(results, outputs):
        ok = first_is_reference and e.get("wall_s") is not None and first.get("wall_s")
        e["wall_vs_first"] = e["wall_s"] / first["wall_s"] if ok else None
        if not first_is_reference or out is None or first_out is None:
            e["same_tokens_as_first"] = None
        else:
            e["same_tokens_as_first"] = sum(out.get(k) == v for k, v in first_out.items()) / max(1, len(first_out))


def _aggregate(cells: list[dict], names: list[str], flops_peak: float | None, nparams: int) -> list[dict]:
    """Top-level entries of a multi-cell workload: sums over cells, geometric-mean ratios. In a partial
    report a name covers the cells measured so far (``cells_measured`` when fewer than all)."""
    out = []
    for name in names:
        pairs = [(c, c["by_name"][name]) for c in cells if name in c["by_name"]]
        if not pairs:
            continue
        per = [e for _, e in pairs]
        partial = {"cells_measured": len(per)} if len(per) < len(cells) else {}
        if any(e.get("unavailable") for e in per):
            out.append({**_unavailable(name, per[0].get("unavailable") or "unavailable in some cells"), **partial})
            continue
        wall = sum(e["wall_s"] for e in per)
        prompt = sum(e["prompt_tokens"] for e in per)
        outs = sum(e["output_tokens"] for e in per)
        computed = [e["prompt_tokens_computed"] for e in per]
        unique = sum(c["unique_prompt_tokens"] for c, _ in pairs)
        ratios = [e["wall_vs_first"] for e in per if e.get("wall_vs_first")]
        same = [e["same_tokens_as_first"] for e in per if e.get("same_tokens_as_first") is not None]
        kv = [e["peak_kv_gb"] for e in per if e.get("peak_kv_gb") is not None]
        db = [e["decode_batch"] for e in per if e.get("decode_batch")]
        n_runs = min(len(e["wall_s_runs"]) for e in per)
        out.append({
            "policy": name, "kind": per[0]["kind"], "wall_s": wall,
            "wall_s_runs": [sum(x) for x in zip(*(e["wall_s_runs"][:n_runs] for e in per))],
            "load_s": per[0]["load_s"], "total_tok_s": (prompt + outs) / wall, "output_tok_s": outs / wall,
            "prefill_saving": 1 - sum(computed) / prompt if None not in computed else None,
            "effective_mfu": 2 * nparams * (unique + outs) / wall / flops_peak if flops_peak else None,
            "prompt_tokens": prompt, "prompt_tokens_computed": sum(computed) if None not in computed else None,
            "output_tokens": outs, "peak_kv_gb": max(kv) if kv else None,
            # the median is the median of the cells' medians
            "decode_batch": {"min": min(d["min"] for d in db), "median": float(statistics.median(d["median"] for d in db)),
                             "max": max(d["max"] for d in db)} if db else None,
            "wall_vs_first": math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else None,
            "same_tokens_as_first": sum(same) / len(same) if same else None,
            **({"profile": {k: sum(e["profile"][k] for e in per) for k in PROFILE_KINDS}} if "profile" in per[0] else {}),
            **({"version": per[0]["version"]} if "version" in per[0] else {}),
            **partial,
        })
    return out
