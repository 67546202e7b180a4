"""Plan -> engine glue: how build_sources turns a job's plan (plan_requests: groups, the n > 1 split, outer
prefixes) into shared prefixes and sequences."""

import numpy as np

from batchllm.engine.sequence import Sequence, SharedPrefix
from batchllm.io.requests import Request
from batchllm.engine.sources import build_sources
from batchllm.plan.plan import plan_requests
from batchllm.sampling_params import SamplingParams


def req(i, ids, n=1):
    r = Request(custom_id=f"r{i}", input_file="f", input_index=i, sampling=SamplingParams(n=n), prompt_token_ids=list(ids))
    r.token_ids = np.asarray(ids, dtype=np.int32)
    return r


def units(items):
    """[(prefix length or 0, [(request, sample), ...]), ...] in yield order."""
    out = []
    for it in items:
        if isinstance(it, SharedPrefix):
            out.append((it.length, []))
        else:
            assert isinstance(it, Sequence)
            if it.prefix is None:
                out.append((0, [(it.request_index, it.sample_index)]))
            else:
                assert out[-1][0] == it.prefix.length
                out[-1][1].append((it.request_index, it.sample_index))
    return out


def test_group_members_share_the_group_prefix_and_samples_share_their_prompt():
    system = list(range(100, 120))  # 20 shared tokens
    rs = [req(i, system + [200 + 10 * i + k for k in range(5)]) for i in range(3)]
    rs.append(req(3, [7, 8, 9, 10], n=3))  # alone: its 3 samples share all but the last token
    plan = plan_requests(rs, "batchllm", None, 16)
    got = units(build_sources(rs, plan, frozenset(), 0))
    shared = [u for u in got if u[0] > 0]
    assert (20, [(0, 0), (1, 0), (2, 0)]) in [(p, sorted(m)) for p, m in shared]
    assert (3, [(3, 0), (3, 1), (3, 2)]) in [(p, sorted(m)) for p, m in shared]


def test_many_samples_with_long_own_prompts_leave_the_group():
    # 3 requests share a 20-token system prompt, own 200 tokens each, n = 8: sharing each request's whole
    # prompt among its samples saves far more than sharing the 20 tokens across requests
    system = list(range(1000, 1020))
    rs = [req(i, system + [5000 + 300 * i + k for k in range(200)], n=8) for i in range(3)]
    plan = plan_requests(rs, "batchllm", None, 16)
    # the plan splits them out: each request is a group of its own (all but its last token shared)
    assert [(g.prefix_len, g.members.tolist()) for g in plan.groups] == [(219, [0]), (219, [1]), (219, [2])]
    got = units(build_sources(rs, plan, frozenset(), 0))
    # the group prefix's first page (16 of its 20 tokens) becomes an outer prefix that the three
    # requests' own prefixes extend
    assert [(p, len(m)) for p, m in got] == [(16, 0), (219, 8), (219, 8), (219, 8)]
    prefixes = [it for it in build_sources(rs, plan, frozenset(), 0) if isinstance(it, SharedPrefix)]
    outer, own = prefixes[0], prefixes[1:]
    assert outer.prefix is None and outer.unfinished == 3 and all(p.prefix is outer and p.unfinished == 8 for p in own)
    computed = 16 + sum(p.length - 16 for p in own) + 24  # each sample computes its last token
    assert computed == 16 + 3 * 203 + 24  # instead of 20 + 24 * 200 = 4,820 with the group prefix only


def test_baseline_fans_samples_out_as_independent_sequences():
    """In the baseline's plan (fcfs-lru) a request's n samples are n plain sequences in input order, sharing its
    prompt only through the page cache, as vLLM fans a request out into n child requests."""
    rs = [req(0, [1, 2, 3, 4, 5], n=3), req(1, [1, 2, 3, 9])]
    items = list(build_sources(rs, plan_requests(rs, "fcfs-lru", None, 16), frozenset(), 0))
    assert all(isinstance(it, Sequence) and it.prefix is None for it in items)
    assert [(it.request_index, it.sample_index) for it in items] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert len({it.seed for it in items[:3]}) == 3  # each sample keeps its own seed


