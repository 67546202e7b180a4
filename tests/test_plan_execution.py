"""The plan is what runs: the engine computes exactly the prompt tokens the plan counts.

Every workload of docs/benchmarks.md (``bench/workloads.py``, at small sizes) is planned with
``plan_requests`` and run through ``build_sources`` on a random small model with a KV pool large enough
that nothing is preempted; the saving the plan promises (``Plan.saving``) must be the saving the
engine achieves (1 - ``prompt_tokens_computed`` / logical prompt tokens of every sample), token for
token. Also with ``n > 1`` samples (the split into groups of their own), for subsets: the parts a
set of Ray replicas runs, and for the page-granular planner (``plan/pages.py``), with group prefixes
token-exact (its tokens at hand) or ending on page boundaries (``PagePrompts`` alone).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchllm.bench.workloads import make_workload
from batchllm.engine.attention import get_backend
from batchllm.engine.engine import LLMEngine
from batchllm.engine.kv_cache import KVCache
from batchllm.engine.scheduler import SchedulerConfig
from batchllm.engine.sources import build_sources
from batchllm.io.requests import Request
from batchllm.plan.pages import PagePrompts
from batchllm.plan.check import check_plan
from batchllm.plan.plan import Plan, build_plan, plan_requests
from batchllm.sampling_params import SamplingParams
from tests.engine_utils import FakeTokenizer, build, random_state_dict, tiny_config

PAGE = 4
# small shapes of the five workloads; outer prefixes need levels of 16+ tokens (nesting.MIN_OUTER_TOKENS)
WORKLOADS = {
    "shared-prefix": dict(groups=3, per_group=4, prefix_len=40, suffix_len=6, output_len=3),
    "prefix-grid": dict(prefix_lens=[0, 18, 40], share_degrees=[2, 4], output_lens=[2], suffix_len=5, requests=8),
    "no-sharing": dict(requests=8, suffix_len=10, output_len=3),
    "decode-heavy-mix": dict(groups=4, per_group=3, prefix_len=40, suffix_len=6, output_len=6, short_output_len=2),
    "nested": dict(prefix_len=40, groups=3, sub_prefix_len=24, per_group=3, suffix_len=5, output_len=3),
}

CFG = tiny_config()


@pytest.fixture(scope="module")
def model():
    return build(CFG, random_state_dict(CFG, seed=3))


def requests_of(rows: list[dict], n: list[int] | None = None) -> list[Request]:
    out = []
    for i, row in enumerate(rows):
        sp = SamplingParams(n=n[i] if n else 1, max_tokens=row["max_tokens"], temperature=0.0, ignore_eos=True)
        r = Request(custom_id=row["custom_id"], input_file="f", input_index=i, sampling=sp,
                    prompt_token_ids=list(row["prompt_token_ids"]))
        r.token_ids = np.asarray(row["prompt_token_ids"], dtype=np.int32)
        out.append(r)
    return out


def run(model, requests, plan: Plan) -> tuple[int, dict]:
    """Run ``plan`` with no memory pressure; returns (prompt tokens computed, outputs by (request, sample)).
    ``requests``: the job's list, or a replica's {index: request}."""
    rs = requests.values() if isinstance(requests, dict) else requests
    need = sum(r.sampling.n * (len(r.token_ids) + r.sampling.max_tokens + PAGE) for r in rs)
    kv = KVCache(CFG, need // PAGE + 8, PAGE, torch.float32, "cpu")
    sched = SchedulerConfig(page_size=PAGE, max_num_batched_tokens=64, max_num_seqs=None, max_model_len=CFG.max_position_embeddings)
    engine = LLMEngine(model, FakeTokenizer(), kv, get_backend("torch"), sched, torch.device("cpu"), CFG.vocab_size)
    done: dict = {}
    engine.run(build_sources(requests, plan, frozenset(), 0, page_size=PAGE),
               lambda s: done.setdefault((s.request_index, s.sample_index), s.output_ids))
    assert engine.scheduler.num_preemptions == 0
    return engine.scheduler.prompt_tokens_computed, done


def achieved_saving(computed: int, requests) -> float:
    logical = sum(r.sampling.n * len(r.token_ids) for r in requests)
    return 1.0 - computed / logical


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_planned_saving_is_the_achieved_saving_on_every_workload(model, name):
    for cell in make_workload(name, WORKLOADS[name], vocab_size=CFG.vocab_size).cells:
        requests = requests_of(cell.rows)
        plan = plan_requests(requests, "batchllm", CFG.max_position_embeddings, PAGE)
        check_plan(plan, [r.token_ids for r in requests])
        computed, done = run(model, requests, plan)
        assert len(done) == len(requests)
        assert computed == plan.planned_prompt_tokens, cell.label
        assert achieved_saving(computed, requests) == plan.saving()
        if name in ("shared-prefix", "nested"):
            assert plan.saving() > 0.5
        if name == "nested":  # one group per sub-prefix, the system prompt an outer prefix of all three
            assert len(plan.groups) == 3 and plan.nesting.outer_len.tolist() == [40]


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_page_plans_compute_what_they_plan_and_give_the_token_plans_outputs(model, name):
    for cell in make_workload(name, WORKLOADS[name], vocab_size=CFG.vocab_size).cells:
        requests = requests_of(cell.rows, [1 + i % 2 for i in range(len(cell.rows))])
        prompts = [r.token_ids for r in requests]
        token_plan = plan_requests(requests, "batchllm", CFG.max_position_embeddings, PAGE, planner="tokens")
        _, want = run(model, requests, token_plan)
        exp = np.array([r.sampling.max_tokens * r.sampling.n for r in requests], dtype=np.float64)
        samples = [r.sampling.n for r in requests]
        pages_only = build_plan(PagePrompts.of(prompts, PAGE), exp, samples=samples, page_size=PAGE)
        for plan in (plan_requests(requests, "batchllm", CFG.max_position_embeddings, PAGE, planner="pages"), pages_only):
            check_plan(plan, prompts)
            computed, done = run(model, requests, plan)
            assert computed == plan.planned_prompt_tokens, cell.label
            assert done == want


def test_sources_refuse_a_member_that_does_not_start_with_its_group_prefix(model):
    """What a page-hash collision would do: a member whose tokens differ inside its group's prefix."""
    rows = make_workload("shared-prefix", WORKLOADS["shared-prefix"], vocab_size=CFG.vocab_size).cells[0].rows
    requests = requests_of(rows)
    plan = plan_requests(requests, "batchllm", None, PAGE, planner="pages")
    g = next(g for g in plan.groups if len(g.members) > 1)
    requests[int(g.members[-1])].token_ids = requests[int(g.members[-1])].token_ids.copy()
    requests[int(g.members[-1])].token_ids[g.prefix_len - 1] += 1
    with pytest.raises(ValueError, match="does not start with the group's prefix"):
        list(build_sources(requests, plan, frozenset(), 0, page_size=PAGE))


