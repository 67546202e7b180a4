"""Outer prefixes: multi-level sharing between neighbouring prefix groups.

BatchLLM's gain rule (``groups.py``) gives every request one group and every group one shared prefix,
computed once. Group prefixes often share a head of their own: one system prompt followed by different
few-shot blocks, each block a group. Single-level sharing computes that head once per group; an *outer
prefix* computes it once for all of them, and each group's prefix is then computed as its continuation
(the group prefix's pages start with the outer prefix's pages, shared). Outer prefixes nest: a system
prompt, a tool list under it, the groups under that.

``nest`` finds them from the plan's final execution groups in execution order (a group's prefix and
its members): groups that share a head are adjacent in the plan's depth-first order, so the shared heads
are the intervals of the longest-common-prefix array of neighbouring groups (the LCP-interval tree of
``trie.py``, built here over groups instead of prompts). Groups that are not adjacent simply do not share
an outer prefix: less saving, never a wrong result.

An outer prefix ends on a page boundary (``align``): the prefixes extending it then share all its
pages and copy none, so a sequence needs at most one page more than its own tokens whatever the depth
of nesting (the last, partial page of its group prefix, copied). It is kept when it adds at least
``min_tokens`` tokens to its own parent: shorter levels save little and add a dependency to wait for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

# An outer level must add at least this many tokens to its parent (one KV page at the default size).
MIN_OUTER_TOKENS = 16


class Nesting(NamedTuple):
    """Outer prefixes over a list of groups (in execution order).

    ``outer_len[o]``: tokens of outer prefix ``o`` (from position 0); ``outer_parent[o]``: the outer
    prefix it extends, or -1; ``outer_first[o]``: the first group below it (outer prefixes are listed in
    the order they must be computed: by first group, enclosing ones first).
    ``group_parent[g]``: the innermost outer prefix group ``g``'s prefix extends, or -1.
    Invariants: every group below ``o`` has a prefix longer than ``outer_len[o]`` that starts with it;
    a child's length exceeds its parent's by at least the ``min_tokens`` of ``nest``.
    """

    outer_len: np.ndarray
    outer_parent: np.ndarray
    outer_first: np.ndarray
    group_parent: np.ndarray

    @property
    def num_outer(self) -> int:
        return len(self.outer_len)

    def parent_len(self, group: int) -> int:
        """Tokens of group's prefix that its outer prefix already computes (0 without one)."""
        o = int(self.group_parent[group])
        return int(self.outer_len[o]) if o >= 0 else 0

    def outer_tokens(self) -> int:
        """Tokens the outer prefixes compute, each level counted once."""
        if not self.num_outer:
            return 0
        par = np.where(self.outer_parent >= 0, self.outer_len[np.maximum(self.outer_parent, 0)], 0)
        return int((self.outer_len - par).sum())

    def restrict(self, groups: Sequence[int]) -> Nesting:
        """The outer prefixes over ``groups`` (indices of this nesting's groups, in their new execution
        order), numbered as in ``nest``: listed by first group, enclosing ones first.

        Only the outer prefixes some of these groups extend remain, and of those only the ones with at
        least two dependents (groups or outer prefixes directly below): a level with one dependent
        computes exactly the tokens that dependent would compute itself and only adds a prefix to wait
        for, so its dependent takes its place under the next level up. ``nest`` never makes such a level
        (an outer prefix covers a run of at least two groups), so restricting to all groups in their order
        gives this nesting back.
        """
        groups_l = [int(g) for g in groups]
        parent = self.outer_parent.tolist()
        used = [False] * self.num_outer
        for u in groups_l:
            o = int(self.group_parent[u])
            while o >= 0 and not used[o]:
                used[o] = True
                o = parent[o]
        deps = [0] * self.num_outer
        for o in range(self.num_outer):
            if used[o] and parent[o] >= 0:
                deps[parent[o]] += 1
        for u in groups_l:
            if self.group_parent[u] >= 0:
                deps[int(self.group_parent[u])] += 1
        keep = [d >= 2 for d in deps]

        def up(o: int) -> int:
            """The nearest kept outer prefix from ``o`` up (``o`` itself when kept), or -1."""
            while o >= 0 and not keep[o]:
                o = parent[o]
            return o

        group_parent = [up(int(self.group_parent[u])) for u in groups_l]
        first = {}  # kept outer prefix -> first new group below it
        for k, o in enumerate(group_parent):
            while o >= 0 and o not in first:
                first[o] = k
                o = up(parent[o])
        depth = {}
        for o in sorted(first):  # a parent precedes its children in nest's numbering
            p = up(parent[o])
            depth[o] = depth[p] + 1 if p >= 0 else 0
        kept = sorted(first, key=lambda o: (first[o], depth[o]))
        new_id = {o: i for i, o in enumerate(kept)}
        return Nesting(
            np.array([self.outer_len[o] for o in kept], dtype=np.int64),
            np.array([new_id[up(parent[o])] if up(parent[o]) >= 0 else -1 for o in kept], dtype=np.int64),
            np.array([first[o] for o in kept], dtype=np.int64),
            np.array([new_id[o] if o >= 0 else -1 for o in group_parent], dtype=np.int64),
        )


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def nest(prefixes: Sequence[np.ndarray], min_tokens: int = MIN_OUTER_TOKENS, align: int = 1) -> Nesting:
    """Outer prefixes for groups whose shared prefixes (token arrays, execution order) are ``prefixes``.

    A group with an empty prefix never nests. The outer prefix of a run of groups is shorter than the
    shortest prefix in the run, so every group's own prefix still adds a token, and its length is a
    multiple of ``align`` (the KV page size).
    """
    plen = [len(p) for p in prefixes]
    lcp = [_lcp(prefixes[i - 1], prefixes[i]) if plen[i - 1] and plen[i] else 0 for i in range(1, len(prefixes))]
    return nest_by_lcp(plen, lcp, min_tokens, align)


