"""Tests of the planner: prefix tree, BatchLLM prefix groups, order, accounting, KV estimate, stats.

Property tests use tiny alphabets so that prompts share prefixes often; the groups are checked against
a direct pointer-tree transcription of the authors' procedure (``_RefCluster``) and the token counts
against brute force.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchllm.io.requests import Request
from batchllm.plan.check import check_plan
from batchllm.plan.groups import batchllm_groups
from batchllm.plan.kv_estimate import estimate_peak_kv_tokens
from batchllm.plan.plan import Plan, build_plan, plan_requests
from batchllm.sampling_params import SamplingParams
from batchllm.plan.stats import plan_stats
from batchllm.plan.trie import PrefixTrie

prompt_lists = st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=8), min_size=0, max_size=24)


def distinct_prefixes(prompts) -> int:
    return len({tuple(p[:k]) for p in prompts for k in range(1, len(p) + 1)})


def groups_as_sets(plan: Plan) -> tuple[set, set]:
    """(shared groups as {(prefix_len, members)}, requests in prefix-0 groups)."""
    shared = {(g.prefix_len, frozenset(g.members.tolist())) for g in plan.groups if g.prefix_len > 0}
    alone = {i for g in plan.groups if g.prefix_len == 0 for i in g.members.tolist()}
    return shared, alone


class _RefCluster:
    """Pointer-tree transcription of ``PromptPrefixCluster`` (authors' code): insert, enlarge, extract.

    Kept deliberately literal (insertion-order children, leaf markers, merge-and-break), with the two
    evident bugs fixed: the leaf test is ``prompt_id is not None`` and a prompt held by a merged node
    is kept.
    """

    class Node:
        def __init__(self, ids, parent=None, prompt_id=None):
            self.ids, self.parent, self.prompt_id, self.children = list(ids), parent, prompt_id, []

    def __init__(self, prompts):
        self.root = self.Node([])
        for i, p in enumerate(prompts):
            self._add(list(p), i)
        self._enlarge(self.root)

    def _add(self, ids, pid):
        node = self.root
        while node.children:
            matched = False
            for child in node.children:
                if child.prompt_id is not None:
                    continue
                k = 0
                while k < min(len(ids), len(child.ids)) and ids[k] == child.ids[k]:
                    k += 1
                if k > 0:
                    if k < len(child.ids):  # split the child
                        tail = self.Node(child.ids[k:], child)
                        tail.children = child.children
                        for c in tail.children:
                            c.parent = tail
                        child.ids, child.children = child.ids[:k], [tail]
                    node, ids, matched = child, ids[k:], True
                    break
            if not matched or not ids:
                break
        if ids:
            new = self.Node(ids, node)
            node.children.append(new)
            node = new
        node.children.append(self.Node([], node, pid))

    def _leaves(self, node):
        return 1 if not node.children else sum(self._leaves(c) for c in node.children)

    def _enlarge(self, node):
        for child in list(node.children):
            if child.prompt_id is not None:
                continue
            self._enlarge(child)
            for g in list(child.children):
                if g.prompt_id is not None and not g.ids:
                    continue
                if (self._leaves(g) - 1) * len(g.ids) - len(child.ids) > 0:
                    g.ids = child.ids + g.ids
                    g.parent = child.parent
                    child.parent.children.append(g)
                    child.children.remove(g)
                if len(child.children) == 1:
                    last = child.children[0]
                    child.ids += last.ids
                    child.children, child.prompt_id = last.children, last.prompt_id
                    break

    def groups(self, lens, min_prefix=1):
        shared, alone = set(), set()
        for c in self.root.children:
            members, stack = [], [c]
            while stack:
                v = stack.pop()
                if v.prompt_id is not None:
                    members.append(v.prompt_id)
                stack.extend(v.children)
            prefix = min(len(c.ids), min(lens[i] for i in members) - 1)
            if len(members) > 1 and prefix >= min_prefix:
                shared.add((prefix, frozenset(members)))
            else:
                alone.update(members)
        return shared, alone


# --- prefix tree -----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(prompt_lists)
def test_trie_matches_brute_force(prompts):
    t = PrefixTrie.build(prompts)
    assert t.unique_tokens() == distinct_prefixes(prompts)
    for v in range(t.num_nodes):
        path = t.path(v).tolist() if prompts else []
        assert t.leaves[v] == sum(p[: len(path)] == path for p in prompts)
        if v:
            assert t.parent[v] < v and t.depth[t.parent[v]] < t.depth[v]
    for i, p in enumerate(prompts):
        assert t.path(t.term_node[i]).tolist() == p
    # Compressed: every non-root node branches or ends a prompt.
    ptr, _ = t.children()
    nterm = np.bincount(t.term_node, minlength=t.num_nodes)
    assert np.all((np.diff(ptr)[1:] >= 2) | (nterm[1:] >= 1))


def test_trie_chunking_does_not_change_the_tree(monkeypatch):
    import batchllm.plan.trie as trie_mod

    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 3, rng.integers(1, 20)).astype(np.int32) for _ in range(200)]
    ref = PrefixTrie.build(prompts)
    monkeypatch.setattr(trie_mod, "_LCP_CHUNK", 5)
    monkeypatch.setattr(trie_mod, "_KEY_CHUNK", 7)
    small = PrefixTrie.build(prompts)
    for name in ("sorted_ids", "lcp", "depth", "parent", "lo", "hi", "term_node"):
        assert np.array_equal(getattr(ref, name), getattr(small, name)), name


def test_trie_sorts_by_signed_token_value():
    prompts = [np.array([5, -3], np.int32), np.array([-(2**31), 7]), [5], [2**31 - 1]]
    t = PrefixTrie.build(prompts)
    assert t.sorted_ids.tolist() == [1, 2, 0, 3]
    assert t.unique_tokens() == 5


# --- groups: invariants, brute-force counts, the authors' procedure ----------------------------------


@settings(max_examples=300, deadline=None)
@given(prompt_lists, st.integers(1, 3), st.randoms(use_true_random=False))
def test_plan_invariants_and_counts(prompts, min_prefix, rnd):
    out = [rnd.randint(0, 6) for _ in prompts]
    plan = build_plan(prompts, out, min_prefix=min_prefix)
    check_plan(plan, prompts)
    n = len(prompts)
    assert sorted(plan.order.tolist()) == list(range(n))
    assert np.concatenate([g.members for g in plan.groups] or [np.zeros(0, int)]).tolist() == plan.order.tolist()
    planned = 0
    for g in plan.groups:
        ps = [prompts[i] for i in g.members]
        assert all(p[: g.prefix_len] == ps[0][: g.prefix_len] for p in ps)
        assert all(g.prefix_len <= len(p) - 1 for p in ps)
        assert g.prefix_len == 0 or (len(ps) > 1 and g.prefix_len >= min_prefix)
        planned += g.prefix_len + sum(len(p) - g.prefix_len for p in ps)
    assert plan.planned_prompt_tokens == planned
    assert plan.logical_prompt_tokens == sum(map(len, prompts))
    assert plan.unique_prompt_tokens == distinct_prefixes(prompts)
    assert plan.unique_prompt_tokens <= plan.planned_prompt_tokens <= plan.logical_prompt_tokens
    assert 0.0 <= plan.saving() <= plan.max_saving() <= 1.0


@settings(max_examples=400, deadline=None)
@given(prompt_lists, st.integers(1, 3))
def test_groups_match_authors_procedure(prompts, min_prefix):
    plan = build_plan(prompts, [1] * len(prompts), min_prefix=min_prefix)
    ref = _RefCluster(prompts).groups([len(p) for p in prompts], min_prefix)
    assert groups_as_sets(plan) == ref


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 1), min_size=1, max_size=30), min_size=1, max_size=40))
def test_groups_match_authors_procedure_long_prompts(prompts):
    plan = build_plan(prompts, [1] * len(prompts))
    assert groups_as_sets(plan) == _RefCluster(prompts).groups([len(p) for p in prompts])


def _nested_case(sys_len, sub_len, k, others):
    """One system prompt S; k requests continue with a common sub-prefix F; ``others`` do not."""
    S = list(range(1000, 1000 + sys_len))
    F = list(range(2000, 2000 + sub_len))
    prompts = [S + F + [3000 + i, 7] for i in range(k)] + [S + [4000 + i, 7] for i in range(others)]
    return prompts


@pytest.mark.parametrize(
    "k,sub_len,sys_len", [(4, 4, 12), (4, 5, 12), (2, 12, 12), (2, 13, 12), (7, 2, 12), (7, 3, 12)]
)
def test_gain_rule_split_boundary(k, sub_len, sys_len):
    prompts = _nested_case(sys_len, sub_len, k, others=3)
    plan = build_plan(prompts, [1] * len(prompts))
    shared, alone = groups_as_sets(plan)
    if (k - 1) * sub_len - sys_len > 0:  # the rule: promote F's node to its own group
        assert shared == {(sys_len + sub_len, frozenset(range(k))), (sys_len, frozenset(range(k, k + 3)))}
    else:
        assert shared == {(sys_len, frozenset(range(k + 3)))}
    assert not alone


def test_gain_rule_absorbs_last_child():
    # Every request continues with one of two sub-prefixes, both worth promoting: the system prompt's
    # node is left with one child and absorbs it, so no group of S alone remains.
    S = list(range(100, 110))
    prompts = [S + [1] * 6 + [500 + i] for i in range(5)] + [S + [2] * 6 + [600 + i] for i in range(5)]
    shared, _ = groups_as_sets(build_plan(prompts, [1] * 10))
    assert shared == {(16, frozenset(range(5))), (16, frozenset(range(5, 10)))}


def test_gain_rule_bubbles_through_levels():
    # S -> A -> B: B reaches the top only if it beats A's edge, then S's length.
    S, A, B = list(range(100, 108)), list(range(200, 203)), list(range(300, 302))
    prompts = [S + A + B + [1000 + i] for i in range(6)]  # under B
    prompts += [S + A + [2000 + i] for i in range(2)]  # under A only
    prompts += [S + [3000 + i] for i in range(2)]  # under S only
    # At A: (6-1)*2 - 3 > 0, B lifted (edge 5). At S: A keeps 2 leaves: (2-1)*3 - 8 < 0; B: (6-1)*5 - 8 > 0.
    shared, alone = groups_as_sets(build_plan(prompts, [1] * len(prompts)))
    assert shared == {(13, frozenset(range(6))), (8, frozenset(range(6, 10)))}
    assert not alone


def test_identical_prompts_share_all_but_last_token():
    p = list(range(50))
    prompts = [p] * 4 + [p[:10] + [99]]
    plan = build_plan(prompts, [1] * 5)
    shared, alone = groups_as_sets(plan)
    # 4 copies: (4-1)*40 - 10 > 0, promoted; the copies keep one own token each.
    assert shared == {(49, frozenset(range(4)))} and alone == {4}
    assert plan.planned_prompt_tokens == 49 + 4 * 1 + 11


def test_min_prefix_dissolves_short_groups():
    prompts = [[1, 2, 3 + i] for i in range(4)] + [list(range(10, 30)) + [i] for i in range(3)]
    plan = build_plan(prompts, [1] * 7, min_prefix=5)
    shared, alone = groups_as_sets(plan)
    assert shared == {(20, frozenset({4, 5, 6}))} and alone == {0, 1, 2, 3}
    assert all(len(g.members) == 1 for g in plan.groups if g.prefix_len == 0)


def test_grouping_is_a_partition_with_anchor_prefix():
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 3, rng.integers(1, 12)) for _ in range(300)]
    t = PrefixTrie.build(prompts)
    g = batchllm_groups(t)
    assert len(g.req_group) == 300 and set(g.req_group.tolist()) == set(range(g.num_groups))
    for gid in range(g.num_groups):
        if g.prefix_len[gid]:
            assert t.depth[g.anchor[gid]] >= g.prefix_len[gid]


# --- order -----------------------------------------------------------------------------------------


def test_decode_ratio_order_between_and_within_groups():
    rng = np.random.default_rng(0)
    prompts, out = [], []
    group_out = [16, 1024, 256, 1024]  # group 3 ties with group 1 on ratio -> input order
    for g, o in enumerate(group_out):
        pre = (rng.integers(0, 10**6, 100) + g * 10**6).tolist()
        for j in range(4):
            prompts.append(pre + rng.integers(0, 10**6, 20).tolist())
            out.append(o * (j + 1) if g == 0 else o)
    plan = build_plan(prompts, out)
    assert [sorted(g.members.tolist()) for g in plan.groups] == [
        [4, 5, 6, 7],
        [12, 13, 14, 15],
        [8, 9, 10, 11],
        [0, 1, 2, 3],
    ]
    # Within group 0 (distinct outputs) the largest decode ratio first; elsewhere ties -> index order.
    assert plan.groups[-1].members.tolist() == [3, 2, 1, 0]
    assert plan.groups[0].members.tolist() == [4, 5, 6, 7]
    assert [g.group_id for g in plan.groups] == list(range(4))


def test_order_is_depth_first():
    # Two system prompts, each with two promoted sub-groups; the decode-heavy sub-group of the lighter
    # system prompt must not jump between the other's sub-groups.
    prompts, out = [], []
    for s, outs in ((0, (100, 1)), (1, (60, 50))):
        S = [10_000 * (s + 1) + i for i in range(30)]
        for f, o in enumerate(outs):
            F = [10_000 * (s + 1) + 1000 * (f + 1) + i for i in range(30)]
            for j in range(5):
                prompts.append(S + F + [5_000_000 + len(prompts)])
                out.append(o)
    plan = build_plan(prompts, out)
    firsts = [int(g.members.min()) for g in plan.groups]
    # System 1 in aggregate (110/...) outranks system 0 (101/...); within each, the heavier first.
    assert firsts == [10, 15, 0, 5]


def test_baseline_plan_is_input_order_without_sharing():
    prompts = [[1, 2, 3], [1, 2, 3], [1, 2, 4], [5]]
    plan = build_plan(prompts, [3, 2, 1, 0], samples=[1, 3, 1, 1], policy="fcfs-lru")
    check_plan(plan, prompts)
    assert plan.order.tolist() == [0, 1, 2, 3]
    # a request's 3 samples stay one group of prefix 0: the baseline shares only through its page cache
    assert [(g.group_id, g.prefix_len, g.members.tolist(), g.outer) for g in plan.groups] == [(i, 0, [i], -1) for i in range(4)]
    assert plan.planned_prompt_tokens == plan.logical_prompt_tokens == 3 + 3 * 3 + 3 + 1
    assert plan.unique_prompt_tokens is None and plan.max_saving() is None and plan.saving() == 0.0


def test_plan_requests_follows_the_policy_and_caps_expected_output_by_the_context():
    system = list(range(100, 120))
    rs = [_req(system + [200 + i, 300 + i], max_tokens=m) for i, m in enumerate([1, 50, 2])]
    plan = plan_requests(rs, "batchllm", max_model_len=None, page_size=16)
    check_plan(plan, [r.token_ids for r in rs])
    assert [(g.prefix_len, g.members.tolist()) for g in plan.groups] == [(20, [1, 2, 0])]  # decode-heavy first
    # a 23-token context leaves 1 output token after each 22-token prompt: input order among equals
    assert plan_requests(rs, "batchllm", max_model_len=23, page_size=16).order.tolist() == [0, 1, 2]
    base = plan_requests(rs, "fcfs-lru", max_model_len=None, page_size=16)
    assert base.order.tolist() == [0, 1, 2] and base.saving() == 0.0
    assert plan_requests([], "batchllm", None, 16).groups == []


def _req(ids, n=1, max_tokens=4):
    r = Request(custom_id="c", input_file="f", input_index=0, sampling=SamplingParams(n=n, max_tokens=max_tokens),
                prompt_token_ids=list(ids))
    r.token_ids = np.asarray(ids, dtype=np.int32)
    return r


# --- final execution groups: the n > 1 split ------------------------------------------------------------


def test_samples_share_their_whole_prompt_in_a_group_of_their_own():
    system = list(range(100, 110))  # 10 shared tokens: too short an outer prefix
    prompts = [system + [200 + 10 * i + k for k in range(5)] for i in range(3)] + [[7, 8, 9, 10]]
    # request 1: 4 samples x 4 own tokens beyond the system prompt save more than recomputing it costs;
    # request 3, alone, shares its prompt but the last token among its 2 samples
    plan = build_plan(prompts, [1, 1, 1, 1], samples=[1, 4, 1, 2], page_size=4)
    check_plan(plan, prompts)
    assert [(g.prefix_len, g.members.tolist()) for g in plan.groups] == [(3, [3]), (10, [0, 2]), (14, [1])]
    # request 1 computes the system prompt again: 10 tokens, less than an outer prefix's 16
    assert plan.nesting.num_outer == 0
    assert plan.logical_prompt_tokens == 15 * 6 + 4 * 2
    assert plan.planned_prompt_tokens == (3 + 2 * 1) + (10 + 5 + 5) + (14 + 4 * 1)


def test_a_long_group_prefix_becomes_the_outer_prefix_of_the_samples_that_leave():
    system = list(range(100, 140))  # 40 tokens: an outer prefix of 32
    prompts = [system + [200 + 10 * i + k for k in range(3)] for i in range(3)]
    plan = build_plan(prompts, [1, 1, 1], samples=[1, 2, 1], page_size=16)
    check_plan(plan, prompts)
    # leaving costs nothing but the 8 tokens past the outer prefix, so request 1's samples share all 42
    assert [(g.prefix_len, g.members.tolist(), g.outer) for g in plan.groups] == [(40, [0, 2], 0), (42, [1], 0)]
    assert plan.nesting.outer_len.tolist() == [32]
    assert plan.planned_prompt_tokens == 32 + (8 + 3 + 3) + (10 + 2 * 1)


def test_few_samples_with_short_own_prompts_stay_in_their_group():
    system = list(range(100, 110))
    prompts = [system + [200 + i, 300 + i] for i in range(3)]
    plan = build_plan(prompts, [1, 1, 1], samples=[2, 1, 1], page_size=4)
    # leaving would recompute 10 tokens to save (2 - 1) x 1: the 2 samples share the group prefix
    assert [(g.prefix_len, sorted(g.members.tolist())) for g in plan.groups] == [(10, [0, 1, 2])]
    assert plan.planned_prompt_tokens == 10 + 2 * 2 + 2 + 2


# --- subset and without ---------------------------------------------------------------------------------


def _nested_prompts():
    """Two systems; under system A two 32-token blocks of 3 requests each, under B one block of 2."""
    a, b = list(range(1000, 1032)), list(range(2000, 2032))
    blocks = [a + list(range(3000, 3032)), a + list(range(4000, 4032)), b + list(range(5000, 5032))]
    prompts = []
    for k, size in enumerate([3, 3, 2]):
        prompts += [blocks[k] + [9000 + len(prompts) + j, 9500 + j] for j in range(size)]
    return prompts


def structure(plan: Plan) -> tuple:
    """Everything a plan says runs, and its token counts (not ``unique_prompt_tokens``)."""
    return ([(g.group_id, g.prefix_len, g.members.tolist(), g.outer) for g in plan.groups], plan.order.tolist(),
            plan.prompt_lens.tolist(), plan.samples.tolist(), [a.tolist() for a in plan.nesting],
            plan.logical_prompt_tokens, plan.planned_prompt_tokens)


def test_subset_keeps_the_outer_prefixes_its_groups_use_and_drops_lone_levels():
    prompts = _nested_prompts()
    plan = build_plan(prompts, [1] * 8, page_size=16)
    check_plan(plan, prompts)
    assert [len(g.members) for g in plan.groups] == [3, 3, 2] and [g.outer for g in plan.groups] == [0, 0, -1]
    assert structure(plan.subset(range(3))) == structure(plan)
    both = plan.subset([1, 0])  # any order: the outer prefix is computed before its first group
    check_plan(both, {i: prompts[i] for i in both.order.tolist()})
    assert both.order.tolist() == plan.groups[1].members.tolist() + plan.groups[0].members.tolist()
    assert both.nesting.outer_len.tolist() == [32] and both.nesting.outer_first.tolist() == [0]
    # one group under system A: the outer level would have one dependent and computes nothing extra alone
    one = plan.subset([1, 2])
    check_plan(one, {i: prompts[i] for i in one.order.tolist()})
    assert one.nesting.num_outer == 0 and [g.outer for g in one.groups] == [-1, -1]
    assert one.planned_prompt_tokens == 64 + 3 * 2 + 64 + 2 * 2 and one.unique_prompt_tokens is None
    # the replicas' subsets compute what the whole plan computes, less each extra copy of a shared level
    parts = [plan.subset([0]), plan.subset([1, 2])]
    assert sum(p.planned_prompt_tokens for p in parts) == plan.planned_prompt_tokens + 32
    assert sum(p.logical_prompt_tokens for p in parts) == plan.logical_prompt_tokens
    with pytest.raises(ValueError):
        plan.subset([0, 0])
    with pytest.raises(ValueError):
        plan.subset([3])


def test_without_removes_requests_and_keeps_indices_and_order():
    prompts = _nested_prompts()
    plan = build_plan(prompts, [1] * 8, page_size=16)
    g1 = plan.groups[1].members.tolist()
    less = plan.without(g1[:1])
    check_plan(less, {i: prompts[i] for i in less.order.tolist()})
    assert [m.tolist() for m in (g.members for g in less.groups)] == [plan.groups[0].members.tolist(), g1[1:],
                                                                      plan.groups[2].members.tolist()]
    assert less.planned_prompt_tokens == plan.planned_prompt_tokens - 2
    gone = less.without(g1[1:])  # group 1 is emptied: system A's level is left with one dependent
    check_plan(gone, {i: prompts[i] for i in gone.order.tolist()})
    assert len(gone.groups) == 2 and gone.nesting.num_outer == 0
    assert gone.planned_prompt_tokens == 64 + 3 * 2 + 64 + 2 * 2
    assert structure(plan.without([])) == structure(plan)
    with pytest.raises(ValueError):
        gone.without(g1[:1])  # no longer a member


def test_check_plan_names_what_is_wrong():
    import dataclasses

    prompts = _nested_prompts()
    plan = build_plan(prompts, [1] * 8, page_size=16)
    bad = [
        (dataclasses.replace(plan, planned_prompt_tokens=plan.planned_prompt_tokens - 1), "token counts"),
        (dataclasses.replace(plan, samples=plan.samples * 0), "samples"),
        # group 2 (system B) under system A's outer prefix
        (dataclasses.replace(plan, groups=plan.groups[:2] + [dataclasses.replace(plan.groups[2], outer=0)],
                             nesting=plan.nesting._replace(group_parent=np.array([0, 0, 0]))), "does not extend"),
        # system A's level over group 0 alone: one dependent
        (dataclasses.replace(plan, groups=[plan.groups[0], dataclasses.replace(plan.groups[1], outer=-1), plan.groups[2]],
                             nesting=plan.nesting._replace(group_parent=np.array([0, -1, -1]))), "two dependents"),
    ]
    for p, what in bad:
        with pytest.raises(ValueError, match=what):
            check_plan(p, prompts)
    with pytest.raises(ValueError, match="exactly once"):
        check_plan(plan, prompts + [[1, 2]])


@settings(max_examples=100, deadline=None)
@given(prompt_lists, st.randoms(use_true_random=False))
def test_subsets_and_removals_are_valid_plans(prompts, rnd):
    prompts = [[7] * 20 + p for p in prompts] + [[8] * 20 + p for p in prompts]  # outer prefixes at page 4
    n = len(prompts)
    samples = [rnd.randint(1, 3) for _ in prompts]
    plan = build_plan(prompts, [rnd.randint(0, 6) for _ in prompts], samples=samples, page_size=4)
    check_plan(plan, prompts)
    ids = [g for g in range(len(plan.groups)) if rnd.random() < 0.5]
    rnd.shuffle(ids)
    sub = plan.subset(ids)
    check_plan(sub, {i: prompts[i] for i in sub.order.tolist()})
    drop = [i for i in range(n) if rnd.random() < 0.3]
    less = plan.without(drop)
    check_plan(less, {i: prompts[i] for i in range(n) if i not in set(drop)})
    assert less.logical_prompt_tokens == plan.logical_prompt_tokens - sum(samples[i] * len(prompts[i]) for i in drop)


# --- benchmark workload shapes -----------------------------------------------------------------------


def test_shared_prefix_workload_saving():
    rng = np.random.default_rng(0)
    prompts = []
    for _ in range(8):
        pre = rng.integers(0, 128256, 1024, dtype=np.int32)
        prompts += [np.concatenate([pre, rng.integers(0, 128256, 64, dtype=np.int32)]) for _ in range(64)]
    plan = build_plan(prompts, np.full(512, 128))
    # Random ids: distinct parts could share a first token by chance; the seed has none.
    assert plan.planned_prompt_tokens == 8 * 1024 + 512 * 64 == plan.unique_prompt_tokens
    assert [len(g.members) for g in plan.groups] == [64] * 8 and {g.prefix_len for g in plan.groups} == {1024}
    assert plan.saving() == pytest.approx(1 - 40960 / (512 * 1088))


def test_nested_workload_splits_per_sub_prefix_under_one_outer_prefix():
    rng = np.random.default_rng(1)
    sys_p = rng.integers(0, 128256, 2048, dtype=np.int32)
    prompts = []
    for _ in range(16):
        sub = rng.integers(0, 128256, 512, dtype=np.int32)
        prompts += [np.concatenate([sys_p, sub, rng.integers(0, 128256, 64, dtype=np.int32)]) for _ in range(32)]
    plan = build_plan(prompts, np.full(512, 128))
    assert len(plan.groups) == 16 and {g.prefix_len for g in plan.groups} == {2560}
    # the system prompt is an outer prefix of all 16 groups: computed once, as a cache would
    assert plan.nesting.outer_len.tolist() == [2048] and {g.outer for g in plan.groups} == {0}
    assert plan.planned_prompt_tokens == 2048 + 16 * 512 + 512 * 64 == plan.unique_prompt_tokens
    check_plan(plan, prompts)


# --- input validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompts,out,kw",
    [
        ([[]], [1], {}),
        ([[[1, 2]]], [1], {}),
        ([[1.5, 2.0]], [1], {}),
        ([np.array([2**40])], [1], {}),
        ([[1, 2]], [1, 2], {}),
        ([[1, 2]], [-1], {}),
        ([[1, 2]], [float("nan")], {}),
        ([[1, 2]], [1], {"policy": "lru"}),
        ([[1, 2]], [1], {"min_prefix": 0}),
    ],
)
def test_bad_input_raises_value_error(prompts, out, kw):
    with pytest.raises(ValueError):
        build_plan(prompts, out, **kw)


def test_empty_job():
    plan = build_plan([], [])
    assert plan.groups == [] and len(plan.order) == 0 and plan.saving() == 0.0
    assert plan_stats(plan, [])["requests"] == 0
    assert estimate_peak_kv_tokens(plan, [], [], 10).peak_kv_tokens == 0


# --- KV estimate and stats ------------------------------------------------------------------------------


def test_kv_estimate_hand_computed():
    # One group: prefix 8 of two members with 2 own tokens each; outputs 3 and 5; plus a singleton.
    prompts = [list(range(8)) + [100, 101], list(range(8)) + [200, 201], [900, 901, 902, 903]]
    plan = build_plan(prompts, [3, 5, 2])
    lens = [10, 10, 4]
    assert [len(g.members) for g in plan.groups] == [2, 1] and plan.groups[0].prefix_len == 8
    # Unbounded: all start at t=0. At t=2 the singleton ends: 8 + 2*(2+2) + (4+2) = 22;
    # at t=3: 8 + (2+3) + (2+3) = 18; at t=5: 8 + 2 + 5 = 15.
    est = estimate_peak_kv_tokens(plan, lens, [3, 5, 2])
    assert est == (22, 3, 5, 15)  # min_budget: 10 prompt + 5 output tokens
    # Budget 20: the group's members (heavier first) reserve 8 + (2+5) + (2+3) = 20; the singleton
    # (4+2) waits until the group is gone at t=5 and ends at t=7. Peak just before t=3: 8 + 5 + 5.
    est = estimate_peak_kv_tokens(plan, lens, [3, 5, 2], kv_budget=20)
    assert est == (18, 2, 7, 15)
    assert plan.order.tolist() == [1, 0, 2]
    # Too small for even one request: it runs alone.
    assert estimate_peak_kv_tokens(plan, lens, [3, 5, 2], kv_budget=5).peak_running == 1


def test_kv_estimate_counts_an_outer_prefix_once():
    # Two groups of 4 whose 64-token prefixes share a 32-token head: an outer prefix of 32 tokens.
    head = list(range(32))
    prompts = [head + [1000 + j for j in range(32)] + [5000 + i] for i in range(4)]
    prompts += [head + [2000 + j for j in range(32)] + [6000 + i] for i in range(4)]
    plan = build_plan(prompts, [3] * 8, page_size=16)
    assert [(g.prefix_len, g.outer) for g in plan.groups] == [(64, 0), (64, 0)]
    assert plan.nesting.outer_len.tolist() == [32]
    lens = [65] * 8
    # Unbounded, all at t=0, peak just before t=3: outer 32 + 2 x 32 beyond it + 8 x (1 own + 3 out).
    assert estimate_peak_kv_tokens(plan, lens, [3] * 8) == (128, 8, 3, 68)
    # Budget 100: the first group reserves 32 + 32 + 4 x 4 = 80; the second's first member needs 32 + 4
    # more (the outer prefix is resident) and waits for the first group to finish.
    assert estimate_peak_kv_tokens(plan, lens, [3] * 8, kv_budget=100) == (80, 4, 6, 68)


def test_kv_estimate_counts_every_sample_s_own_prompt_tokens():
    # one request, 5 prompt tokens, n = 3, 6 expected output tokens in all: its samples share 4 tokens
    plan = build_plan([[1, 2, 3, 4, 5]], [6], samples=[3])
    assert [(g.prefix_len, g.members.tolist()) for g in plan.groups] == [(4, [0])]
    assert estimate_peak_kv_tokens(plan, [5], [6]) == (4 + 3 * 1 + 6, 1, 6, 13)
    # the baseline computes the prompt once per sample
    base = build_plan([[1, 2, 3, 4, 5]], [6], samples=[3], policy="fcfs-lru")
    assert estimate_peak_kv_tokens(base, [5], [6]) == (3 * 5 + 6, 1, 6, 21)
    with pytest.raises(ValueError):
        estimate_peak_kv_tokens(plan, [4], [6])  # not the plan's prompt


@settings(max_examples=100, deadline=None)
@given(prompt_lists.filter(len), st.integers(1, 60), st.randoms(use_true_random=False))
def test_kv_estimate_respects_budget(prompts, budget, rnd):
    out = [rnd.randint(0, 6) for _ in prompts]
    lens = [len(p) for p in prompts]
    for policy in ("batchllm", "fcfs-lru"):
        est = estimate_peak_kv_tokens(build_plan(prompts, out, policy=policy), lens, out, budget)
        if budget >= est.min_budget:
            assert est.peak_kv_tokens <= budget
        assert est.decode_steps >= max(out)


def test_plan_stats_numbers():
    prompts = [list(range(10)) + [100 + i] for i in range(6)] + [[7, 7], [8]]
    plan = build_plan(prompts, [1] * 8)
    s = plan_stats(plan, [len(p) for p in prompts])
    assert s["requests"] == 8 and s["num_groups"] == 3 and s["shared_groups"] == 1
    assert s["requests_in_shared_groups"] == 6 and s["avg_sharing_degree"] == 6.0
    assert s["logical_prompt_tokens"] == 69 and s["planned_prompt_tokens"] == 10 + 6 + 3
    assert s["unique_prompt_tokens"] == 19 and s["saving"] == pytest.approx(50 / 69)
    assert s["group_size"] == {"min": 1, "p50": 1.0, "p90": 5.0, "max": 6, "mean": 8 / 3}
    assert s["prefix_len"]["max"] == 10 and sum(s["group_size_hist"]["counts"]) == 3
    assert s["group_size_hist"]["edges"][:4] == [1, 2, 4, 8] and s["group_size_hist"]["counts"] == [2, 0, 1]
    assert s["distinct_len"]["max"] == 2