def test_baseline_samples_reuse_the_prompt_pages_through_the_cache():
    import torch

    from batchllm.engine.attention import get_backend
    from batchllm.engine.engine import LLMEngine
    from batchllm.engine.kv_cache import KVCache
    from batchllm.engine.scheduler import SchedulerConfig
    from tests.engine_utils import FakeTokenizer, build, random_state_dict, tiny_config

    cfg = tiny_config(num_layers=1)
    model = build(cfg, random_state_dict(cfg, seed=5))
    prompt = list(range(3, 14))  # 11 tokens: 2 full pages of 4 and a partial one
    rs = [req(0, prompt, n=3)]
    rs[0].sampling = SamplingParams(n=3, max_tokens=3, temperature=0.0)
    sched = SchedulerConfig(page_size=4, max_num_batched_tokens=64, max_model_len=cfg.max_position_embeddings)
    engine = LLMEngine(model, FakeTokenizer(), KVCache(cfg, 64, 4, torch.float32, "cpu"), get_backend("torch"), sched,
                       torch.device("cpu"), cfg.vocab_size, prefix_caching=True)
    done = []
    engine.run(build_sources(rs, plan_requests(rs, "fcfs-lru", None, 4), frozenset(), 0, page_size=4), done.append)
    done.sort(key=lambda s: s.sample_index)
    # the first sample computes the prompt; the others hit its 2 full pages in the same step
    assert [s.num_cached for s in done] == [0, 8, 8]
    assert len({tuple(s.output_ids) for s in done}) == 1  # greedy: the same tokens
    engine.pool.check_integrity()


def _engine(max_model_len: int, page_size: int = 4):
    import torch

    from batchllm.engine.attention import get_backend
    from batchllm.engine.engine import LLMEngine
    from batchllm.engine.kv_cache import KVCache
    from batchllm.engine.scheduler import SchedulerConfig
    from tests.engine_utils import FakeTokenizer, build, random_state_dict, tiny_config

    cfg = tiny_config(num_layers=1)
    model = build(cfg, random_state_dict(cfg, seed=5))
    sched = SchedulerConfig(page_size=page_size, max_num_batched_tokens=64, max_model_len=max_model_len)
    return LLMEngine(model, FakeTokenizer(), KVCache(cfg, 64, page_size, torch.float32, "cpu"), get_backend("torch"), sched,
                     torch.device("cpu"), cfg.vocab_size)


def test_run_plan_turns_prompts_the_pool_cannot_hold_into_rows_and_runs_the_rest_of_the_plan():
    """execute.run_plan: a prompt of the engine's max_model_len or more is a prompt_too_long record and
    leaves the plan; the rest runs as planned (prompt tokens computed = the reduced plan's), each sample
    handed on with its output row; the run's steps and preview are its own."""
    from batchllm.execute import EngineCallbacks, run_plan
    from batchllm.io.requests import PROMPT_TOO_LONG

    engine = _engine(max_model_len=12)
    rs = [req(0, [5, 6, 7, 8, 9, 10, 11]), req(1, list(range(20, 34))), req(2, [5, 6, 7, 8, 9, 10, 12], n=2)]
    for r in rs:
        r.sampling = SamplingParams(n=r.sampling.n, max_tokens=3, temperature=0.0, ignore_eos=True)
    plan = plan_requests(rs, "batchllm", None, 4)
    too_long, finished = [], []
    cb = EngineCallbacks(lambda r, e: too_long.append((r.custom_id, e)), lambda i, r, s, row: finished.append((i, row)),
                         lambda stats: None, lambda: False)
    run = run_plan(engine, frozenset(), rs, plan, seed=0, page_size=4, preview=2, callbacks=cb)
    assert [(cid, e.error_code) for cid, e in too_long] == [("r1", PROMPT_TOO_LONG)]
    assert "prompt has 14 tokens; the KV cache holds at most 12 tokens per sequence" in too_long[0][1].error_message
    assert sorted((i, row["sample_index"]) for i, row in finished) == [(0, 0), (2, 0), (2, 1)]
    assert all(row["completion_tokens"] == 3 and row["custom_id"] == rs[i].custom_id for i, row in finished)
    assert not run.stopped and run.steps == engine.step_stats and len(run.preview) == 2
    assert run.prompt_tokens_computed == plan.without([1]).planned_prompt_tokens

    # a stop after the first step: the run ends there, with only that step
    stopped = run_plan(engine, frozenset(), rs, plan, seed=0, page_size=4, preview=0,
                       callbacks=EngineCallbacks(lambda r, e: None, lambda *a: None, lambda stats: None, lambda: True))
    assert stopped.stopped and len(stopped.steps) == 1 and stopped.preview == []
