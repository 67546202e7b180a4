"""Graphed decode steps on the CPU: the ``static`` mode runs the exact padded, static-shape forward a CUDA
graph captures, eagerly. Tokens must equal unpadded eager steps (torch and Triton backends), padded rows
must never write the KV cache, each step must make one host-to-device copy, and a failed capture must
fall back to eager with one warning. The ``gpu``-marked tests capture real graphs (scripts/gpu_check.sh)."""

from __future__ import annotations

import functools
import logging
import random

import numpy as np
import pytest
import torch
from batchllm.kernels.backend import TritonAttention
from batchllm.kernels.paged_attention import AttentionTuning

from batchllm.engine import cuda_graphs
from batchllm.engine.attention import TorchAttention
from batchllm.engine.attention_backend import PrefixGroupDescriptor
from batchllm.engine.engine import LLMEngine
from batchllm.engine.kv_cache import KVCache
from batchllm.engine.model_runner import ModelRunner
from batchllm.engine.scheduler import ScheduledStep
from batchllm.engine.sequence import Sequence
from batchllm.sampling_params import SamplingParams
from tests import engine_utils
from tests.engine_utils import build, random_state_dict, run_engine, tiny_config

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# these build CPU models: Triton runs CPU tensors only interpreted, which is off when a GPU is present
interpreted = pytest.mark.skipif(torch.cuda.is_available(), reason="Triton on CPU tensors needs the interpreter")
TRITON_CPU = pytest.param(TritonAttention, marks=interpreted)


# -- bucketing --------------------------------------------------------------------------------------

def test_capture_sizes_and_buckets():
    assert cuda_graphs.capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = cuda_graphs.capture_sizes(512)
    assert sizes[:6] == [1, 2, 4, 8, 16, 24] and sizes[-1] == 512 and len(sizes) == 67
    assert [cuda_graphs.bucket_for(sizes, n) for n in (1, 3, 8, 9, 512, 513)] == [1, 4, 8, 16, 512, None]


def test_prefer_graph_leaves_big_shared_prefixes_to_the_eager_path():
    lens = [40, 40, 40, 40]
    assert cuda_graphs.prefer_graph(lens, [])
    assert not cuda_graphs.prefer_graph(lens, [PrefixGroupDescriptor(0, 4, 32)])  # 96 of 160 reads shared
    assert cuda_graphs.prefer_graph(lens, [PrefixGroupDescriptor(0, 2, 8)])  # 8 of 160


# -- whole runs: static graphed decode == eager -----------------------------------------------------

def _run(model, cfg, prompts, params, backend, graphs, **kw):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_utils, "get_backend", lambda name: backend)
        mp.setattr(engine_utils, "LLMEngine", functools.partial(LLMEngine, graphs=graphs))
        return run_engine(model, cfg, prompts, params, **kw)


def _prompts(seed, count, vocab, lo=3, hi=20):
    r = random.Random(seed)
    return [[r.randrange(vocab) for _ in range(r.randint(lo, hi))] for _ in range(count)]


def test_static_graph_steps_match_eager_torch():
    cfg = tiny_config()
    model = build(cfg, random_state_dict(cfg, seed=11))
    prompts = _prompts(1, 7, cfg.vocab_size)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expect, eager = _run(model, cfg, prompts, params, TorchAttention(), "off", budget=24)
    got, engine = _run(model, cfg, prompts, params, TorchAttention(), "static", budget=24)
    for i in range(len(prompts)):
        assert got[i][0].output_ids == expect[i][0].output_ids, f"prompt {i}"
    runner = engine.runner
    assert runner.graphs is not None and runner.graphs.replays > 0
    assert eager.runner.graphs is None
    # one host-to-device copy per step, eager or graphed
    assert runner.buffers.copies + runner.graph_buffers.copies == len(engine.step_stats)
    # decode steps of 7, 6, ... sequences ran padded to buckets 8 and 4
    assert any(s.num_decodes == s.num_seqs and s.num_seqs not in (1, 2, 4, 8) for s in engine.step_stats)
    engine.pool.check_integrity()


