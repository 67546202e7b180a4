"""Multi-level sharing: outer prefixes over neighbouring groups (plan/nesting.py), and the engine
computing them once, holding them until the last extending prefix is released, under any memory."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchllm.engine.attention import get_backend
from batchllm.engine.engine import LLMEngine
from batchllm.engine.kv_cache import KVCache
from batchllm.engine.scheduler import SchedulerConfig
from batchllm.engine.sequence import SharedPrefix
from batchllm.engine.sources import build_sources
from batchllm.io.requests import Request
from batchllm.plan.nesting import nest, nest_by_lcp
from batchllm.plan.check import check_plan
from batchllm.plan.plan import build_plan, plan_requests
from batchllm.sampling_params import SamplingParams
from tests.engine_utils import FakeTokenizer, build, random_state_dict, tiny_config


def arr(*parts):
    return np.concatenate([np.asarray(p, dtype=np.int32) for p in parts])


# --- nest ----------------------------------------------------------------------------------------


def test_two_levels_under_one_system_prompt():
    system = np.arange(100)
    heads = []
    for b in range(2):
        block = np.arange(2000 + 100 * b, 2050 + 100 * b)
        heads += [arr(system, block, np.arange(9000 + 1000 * b + 30 * g, 9020 + 1000 * b + 30 * g)) for g in range(3)]
    heads.append(arr(system, np.arange(500, 520)))
    n = nest(heads)
    assert n.outer_len.tolist() == [100, 150, 150]
    assert n.outer_parent.tolist() == [-1, 0, 0]
    assert n.outer_first.tolist() == [0, 0, 3]
    assert n.group_parent.tolist() == [1, 1, 1, 2, 2, 2, 0]
    assert n.outer_tokens() == 100 + 50 + 50


def test_only_neighbours_nest_and_short_levels_are_skipped():
    s = np.arange(40)
    # groups 0 and 2 share 40 tokens but are not adjacent; 3 and 4 share only 10 (< 16)
    heads = [arr(s, [1, 2]), arr(np.arange(300, 340)), arr(s, [3, 4]), arr(np.arange(10), [7] * 30), arr(np.arange(10), [8] * 30)]
    n = nest(heads)
    assert n.num_outer == 0 and n.group_parent.tolist() == [-1] * 5
    assert nest([arr(s, [1]), arr(s, [2])], min_tokens=41).num_outer == 0


def test_outer_prefix_leaves_every_group_an_own_token():
    s = np.arange(30)
    n = nest([arr(s, [1, 2, 3]), s.astype(np.int32), arr(s, [9])])  # the middle group's prefix is all of s
    assert n.outer_len.tolist() == [29] and n.group_parent.tolist() == [0, 0, 0]


def test_outer_prefixes_end_on_a_page_boundary():
    s = np.arange(40)
    n = nest([arr(s, [1, 2]), arr(s, [3, 4])], align=16)
    assert n.outer_len.tolist() == [32]
    assert nest([arr(s[:20], [1]), arr(s[:20], [2])], align=16).num_outer == 1  # 16 of the 20 shared tokens
    assert nest([arr(s[:20], [1]), arr(s[:20], [2])], align=32).num_outer == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 70)), min_size=0, max_size=12), st.sampled_from([1, 4, 16]))
def test_lcp_rounded_down_to_a_page_gives_the_same_outer_prefixes(groups, align):
    """What a page-tree plan passes: neighbours' shared tokens in whole pages only."""
    rng = np.random.default_rng(0)
    bases = [rng.integers(0, 3, 80, dtype=np.int32) for _ in range(4)]
    heads = [bases[b][:k] for b, k in sorted(groups)]
    plen = [len(h) for h in heads]
    exact = [len(np.trim_zeros(np.cumprod(a[: min(len(a), len(b))] == b[: min(len(a), len(b))]), "b")) if x and y else 0
             for a, b, x, y in zip(heads[:-1], heads[1:], plen[:-1], plen[1:])]
    want = nest(heads, align=align)
    for got in (nest_by_lcp(plen, exact, align=align), nest_by_lcp(plen, [e // align * align for e in exact], align=align)):
        assert all(np.array_equal(a, b) for a, b in zip(got, want))


def test_empty_prefixes_never_nest():
    assert nest([np.zeros(0, np.int32)] * 3).num_outer == 0
    assert nest([]).num_outer == 0
    with pytest.raises(ValueError):
        nest([], min_tokens=0)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000))
def test_plans_with_nesting_are_valid_and_never_compute_more(seed):
    """Random three-level prompt trees: the plan checks out, and nesting only removes prefill tokens."""
    r = random.Random(seed)
    prompts = []
    for _ in range(r.randint(1, 3)):
        system = [r.randrange(50) for _ in range(r.randint(1, 40))]
        for _ in range(r.randint(1, 4)):
            block = [r.randrange(50) for _ in range(r.randint(0, 30))]
            for _ in range(r.randint(1, 5)):
                prompts.append(np.asarray(system + block + [r.randrange(50) for _ in range(r.randint(1, 6))], dtype=np.int32))
    r.shuffle(prompts)
    plan = build_plan(prompts, np.full(len(prompts), 4.0))
    check_plan(plan, prompts)
    single = plan.logical_prompt_tokens - sum((len(g.members) - 1) * g.prefix_len for g in plan.groups)
    assert plan.unique_prompt_tokens <= plan.planned_prompt_tokens <= single
    assert plan.planned_prompt_tokens == single - (sum(plan.nesting.parent_len(g.group_id) for g in plan.groups) - plan.nesting.outer_tokens())


# --- the engine ----------------------------------------------------------------------------------


def request(i, ids, n=1, max_tokens=6):
    r = Request(custom_id=f"r{i}", input_file="f", input_index=i, sampling=SamplingParams(n=n, max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                prompt_token_ids=list(ids))
    r.token_ids = np.asarray(ids, dtype=np.int32)
    return r


def nested_requests(seed: int, n_last: int = 1):
    """Two system prompts of 20 tokens, each with 2-3 few-shot blocks of 18 tokens, 2-3 requests per
    block; the last request asks for ``n_last`` samples."""
    r = random.Random(seed)
    prompts = []
    for _ in range(2):
        system = [r.randrange(97) for _ in range(20)]
        for _ in range(r.randint(2, 3)):
            block = [r.randrange(97) for _ in range(18)]
            prompts += [system + block + [r.randrange(97) for _ in range(r.randint(1, 5))] for _ in range(r.randint(2, 3))]
    r.shuffle(prompts)
    return [request(i, p, n=n_last if i == len(prompts) - 1 else 1) for i, p in enumerate(prompts)]


_MODEL = []


def model():
    if not _MODEL:
        cfg = tiny_config(num_layers=1)
        _MODEL.append((cfg, build(cfg, random_state_dict(cfg, seed=3))))
    return _MODEL[0]


def run(requests, plan, *, num_pages=400, budget=64, reserve=1.0):
    cfg, m = model()
    kv = KVCache(cfg, num_pages, 4, torch.float32, "cpu")
    sched = SchedulerConfig(page_size=4, max_num_batched_tokens=budget, max_model_len=cfg.max_position_embeddings, growth_reserve=reserve)
    engine = LLMEngine(m, FakeTokenizer(), kv, get_backend("torch"), sched, torch.device("cpu"), cfg.vocab_size)
    done = {}
    engine.run(build_sources(requests, plan, frozenset(), 0, page_size=4), lambda s: done.setdefault((s.request_index, s.sample_index), s.output_ids))
    return done, engine


def test_engine_computes_each_level_once_and_matches_unshared_outputs():
    reqs = nested_requests(0)
    plan = plan_requests(reqs, "batchllm", None, page_size=4)
    assert plan.nesting.num_outer == 2 and all(g.outer >= 0 for g in plan.groups)
    plain, _ = run(reqs, plan_requests(reqs, "fcfs-lru", None, page_size=4))
    got, engine = run(reqs, plan)
    assert got == plain
    assert engine.scheduler.prompt_tokens_computed == plan.planned_prompt_tokens
    prefixes = [x for x in build_sources(reqs, plan, frozenset(), 0, page_size=4) if isinstance(x, SharedPrefix)]
    outers = [p for p in prefixes if p.prefix is None]
    assert len(outers) == 2 and all(p.length == 20 for p in outers)
    assert all(p.prefix.length == 20 and p.length == 38 for p in prefixes if p.prefix is not None)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10_000), st.integers(16, 60), st.integers(4, 40), st.sampled_from([0.0, 1.0]), st.sampled_from([1, 3]))
