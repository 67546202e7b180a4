"""The execution plan of a job: prefix groups, their order, and what they save.

This is the PLAN stage of the pipeline (BatchLLM, arXiv 2412.03594, Sec. 4.1-4.2): one global prefix
tree over every prompt (``trie.py``), split into single-level prefix groups by the authors' gain rule
and ordered decode-heavy first within a depth-first walk (``groups.py``); then neighbouring groups whose
prefixes share a head get an outer prefix computed once for all of them (``nesting.py``: multi-level
sharing). The engine consumes the result as plain data: groups in execution order, each a shared
prefix length, its members and the outer prefix its prefix extends.

``policy="none"`` gives the baseline: input order, every request its own group with prefix 0.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from batchllm.plan.groups import Grouping, batchllm_groups, order_groups, singleton_groups
from batchllm.plan.nesting import Nesting, nest
from batchllm.plan.trie import PrefixTrie

POLICIES = ("batchllm", "none")


@dataclass
class PrefixGroup:
    """Requests that run together around one shared prefix.

    The first ``prefix_len`` prompt tokens of every member are identical and computed once;
    ``prefix_len <= len(prompt) - 1`` for every member, so each member computes at least its last token.
    ``prefix_len == 0`` means no sharing (a singleton, or the baseline plan).
    """

    group_id: int
    prefix_len: int
    members: np.ndarray  # request indices (into the input list), in execution order
    outer: int = -1  # the outer prefix (``Plan.nesting``) this group's prefix extends, or -1


@dataclass
class Plan:
    """Groups in execution order plus per-request lookups and the prefill token accounting.

    ``order`` is the concatenation of the groups' members; ``prefix_len`` and ``group_of`` are indexed
    by request index. ``group_id`` equals the group's position in ``groups``. ``nesting`` holds the
    outer prefixes over the groups (its units are the groups, in order).
    """

    groups: list[PrefixGroup]
    order: np.ndarray
    prefix_len: np.ndarray
    group_of: np.ndarray
    logical_prompt_tokens: int  # sum of prompt lengths
    unique_prompt_tokens: int  # distinct non-empty prefixes = trie edge length: the best any cache can do
    planned_prompt_tokens: int  # outer prefixes once + group prefixes beyond their outer + requests beyond their group's
    nesting: Nesting | None = None

    def saving(self) -> float:
        """Prefill saving of this plan: ``1 - planned / logical``."""
        return 1.0 - self.planned_prompt_tokens / self.logical_prompt_tokens if self.logical_prompt_tokens else 0.0

    def max_saving(self) -> float:
        """The most any prefix cache could save: ``1 - unique / logical``."""
        return 1.0 - self.unique_prompt_tokens / self.logical_prompt_tokens if self.logical_prompt_tokens else 0.0

    @property
    def num_requests(self) -> int:
        return len(self.order)


def build_plan(
    prompts: Sequence,
    expected_output: np.ndarray | Sequence[float],
    *,
    policy: str = "batchllm",
    min_prefix: int = 1,
    trie: PrefixTrie | None = None,
    page_size: int = 16,
) -> Plan:
    """Plan a job.

    ``prompts``: one non-empty 1-D integer array (or list) of token ids per request.
    ``expected_output``: per request, the output tokens to expect (``max_tokens`` or an estimate), >= 0.
    ``policy``: ``"batchllm"`` (global prefix groups, decode-ratio DFS order) or ``"none"`` (identity).
    ``min_prefix``: a group sharing fewer tokens than this is split into singletons (prefix 0).
    ``trie``: the prompts' tree if already built (e.g. to plan both policies from one build).
    ``page_size``: the engine's KV page size; outer prefixes end on a page boundary.
    Raises ``ValueError`` for bad input.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown plan policy {policy!r}; expected one of {POLICIES}")
    if isinstance(min_prefix, bool) or not isinstance(min_prefix, (int, np.integer)) or min_prefix < 1:
        raise ValueError(f"min_prefix must be an integer >= 1, got {min_prefix!r}")
    out = np.asarray(expected_output, dtype=np.float64)
    if out.shape != (len(prompts),):
        raise ValueError(f"expected_output must have one value per prompt ({len(prompts)}), got shape {out.shape}")
    if not np.all(np.isfinite(out)) or np.any(out < 0):
        raise ValueError("expected_output must be finite and >= 0")
    if trie is None:
        trie = PrefixTrie.build(prompts)
    elif trie.num_requests != len(prompts):
        raise ValueError("trie was built over a different number of prompts")

    n = trie.num_requests
    if policy == "none":
        grouping = singleton_groups(trie)
        group_order, order = np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64)
    else:
        grouping = batchllm_groups(trie, min_prefix)
        group_order, order = order_groups(trie, grouping, out)
    return _assemble(trie, grouping, group_order, order, page_size)