def test_static_graph_steps_with_shared_prefixes_and_sampling():
    cfg = tiny_config("qwen3")
    model = build(cfg, random_state_dict(cfg, seed=12))
    r = random.Random(5)
    head = [r.randrange(cfg.vocab_size) for _ in range(6)]
    prompts = [head + [r.randrange(cfg.vocab_size) for _ in range(r.randint(1, 4))] for _ in range(3)]
    prompts += _prompts(2, 2, cfg.vocab_size)
    params = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, ignore_eos=True)
    kw = {"budget": 16, "prefix_lens": [6, 6, 6, 0, 0]}
    expect, _ = _run(model, cfg, prompts, params, TorchAttention(), "off", **kw)
    got, engine = _run(model, cfg, prompts, params, TorchAttention(), "static", **kw)
    for i in range(len(prompts)):
        assert got[i][0].output_ids == expect[i][0].output_ids, f"prompt {i}"
    assert engine.runner.graphs.replays > 0


@interpreted
def test_static_graph_steps_match_eager_triton():
    cfg = tiny_config(num_layers=1)
    model = build(cfg, random_state_dict(cfg, seed=13))
    prompts = _prompts(3, 3, cfg.vocab_size, 5, 12)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    # small pieces, many programs: the graphed decode really splits key ranges and merges them
    tuning = AttentionTuning(min_kv_chunk=4, programs_per_sm=4)
    expect, _ = _run(model, cfg, prompts, params, TritonAttention(tuning), "off", budget=32)
    backend = TritonAttention(tuning)
    got, engine = _run(model, cfg, prompts, params, backend, "static", budget=32)
    for i in range(len(prompts)):
        assert got[i][0].output_ids == expect[i][0].output_ids, f"prompt {i}"
    graphs = engine.runner.graphs
    assert graphs.replays > 0 and graphs.splits[4] == 2  # 4 rows x 2 kv heads, 4 programs x 4 "SMs"
    assert backend._static_plans, "graphed steps went through the static plan"
    tor, _ = _run(model, cfg, prompts, params, TorchAttention(), "off", budget=32)
    assert all(got[i][0].output_ids == tor[i][0].output_ids for i in range(len(prompts)))


# -- one padded step in detail ----------------------------------------------------------------------