def test_planned_saving_is_achieved_with_many_samples_and_the_outputs_do_not_change(model):
    # the nested workload with n > 1 on some requests: some leave their group to share their own prompt
    rows = make_workload("nested", WORKLOADS["nested"], vocab_size=CFG.vocab_size).cells[0].rows
    n = [[1, 2, 5][i % 3] for i in range(len(rows))]
    requests = requests_of(rows, n)
    plan = plan_requests(requests, "batchllm", CFG.max_position_embeddings, PAGE)
    check_plan(plan, [r.token_ids for r in requests])
    assert any(len(g.members) == 1 and g.prefix_len == len(requests[g.members[0]].token_ids) - 1 for g in plan.groups)
    computed, done = run(model, requests, plan)
    assert computed == plan.planned_prompt_tokens
    assert achieved_saving(computed, requests) == plan.saving()
    # the baseline plan (no sharing) gives the same greedy outputs
    base = plan_requests(requests, "fcfs-lru", CFG.max_position_embeddings, PAGE)
    base_computed, base_done = run(model, requests, base)
    assert base_computed == base.planned_prompt_tokens == base.logical_prompt_tokens
    assert base_done == done


def test_replica_subsets_compute_what_they_plan_and_together_cover_the_job(model):
    rows = make_workload("nested", WORKLOADS["nested"], vocab_size=CFG.vocab_size).cells[0].rows
    requests = requests_of(rows)
    plan = plan_requests(requests, "batchllm", CFG.max_position_embeddings, PAGE)
    _, whole = run(model, requests, plan)
    G = len(plan.groups)
    got: dict = {}
    for ids in (list(range(0, G, 2)), list(range(1, G, 2))):
        part = plan.subset(ids)
        assert part.nesting.num_outer == (1 if len(ids) > 1 else 0)  # a lone group computes the system prompt itself
        mine = {i: requests[i] for i in part.order.tolist()}  # a replica receives only its requests
        check_plan(part, {i: r.token_ids for i, r in mine.items()})
        computed, done = run(model, mine, part)
        assert computed == part.planned_prompt_tokens
        got.update(done)
    assert got == whole


def test_sources_refuse_a_plan_made_for_another_page_size():
    rows = make_workload("nested", WORKLOADS["nested"], vocab_size=CFG.vocab_size).cells[0].rows
    requests = requests_of(rows)
    plan = plan_requests(requests, "batchllm", None, PAGE)
    assert plan.nesting.outer_len.tolist() == [40]
    with pytest.raises(ValueError, match="page boundary"):
        build_sources(requests, plan, frozenset(), 0, page_size=16)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.randoms(use_true_random=False))
def test_planned_tokens_are_computed_tokens_on_random_jobs(model, rnd):
    """Systems over blocks over own tokens, random lengths (page boundaries anywhere) and n in 1..4."""
    rows = []
    for _ in range(rnd.randint(1, 2)):
        system = [rnd.randrange(16, 97) for _ in range(rnd.randint(0, 30))]
        for _ in range(rnd.randint(1, 3)):
            block = system + [rnd.randrange(16, 97) for _ in range(rnd.randint(0, 20))]
            rows += [{"custom_id": str(len(rows) + j), "max_tokens": rnd.randint(1, 3),
                      "prompt_token_ids": block + [rnd.randrange(16, 97) for _ in range(rnd.randint(1, 12))]}
                     for j in range(rnd.randint(1, 3))]
    rnd.shuffle(rows)
    requests = requests_of(rows, [rnd.choice([1, 1, 2, 4]) for _ in rows])
    outputs = []
    for planner in ("tokens", "pages"):
        plan = plan_requests(requests, "batchllm", CFG.max_position_embeddings, PAGE, planner=planner)
        check_plan(plan, [r.token_ids for r in requests])
        computed, done = run(model, requests, plan)
        assert computed == plan.planned_prompt_tokens
        assert len(done) == sum(r.sampling.n for r in requests)
        outputs.append(done)
    assert outputs[0] == outputs[1]