def test_nested_prefixes_under_any_memory(seed, num_pages, budget, reserve, n_last):
    """Preemption, requeued prefixes and small budgets: the same greedy outputs as an unshared roomy
    run, and every page back in the pool."""
    reqs = nested_requests(seed, n_last)
    plan = plan_requests(reqs, "batchllm", None, page_size=4)
    plain, _ = run(reqs, plan_requests(reqs, "fcfs-lru", None, page_size=4))
    got, engine = run(reqs, plan, num_pages=num_pages, budget=budget, reserve=reserve)
    assert got == plain
    engine.pool.check_integrity()
    assert engine.pool.num_free == engine.pool.num_pages


def test_nested_job_fits_a_pool_with_one_page_of_headroom(tmp_path):
    """A 40-token system prompt over two 26-token blocks in a 6-page pool: the engine caps the context at
    5 pages, and a sequence under two prefix levels must still fit (outer prefixes end on a page
    boundary, so the chain copies one partial page, not one per level)."""
    import json

    from batchllm.config import JobConfig
    from batchllm.io.writer import read_results
    from batchllm.pipeline import run_job

    r = random.Random(0)
    system = [r.randrange(16, 4000) for _ in range(40)]
    rows = []
    for b in range(2):
        block = [r.randrange(16, 4000) for _ in range(26)]
        rows += [{"custom_id": f"b{b}r{i}", "prompt_token_ids": system + block + [r.randrange(16, 4000) for _ in range(4)],
                  "max_tokens": 200, "ignore_eos": True} for i in range(3)]
    path = tmp_path / "nested.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    cfg = JobConfig(inputs=[str(path)], output=str(tmp_path / "out"), model="dummy:tiny", device="cpu", dtype="float32",
                    kv_cache_tokens=96, page_size=16, preview=0)
    summary = run_job(cfg)
    out = read_results(str(tmp_path / "out"), verify=True).to_pylist()
    assert len(out) == 6 and all(x["error_code"] is None for x in out)
    assert summary.errors == 0