def _decode_step(cfg, kv, n, page_size, seed=0):
    """n sequences that each just sampled their first token after a prompt already in the cache."""
    r = random.Random(seed)
    seqs, pages = [], iter(range(1, kv.num_pages))  # page 0 stays unused: padded rows read it
    for i in range(n):
        plen = r.randint(3, 9)
        s = Sequence(i, i, 0, np.array([r.randrange(cfg.vocab_size) for _ in range(plen)], dtype=np.int32),
                     SamplingParams(temperature=0.0), 0, frozenset())
        s.output_ids.append(r.randrange(cfg.vocab_size))
        s.num_computed = plen
        s.pages = [next(pages) for _ in range(-(-(plen + 1) // page_size))]
        seqs.append(s)
    return ScheduledStep(seqs, [1] * n, n)


@pytest.mark.parametrize("backend_cls", [TorchAttention, TRITON_CPU])
def test_padded_rows_never_write_the_kv_cache_and_logits_match(backend_cls):
    cfg = tiny_config(num_layers=1)
    model = build(cfg, random_state_dict(cfg, seed=14))
    ps = 4
    kv = KVCache(cfg, 16, ps, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    for layer in kv.layers:  # history: random K/V everywhere but page 0
        layer[:, 1:].copy_(torch.randn(layer[:, 1:].shape, generator=g))
    step = _decode_step(cfg, kv, 3, ps)
    eager_kv = KVCache(cfg, 16, ps, torch.float32, "cpu")
    for a, b in zip(eager_kv.layers, kv.layers):
        a.copy_(b)
    eager = ModelRunner(model, eager_kv, backend_cls(), "cpu")
    static = ModelRunner(model, kv, backend_cls(), "cpu", graphs="static", max_model_len=32, max_graph_batch=8)
    want, _ = eager.run(step)
    before = [layer.clone() for layer in kv.layers]
    got, samplers = static.run(step)
    assert static.graphs.replays == 1 and len(samplers) == 3 and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for layer, old, ref in zip(kv.layers, before, eager_kv.layers):
        # the same K/V up to rounding (a matmul over 4 rows may round unlike one over 3)
        torch.testing.assert_close(layer, ref, atol=1e-5, rtol=1e-5)
        changed = (layer != old).flatten(2).any(-1).any(0)  # (pages, offsets) written
        assert int(changed.sum()) == 3 and not changed[0].any(), "a padded row wrote the cache"


# -- fallbacks --------------------------------------------------------------------------------------

def test_cuda_mode_degrades_to_eager_without_a_gpu_or_a_graph_safe_backend(caplog):
    cfg = tiny_config(num_layers=1)
    model = build(cfg, random_state_dict(cfg, seed=15))
    kv = KVCache(cfg, 8, 4, torch.float32, "cpu")
    with caplog.at_level(logging.INFO):
        assert ModelRunner(model, kv, TorchAttention(), "cpu", graphs="cuda", max_model_len=32).graphs is None
        assert ModelRunner(model, kv, TorchAttention(), "cpu", graphs="auto", max_model_len=32).graphs is None
    assert not TorchAttention().supports_cuda_graphs() and TritonAttention().supports_cuda_graphs()


def test_graph_hooks_are_declared_with_defaults():
    """Every hook the runner and the graphs call is an ``AttentionBackend`` method; a backend that
    overrides none (the torch one) is never captured and needs no work list."""
    backend = TorchAttention()
    assert not backend.supports_cuda_graphs() and not cuda_graphs.graph_safe(backend)
    assert backend.static_decode_splits(8, 2, torch.device("cpu")) == 0
    with pytest.raises(NotImplementedError):
        backend.fill_static_decode_work(np.zeros((8, 6), np.int32), np.ones(8, np.int64), 1, 4)
    triton = TritonAttention()
    assert triton.supports_cuda_graphs() and triton.static_decode_splits(8, 2, torch.device("cpu")) >= 1


def test_failed_capture_warns_once_and_runs_eagerly(caplog, monkeypatch):
    cfg = tiny_config(num_layers=1)
    model = build(cfg, random_state_dict(cfg, seed=16))
    kv = KVCache(cfg, 8, 4, torch.float32, "cpu")
    runner = ModelRunner(model, kv, TorchAttention(), "cpu", graphs="static", max_model_len=32, max_graph_batch=4)
    graphs = runner.graphs
    graphs.mode = "cuda"
    # The failure is injected so that it happens on every machine: on a CUDA machine capturing this CPU
    # model would not fail at all (an empty graph, only a torch warning), and without CUDA the capture
    # fails before the first upload; either way the runner must fall back with exactly one warning.
    calls = []

    def failing_upload(b):
        calls.append(b)
        raise RuntimeError("injected capture failure")

    with caplog.at_level(logging.WARNING):
        assert graphs.capture(failing_upload) is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("batchllm")]
    assert len(warnings) == 1 and "run eagerly" in warnings[0].getMessage()
    if torch.cuda.is_available():
        assert calls and "injected capture failure" in warnings[0].getMessage()
    assert not graphs.captured


# -- GPU: real capture and replay -------------------------------------------------------------------

@pytest.mark.gpu
@gpu
def test_gpu_graph_replay_matches_eager_tokens():
    cfg = tiny_config(num_layers=2, hidden_size=128, intermediate_size=256, num_heads=8, num_kv_heads=2, head_dim=32)
    sd = random_state_dict(cfg, seed=17)
    model = build_on("cuda", cfg, sd)
    prompts = _prompts(4, 37, cfg.vocab_size, 5, 60)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outs = {}
    for graphs in ("off", "cuda"):
        outs[graphs], engine = run_cuda(model, cfg, prompts, params, graphs)
        if graphs == "cuda":
            assert engine.runner.graphs is not None and engine.runner.graphs.captured
            assert engine.runner.graphs.replays > 0
    assert outs["off"] == outs["cuda"]


def build_on(device, cfg, sd):
    from batchllm.models.llama import build_model

    return build_model(cfg, iter(sd.items()), torch.float32, device)


def run_cuda(model, cfg, prompts, params, graphs):
    from batchllm.engine.scheduler import SchedulerConfig

    kv = KVCache(cfg, 512, 16, torch.float32, "cuda")
    sched = SchedulerConfig(page_size=16, max_num_batched_tokens=256, max_model_len=cfg.max_position_embeddings)
    engine = LLMEngine(model, engine_utils.FakeTokenizer(), kv, TritonAttention(), sched, torch.device("cuda"),
                       cfg.vocab_size, graphs=graphs)
    done = {}
    seqs = [Sequence(i, i, 0, np.asarray(p, dtype=np.int32), params, i, frozenset()) for i, p in enumerate(prompts)]
    engine.run(iter(seqs), lambda s: done.__setitem__(s.request_index, list(s.output_ids)))
    return done, engine


# -- memory sizing, options -------------------------------------------------------------------------

def test_pool_formula_and_utilization_checks():
    from batchllm.engine import memory

    gib = 2**30
    got = memory.cuda_pool_bytes(total=100 * gib, weights=16 * gib, peak_activation=4 * gib, graph_reserve=gib,
                                 non_torch=gib, utilization=0.9)
    assert got == 90 * gib - 22 * gib
    for bad in (0, -0.1, 1.01):
        with pytest.raises(ValueError, match="gpu-memory-utilization"):
            memory.check_utilization(bad)


def test_job_config_validates_the_new_options(tmp_path):
    from batchllm.config import JobConfig, load_job_file, merge
    from batchllm.errors import BatchLLMError

    base = {"inputs": ["x.jsonl"], "output": "out"}
    for bad in (0.0, 1.5, -1):
        with pytest.raises(BatchLLMError, match=r"gpu_memory_utilization must be in \(0, 1\]"):
            JobConfig(**base, gpu_memory_utilization=bad).validate()
    JobConfig(**base, gpu_memory_utilization=1.0).validate()
    job = tmp_path / "job.toml"
    job.write_text('input = "x.jsonl"\noutput = "out"\n[engine]\nenforce_eager = true\ngpu_memory_utilization = 0.5\n')
    cfg = merge(load_job_file(str(job)), {"gpu_memory_utilization": None, "enforce_eager": None})
    assert cfg.enforce_eager is True and cfg.gpu_memory_utilization == 0.5
    assert merge(load_job_file(str(job)), {"enforce_eager": False}).enforce_eager is False


def test_attention_auto_resolves_per_device():
    from batchllm.build import resolve_attention

    assert resolve_attention("auto", torch.device("cpu")) == "torch"
    assert resolve_attention("auto", torch.device("cuda")) == "triton"
    assert resolve_attention("torch", torch.device("cuda")) == "torch"
    assert resolve_attention("triton", torch.device("cpu")) == "triton"


@pytest.mark.parametrize("backend_cls", [TorchAttention, TRITON_CPU])
def test_profiling_step_runs_and_writes_nothing(backend_cls):
    from batchllm.engine import memory

    cfg = tiny_config(num_layers=1)
    model = build(cfg, random_state_dict(cfg, seed=18))
    memory.dummy_step(model, backend_cls(), 37, 5, 4, torch.device("cpu"), torch.float32)
    memory.dummy_step(model, backend_cls(), 1, 1, 4, torch.device("cpu"), torch.float32)


@pytest.mark.gpu
@gpu
def test_gpu_memory_profile_is_sane():
    from batchllm.engine import memory

    cfg = tiny_config(num_layers=2, hidden_size=128, intermediate_size=256, num_heads=8, num_kv_heads=2, head_dim=32)
    model = build_on("cuda", cfg, random_state_dict(cfg, seed=19))
    prof = memory.profile_cuda(model, TritonAttention(), max_tokens=2048, sample_rows=256, graph_batch=64, page_size=16,
                               device=torch.device("cuda"), dtype=torch.float32)
    assert prof.weights > 0 and prof.peak_activation > 2048 * 128 * 4 and prof.graph_reserve >= memory.GRAPH_SLACK_BYTES
    assert 0 < prof.pool_bytes(0.9) < prof.pool_bytes(1.0) <= prof.total
