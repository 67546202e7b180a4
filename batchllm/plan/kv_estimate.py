"""A coarse model of the KV memory a plan needs when it runs in order under a KV budget.

``estimate_peak_kv_tokens`` walks a ``Plan`` admitting requests in plan order (worst-case
reservations, one decode token per step) and reports the peak; ``batchllm stats``
(``pipeline.job_stats``) reports it as the job's peak KV memory. The engine's scheduler is the real thing.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from batchllm.plan.plan import Plan


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
    - requests are admitted strictly in ``plan.order``; a request reserves its samples' own prompt
      tokens (``n * (len - prefix_len)``) plus all its expected output tokens, and its group's prefix is
      reserved once while any member runs; the next request is admitted as soon as the reservation fits
      ``kv_budget`` (``None``: unbounded; a request that does not fit even alone runs alone);
    - prefill takes no time; each decode step every running request emits one token and then holds
      ``own prompt + tokens emitted`` KV tokens; it finishes after ``round(expected_output)`` steps.
    Since reservations are worst case, ``peak_kv_tokens <= kv_budget`` whenever
    ``kv_budget >= min_budget``. The baseline plan (prefix 0) counts every prompt in full. An outer
    prefix (``plan.nesting``) is held, and reserved, once while any group below it is resident; a group
    then adds only its tokens beyond its outer prefix.
    ``prompt_lens`` and ``expected_output`` are indexed by request index (the job's list; only the
    plan's members are read), and ``prompt_lens`` must agree with the plan.
    """
    lens_all = np.asarray(prompt_lens, dtype=np.int64)
    outs_all = np.rint(np.asarray(expected_output, dtype=np.float64)).astype(np.int64)
    n = plan.num_requests
    top = int(plan.order.max()) + 1 if n else 0
    if lens_all.ndim != 1 or outs_all.shape != lens_all.shape or len(lens_all) < top:
        raise ValueError("prompt_lens and expected_output need one value per request index of the plan")
    lens, outs = lens_all[plan.order], outs_all[plan.order]
    if not np.array_equal(lens, plan.prompt_lens):
        raise ValueError("prompt_lens disagree with the plan's")
    if np.any(outs < 0):
        raise ValueError("expected_output must be >= 0")
    if kv_budget is not None and kv_budget < 1:
        raise ValueError(f"kv_budget must be positive, got {kv_budget}")
    if n == 0:
        return KVEstimate(0, 0, 0, 0)
    # per position in plan.order: its group, its samples' own prompt tokens
    grp_a = np.repeat(np.arange(len(plan.groups)), [len(g.members) for g in plan.groups])
    plen_a = np.array([g.prefix_len for g in plan.groups], dtype=np.int64)[grp_a]
    own_a = plan.samples * (lens - plen_a)
    min_budget = int((plen_a + own_a + outs).max())  # prefix + own + output of the largest request
    own, out_l, grp = own_a.tolist(), outs.tolist(), grp_a.tolist()
    budget = float("inf") if kv_budget is None else kv_budget
    prefixes = _Prefixes(plan)
    reserved = 0  # prefixes of resident groups + (own + output) of running requests
    held_fixed = 0  # prefixes of resident groups + own prompt tokens of running requests
    running = 0
    sum_start = 0  # sum of admission times of running requests
    peak = peak_running = 0
    heap: list[tuple[int, int]] = []
    nxt, t = 0, 0
    while nxt < n or heap:
        # Admit in plan order (i: position in plan.order) while the reservation fits.
        while nxt < n:
            i = nxt
            need = own[i] + out_l[i] + prefixes.to_add(grp[i])
            if running and reserved + need > budget:
                break
            held_fixed += prefixes.acquire(grp[i]) + own[i]
            reserved += need
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
            gone = prefixes.release(grp[i])
            reserved -= own[i] + out_l[i] + gone
            held_fixed -= own[i] + gone
            running -= 1
            sum_start -= t - out_l[i]
    return KVEstimate(int(peak), peak_running, int(t), min_budget)


class _Prefixes:
    """Residency of a plan's group and outer prefixes in ``estimate_peak_kv_tokens``: a group's prefix
    (its tokens beyond its outer prefix) is resident while any member runs, an outer prefix level (its
    tokens beyond its parent) while any group below it is resident."""

    def __init__(self, plan: Plan):
        nst = plan.nesting
        self.o_parent = nst.outer_parent.tolist()
        o_len = nst.outer_len.tolist()
        self.o_own = [o_len[o] - (o_len[p] if p >= 0 else 0) for o, p in enumerate(self.o_parent)]
        self.g_outer = [g.outer for g in plan.groups]
        self.g_own = [g.prefix_len - (o_len[g.outer] if g.outer >= 0 else 0) for g in plan.groups]
        self.g_refs = [0] * len(plan.groups)
        self.o_refs = [0] * nst.num_outer

    def to_add(self, g: int) -> int:
        """Tokens that admitting a member of group ``g`` would make resident."""
        if self.g_refs[g]:
            return 0
        add, o = self.g_own[g], self.g_outer[g]
        while o >= 0 and self.o_refs[o] == 0:
            add += self.o_own[o]
            o = self.o_parent[o]
        return add

    def acquire(self, g: int) -> int:
        """A member of ``g`` starts; returns the tokens that became resident."""
        self.g_refs[g] += 1
        return self.g_own[g] + self._outer_refs(self.g_outer[g], +1) if self.g_refs[g] == 1 else 0

    def release(self, g: int) -> int:
        """A member of ``g`` finishes; returns the tokens that stopped being resident."""
        self.g_refs[g] -= 1
        return self.g_own[g] + self._outer_refs(self.g_outer[g], -1) if self.g_refs[g] == 0 else 0

    def _outer_refs(self, o: int, delta: int) -> int:
        """Add ``delta`` (+1 / -1) to the chain from ``o`` up; returns the tokens that became (non-)resident."""
        changed = 0
        while o >= 0:
            self.o_refs[o] += delta
            if self.o_refs[o] != (1 if delta > 0 else 0):
                break
            changed += self.o_own[o]
            o = self.o_parent[o]
        return changed