def _assemble(trie: PrefixTrie, grouping: Grouping, group_order: np.ndarray, order: np.ndarray, page_size: int) -> Plan:
    G, n = grouping.num_groups, trie.num_requests
    rank = np.empty(G, dtype=np.int64)
    rank[group_order] = np.arange(G)
    group_of = rank[grouping.req_group]
    g_prefix = grouping.prefix_len[group_order]
    size = np.bincount(group_of, minlength=G)
    bounds = np.concatenate([[0], np.cumsum(size)]).tolist()
    groups = [PrefixGroup(g, p, order[bounds[g] : bounds[g + 1]]) for g, p in enumerate(g_prefix.tolist())]
    heads = [trie.tokens[trie.offsets[g.members[0]] : trie.offsets[g.members[0]] + g.prefix_len] for g in groups]
    nesting = nest(heads, align=page_size)
    for g in groups:
        g.outer = int(nesting.unit_parent[g.group_id])
    logical = int(trie.lengths.sum())
    # each group computes its prefix beyond its outer prefix, once; each member its tokens beyond the group prefix
    outer_saved = sum(nesting.parent_len(g.group_id) for g in groups) - nesting.outer_tokens()
    return Plan(
        groups=groups,
        order=order,
        prefix_len=g_prefix[group_of] if n else np.zeros(0, dtype=np.int64),
        group_of=group_of,
        logical_prompt_tokens=logical,
        unique_prompt_tokens=trie.unique_tokens(),
        planned_prompt_tokens=logical - int(((size - 1) * g_prefix).sum()) - outer_saved,
        nesting=nesting,
    )


def check_plan(plan: Plan, prompts: Sequence) -> None:
    """Verify a plan against its prompts; raises ``ValueError`` naming the first violation.

    Every request appears exactly once in ``order``; groups are contiguous runs of ``order``; every
    member starts with its group's prefix (the first member's first ``prefix_len`` tokens) and keeps at
    least one own token; every group's prefix is longer than its outer prefix and starts with it (the
    outer prefix's tokens: those of its first group); the token counts match their definitions (except
    ``unique_prompt_tokens``).
    """
    n = len(prompts)
    if len(plan.order) != n or not np.array_equal(np.sort(plan.order), np.arange(n)):
        raise ValueError("order is not a permutation of the requests")
    if not np.array_equal(np.concatenate([g.members for g in plan.groups] or [np.zeros(0, np.int64)]), plan.order):
        raise ValueError("order is not the concatenation of the groups' members")
    planned = 0
    lens = np.array([len(p) for p in prompts], dtype=np.int64)
    for gid, g in enumerate(plan.groups):
        if g.group_id != gid or len(g.members) == 0:
            raise ValueError(f"group {gid}: wrong id or no members")
        if np.any(plan.group_of[g.members] != gid) or np.any(plan.prefix_len[g.members] != g.prefix_len):
            raise ValueError(f"group {gid}: group_of / prefix_len disagree with the group")
        if g.prefix_len > lens[g.members].min() - 1:
            raise ValueError(f"group {gid}: prefix_len {g.prefix_len} leaves a member without an own token")
        head = np.asarray(prompts[g.members[0]])[: g.prefix_len]
        for i in g.members[1:].tolist():
            if not np.array_equal(np.asarray(prompts[i])[: g.prefix_len], head):
                raise ValueError(f"group {gid}: request {i} does not start with the group's prefix")
        planned += g.prefix_len + int((lens[g.members] - g.prefix_len).sum())
        if g.outer >= 0:
            nst = plan.nesting
            olen = int(nst.outer_len[g.outer])
            first = plan.groups[int(nst.outer_first[g.outer])]
            if olen >= g.prefix_len or not np.array_equal(head[:olen], np.asarray(prompts[first.members[0]])[:olen]):
                raise ValueError(f"group {gid}: its prefix does not extend its outer prefix {g.outer}")
            planned -= olen
    if plan.nesting is not None:
        planned += plan.nesting.outer_tokens()
    if planned != plan.planned_prompt_tokens or int(lens.sum()) != plan.logical_prompt_tokens:
        raise ValueError("planned / logical prompt token counts are wrong")


class KVEstimate(NamedTuple):
    """Result of ``estimate_peak_kv_tokens`` (all in tokens of KV cache, or decode steps)."""

    peak_kv_tokens: int  # most KV tokens held at any time
    peak_running: int  # most requests running at once
    decode_steps: int  # steps until the last request finishes
    min_budget: int  # smallest budget under which every request can run (alone, with its prefix)


