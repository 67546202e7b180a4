"""One engine setup for every run of a bench process: KV cache, pool sizing and decode graphs built once.

``run_job`` builds its engine with ``build.make_engine``: a KV pool sized from a memory profile (on
CUDA a warm-up forward at the step token budget), the KV tensors, and CUDA graphs for up to 67 decode
batch sizes. A bench calls ``run_job`` once per policy, repeat and prefix-grid cell, and paid that
setup (inside each run's wall time) every time. ``BenchEngines`` does it once per bench:

- one pool sizing (one memory profile on CUDA) for all policies: the profile takes the largest of the
  policies' sampled rows and graph batch, so every policy runs on the same number of KV pages;
- one KV cache, one attention backend, one ``ModelRunner`` with its captured graphs, shared by the
  engines of all runs;
- graphs only for the batch sizes a run can reach: decode batches are bounded by the step budget,
  ``max_num_seqs``, the sequences of the workload (``max_seqs``) and the KV pages (every decoding
  sequence holds a page of its own), and capture stops at the bucket that holds that bound
  (``cuda_graphs.reachable_graph_batch``: the same bucket for every step as with all sizes captured).

Every run still starts clean: a new ``LLMEngine`` (fresh scheduler, page pool and, for fcfs-lru, an
empty prefix cache; no step statistics), with the KV tensors zeroed after the previous run (``release``,
called by the harness outside the timed region) exactly as a fresh ``KVCache`` is.

The harness passes this object to ``run_job`` as its ``engine_factory``; a run whose engine options
differ from the bench's gets a fresh engine from ``build.make_engine``.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from batchllm.config import JobConfig
from batchllm.engine import cuda_graphs
from batchllm.engine.attention import get_backend
from batchllm.engine.engine import LLMEngine
from batchllm.engine.kv_cache import KVCache
from batchllm.engine.model_runner import ModelRunner
from batchllm.models.tokenizer import eos_token_ids

# JobConfig fields make_engine reads, besides the policy: a run whose values differ gets a fresh engine
ENGINE_FIELDS = ("max_num_batched_tokens", "max_num_seqs", "attention", "enforce_eager", "kv_cache_tokens", "kv_cache_dtype",
                 "gpu_memory_utilization", "page_size", "max_model_len", "model", "device", "dtype")


class BenchEngines:
    """The shared engine parts of one bench (module docstring); ``self(cfg, lm, max_model_len)`` has
    ``build.make_engine``'s signature and returns a fresh ``LLMEngine`` over them.

    ``graphs``: the runner's graph mode ("auto": CUDA graphs on CUDA unless ``enforce_eager``; "static"
    runs the graph path eagerly, for CPU tests). ``setup_s``: seconds spent building; ``engines_built``
    counts the engines handed out, ``fresh_engines`` the runs that did not match and got their own."""

    def __init__(self, base: JobConfig, lm, policies: list[str] | tuple[str, ...], max_seqs: int, *,
                 graphs: str | None = None, log=None):
        from batchllm import build

        t0 = time.perf_counter()
        self.base, self.lm = base, lm
        say = log or (lambda msg: None)
        mcfg, dev = lm.config, lm.device
        self.budget = base.max_num_batched_tokens or build.default_token_budget(dev)
        self.backend = get_backend(build.resolve_attention(base.attention, dev))
        limits = [build.policy_limits(dataclasses.replace(base, policy=p))[0] for p in policies] or [None]
        most_seqs = max(cuda_graphs.DEFAULT_MAX_GRAPH_BATCH if m is None else m for m in limits)
        # what any run of this bench can have in one step: sampled rows, decoding sequences
        reach = max(1, min(self.budget, max(self.budget if m is None else m for m in limits), max_seqs))
        graph_max = min(cuda_graphs.DEFAULT_MAX_GRAPH_BATCH, self.budget, most_seqs)
        graph_batch = cuda_graphs.reachable_graph_batch(graph_max, reach)
        self.graphs = graphs or ("off" if base.enforce_eager else "auto")
        uses_graphs = self.graphs != "off" and dev.type == "cuda" and cuda_graphs.graph_safe(self.backend)
        kv_dtype = build.resolve_kv_cache_dtype(base.kv_cache_dtype, lm.dtype)  # batchllm's runs only; peers keep theirs
        pages = build.kv_pool_pages(base, mcfg, dev, kv_dtype, self.budget, model=lm.model, backend=self.backend,
                                       sample_rows=reach, graph_batch=graph_batch if uses_graphs else 0)
        self.max_model_len = build.fit_to_pool(pages, base.page_size, build.model_max_len(base, mcfg))
        self.kv = KVCache(mcfg, pages, base.page_size, kv_dtype, dev)
        # every decoding sequence holds at least one page of its own: the pool bounds the decode batch too
        self.graph_batch = cuda_graphs.reachable_graph_batch(graph_max, min(reach, pages))
        self.runner = ModelRunner(lm.model, self.kv, self.backend, dev, graphs=self.graphs,
                                  max_model_len=self.max_model_len, max_graph_batch=self.graph_batch)
        self.eos = frozenset(eos_token_ids(lm.tokenizer, mcfg))
        self.graph_sizes = list(self.runner.graphs.sizes) if self.runner.graphs is not None else []
        self.engines_built = self.fresh_engines = 0
        self._dirty = False
        self.setup_s = time.perf_counter() - t0
        say(f"engine set up in {self.setup_s:.1f} s: {pages:,} KV pages of {base.page_size} tokens, "
            f"{len(self.graph_sizes)} decode graph size(s){f' up to {self.graph_batch}' if self.graph_sizes else ''}")

    def matches(self, cfg: JobConfig, lm) -> bool:
        return lm is self.lm and all(getattr(cfg, f) == getattr(self.base, f) for f in ENGINE_FIELDS)

    def __call__(self, cfg: JobConfig, lm, max_model_len: int) -> tuple[LLMEngine, frozenset[int]]:
        from batchllm import build

        if not self.matches(cfg, lm) or max_model_len != build.model_max_len(self.base, lm.config):
            self.fresh_engines += 1
            return build.make_engine(cfg, lm, max_model_len)
        if self._dirty:  # the harness calls release() after each run, outside the timed region
            self.release()
        sched = build.scheduler_config(cfg, self.budget, self.max_model_len)
        caching = build.policy_limits(cfg)[2]
        # graphs="off": this engine's own runner is a throwaway (no capture); it runs on the shared one
        engine = LLMEngine(lm.model, lm.tokenizer, self.kv, self.backend, sched, lm.device, lm.config.vocab_size,
                           prefix_caching=caching, graphs="off", sampler_backend=cfg.sampler)
        engine.runner = self.runner
        self.engines_built += 1
        self._dirty = True
        return engine, self.eos

    def release(self) -> None:
        """Return the KV cache to a fresh cache's state (all zeros) for the next run. On CUDA in place
        (captured graphs hold the addresses); on the CPU as new zero pages (calloc: nothing is touched
        until used, as for a fresh ``KVCache``), swapped into the same list the runner and graphs read."""
        layers = self.kv.layers
        if layers[0].device.type == "cuda":
            for layer in layers:
                layer.zero_()
        else:
            layers[:] = KVCache(self.lm.config, self.kv.num_pages, self.kv.page_size, layers[0].dtype, layers[0].device).layers
        self._dirty = False

    def close(self) -> None:
        """Drop the KV cache, runner and graphs (the peers load their own weights next)."""
        self.kv = self.runner = self.backend = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