def nest_by_lcp(prefix_lens: Sequence[int], lcp: Sequence[int], min_tokens: int = MIN_OUTER_TOKENS,
                align: int = 1) -> Nesting:
    """``nest`` from the groups' prefix lengths and ``lcp[i - 1]``, the tokens the prefixes of groups
    ``i - 1`` and ``i`` share (0 where either is empty). An ``lcp`` rounded down to a multiple of
    ``align`` gives the same outer prefixes as the exact one: their lengths are rounded down anyway."""
    if min_tokens < 1 or align < 1:
        raise ValueError(f"min_tokens and align must be >= 1, got {min_tokens}, {align}")
    G = len(prefix_lens)
    plen = np.asarray(prefix_lens, dtype=np.int64).reshape(G)
    if len(lcp) != max(G - 1, 0):
        raise ValueError(f"lcp needs one value per pair of neighbouring groups ({max(G - 1, 0)}), got {len(lcp)}")
    # lcp[i]: what groups i-1 and i can share in an outer prefix: their common tokens, less than either
    # prefix (each group keeps an own token), in whole pages. Capping per pair before the intervals are
    # built keeps a run of long prefixes apart from a short neighbour's (exact or page-rounded lcp alike).
    lcp = [0, *((min(int(x), int(plen[i]) - 1, int(plen[i + 1]) - 1) // align * align) if x else 0
                for i, x in enumerate(lcp)), 0]

    # LCP intervals: (depth, first group, last group) for every run of >= 2 groups sharing `depth` tokens
    intervals: list[tuple[int, int, int]] = []
    stack = [(0, 0)]
    for i in range(1, G + 1):
        start = i - 1
        while stack[-1][0] > lcp[i]:
            d, start = stack.pop()
            intervals.append((d, start, i - 1))
        if stack[-1][0] < lcp[i]:
            stack.append((lcp[i], start))

    # enclosing intervals first; walk them with a stack of the kept ones that contain the current one
    intervals.sort(key=lambda t: (t[1], -t[2]))
    outer_len: list[int] = []
    outer_parent: list[int] = []
    outer_first: list[int] = []
    outer_last: list[int] = []
    group_parent = np.full(G, -1, dtype=np.int64)
    open_: list[int] = []  # kept outer prefixes enclosing the current interval
    for d, s, e in intervals:
        while open_ and outer_last[open_[-1]] < s:
            open_.pop()
        length = d  # already below every member's prefix and on a page boundary: the lcp was capped above
        base = outer_len[open_[-1]] if open_ else 0
        if length - base < min_tokens:
            continue  # too short a level: these groups stay with the enclosing outer prefix
        o = len(outer_len)
        outer_len.append(length)
        outer_parent.append(open_[-1] if open_ else -1)
        outer_first.append(s)
        outer_last.append(e)
        group_parent[s : e + 1] = o  # inner intervals (later in this order) overwrite their part
        open_.append(o)
    return Nesting(
        np.asarray(outer_len, dtype=np.int64),
        np.asarray(outer_parent, dtype=np.int64),
        np.asarray(outer_first, dtype=np.int64),
        group_parent,
    )
