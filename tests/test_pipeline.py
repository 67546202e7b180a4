"""Plan -> engine glue: how build_sources turns plan groups and n > 1 samples into shared prefixes."""

import numpy as np

from batchllm.engine.sequence import Sequence, SharedPrefix
from batchllm.io.requests import Request
from batchllm.pipeline import build_sources
from batchllm.plan.plan import build_plan
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
    plan = build_plan([r.token_ids for r in rs], np.ones(len(rs)))
    got = units(build_sources(rs, plan, frozenset(), 0))
    shared = [u for u in got if u[0] > 0]
    assert (20, [(0, 0), (1, 0), (2, 0)]) in [(p, sorted(m)) for p, m in shared]
    assert (3, [(3, 0), (3, 1), (3, 2)]) in [(p, sorted(m)) for p, m in shared]


def test_many_samples_with_long_own_prompts_leave_the_group():
    # 3 requests share a 20-token system prompt, own 200 tokens each, n = 8: sharing each request's whole
    # prompt among its samples saves far more than sharing the 20 tokens across requests
    system = list(range(1000, 1020))
    rs = [req(i, system + [5000 + 300 * i + k for k in range(200)], n=8) for i in range(3)]
    plan = build_plan([r.token_ids for r in rs], np.full(3, 8.0))
    assert [g.prefix_len for g in plan.groups] == [20]
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
    """Without a plan (fcfs-lru) a request's n samples are n plain sequences in input order, sharing its
    prompt only through the page cache, as vLLM fans a request out into n child requests."""
    rs = [req(0, [1, 2, 3, 4, 5], n=3), req(1, [1, 2, 3, 9])]
    items = list(build_sources(rs, None, frozenset(), 0))
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
    engine.run(build_sources(rs, None, frozenset(), 0, page_size=4), done.append)
    done.sort(key=lambda s: s.sample_index)
    # the first sample computes the prompt; the others hit its 2 full pages in the same step
    assert [s.num_cached for s in done] == [0, 8, 8]
    assert len({tuple(s.output_ids) for s in done}) == 1  # greedy: the same tokens
    engine.pool.check_integrity()