def estimate_peak_kv_tokens(
    plan: Plan,
    prompt_lens: np.ndarray | Sequence[int],
    expected_output: np.ndarray | Sequence[float],
    kv_budget: int | None = None,
) -> KVEstimate:
    """A simple model of the KV memory a plan needs when it runs in order under a KV budget.

    Model (deliberately coarse; the engine's scheduler is the real thing):
    - requests are admitted strictly in ``plan.order``; a request reserves its own prompt tokens
      (``len - prefix_len``) plus all its expected output tokens, and its group's prefix is reserved
      once while any member runs; the next request is admitted as soon as the reservation fits
      ``kv_budget`` (``None``: unbounded; a request that does not fit even alone runs alone);
    - prefill takes no time; each decode step every running request emits one token and then holds
      ``own prompt + tokens emitted`` KV tokens; it finishes after ``round(expected_output)`` steps.
    Since reservations are worst case, ``peak_kv_tokens <= kv_budget`` whenever
    ``kv_budget >= min_budget``. The baseline plan (prefix 0) counts every prompt in full. An outer
    prefix (``plan.nesting``) is held, and reserved, once while any group below it is resident; a group
    then adds only its tokens beyond its outer prefix.
    """
    lens = np.asarray(prompt_lens, dtype=np.int64)
    outs = np.rint(np.asarray(expected_output, dtype=np.float64)).astype(np.int64)
    n = plan.num_requests
    if lens.shape != (n,) or outs.shape != (n,):
        raise ValueError("prompt_lens and expected_output need one value per request of the plan")
    if np.any(outs < 0):
        raise ValueError("expected_output must be >= 0")
    if kv_budget is not None and kv_budget < 1:
        raise ValueError(f"kv_budget must be positive, got {kv_budget}")
    if n == 0:
        return KVEstimate(0, 0, 0, 0)
    own = (lens - plan.prefix_len).tolist()
    out_l = outs.tolist()
    grp = plan.group_of.tolist()
    gpre = [g.prefix_len for g in plan.groups]
    nst = plan.nesting
    o_parent = nst.outer_parent.tolist() if nst is not None else []
    o_len = nst.outer_len.tolist() if nst is not None else []
    o_own = [o_len[o] - (o_len[p] if p >= 0 else 0) for o, p in enumerate(o_parent)]  # tokens each level adds
    g_outer = [g.outer for g in plan.groups]  # -1 without nesting
    gpre = [p - (o_len[o] if o >= 0 else 0) for p, o in zip(gpre, g_outer)]  # beyond the outer prefix
    o_refs = [0] * len(o_len)
    min_budget = int((lens + outs).max())  # = prefix + own + output of the largest request
    budget = float("inf") if kv_budget is None else kv_budget

    def outers_to_add(o: int) -> int:
        """Tokens of the not-yet-resident outer prefixes on the chain from ``o`` up."""
        add = 0
        while o >= 0 and o_refs[o] == 0:
            add += o_own[o]
            o = o_parent[o]
        return add

    def outer_refs(o: int, delta: int) -> int:
        """Add ``delta`` (+1 / -1) to the chain from ``o`` up; returns the tokens that became (non-)resident."""
        changed = 0
        while o >= 0:
            o_refs[o] += delta
            if o_refs[o] != (1 if delta > 0 else 0):
                break
            changed += o_own[o]
            o = o_parent[o]
        return changed

    refs = [0] * len(gpre)
    reserved = 0  # prefixes of resident groups + (own + output) of running requests
    held_fixed = 0  # prefixes of resident groups + own prompt tokens of running requests
    running = 0
    sum_start = 0  # sum of admission times of running requests
    peak = peak_running = 0
    heap: list[tuple[int, int]] = []
    order = plan.order.tolist()
    nxt, t = 0, 0
    while nxt < n or heap:
        # Admit in plan order while the reservation fits.
        while nxt < n:
            i = order[nxt]
            g = grp[i]
            need = own[i] + out_l[i] + (gpre[g] + outers_to_add(g_outer[g]) if refs[g] == 0 else 0)
            if running and reserved + need > budget:
                break
            if refs[g] == 0:
                held_fixed += gpre[g] + outer_refs(g_outer[g], +1)
            refs[g] += 1
            reserved += need
            held_fixed += own[i]
            running += 1
            sum_start += t
            heapq.heappush(heap, (t + out_l[i], i))
            nxt += 1
        peak_running = max(peak_running, running)
        # KV only grows until the next finish; measure just before it.
        t = heap[0][0]
        peak = max(peak, held_fixed + running * t - sum_start)
        while heap and heap[0][0] == t:
            _, i = heapq.heappop(heap)
            g = grp[i]
            refs[g] -= 1
            reserved -= own[i] + out_l[i]
            held_fixed -= own[i]
            if refs[g] == 0:
                gone = gpre[g] + outer_refs(g_outer[g], -1)
                reserved -= gone
                held_fixed -= gone
            running -= 1
            sum_start -= t - out_l[i]
    return KVEstimate(int(peak), peak_running, int(t), min_budget)
