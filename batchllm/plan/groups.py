"""Prefix groups (BatchLLM's single-level prefix sharing) and their execution order.

BatchLLM (arXiv 2412.03594, Sec. 4.1-4.2) runs every request as part of exactly one *prefix group*: a
shared prefix computed once plus the members' own suffixes. Which tree nodes become groups is decided
by a gain rule, applied bottom-up by ``PromptPrefixCluster._enlarge_1st_prefix_tokens`` in the authors'
released code; ``batchllm_groups`` reproduces that procedure on the array trie of ``trie.py``.
``order_groups`` then orders groups and members: larger decode ratio first, within a depth-first walk
of the prefix tree (SGLang: DFS order maximises reuse for an offline batch). ``split_samples`` makes
the ordered groups the final execution groups: a request with ``n > 1`` samples whose samples are
better off sharing its whole prompt (but the last token) leaves its group for a group of its own.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from batchllm.plan.nesting import MIN_OUTER_TOKENS
from batchllm.plan.trie import PrefixTrie


class Grouping(NamedTuple):
    """Request-to-group assignment, before ordering.

    ``req_group[i]``: group of request ``i`` (0..num_groups-1, no order implied).
    ``prefix_len[g]``: tokens group ``g`` shares (0 for a singleton); at most every member's length - 1.
    ``anchor[g]``: trie node at the end of the group's shared path (the member's own node for singletons),
    the place of the group in the depth-first walk.
    """

    req_group: np.ndarray
    prefix_len: np.ndarray
    anchor: np.ndarray

    @property
    def num_groups(self) -> int:
        return len(self.prefix_len)


def batchllm_groups(trie: PrefixTrie, min_prefix: int = 1) -> Grouping:
    """Split the prompts into prefix groups with BatchLLM's single-level gain rule.

    The tree is transformed in place (on working copies), bottom-up, exactly as the authors' code does;
    afterwards every child of the root is a group whose shared prefix is its (transformed) edge.

    Procedure. Work on a mutable copy of the tree in which ``edge[v]`` is the token count from ``v``'s
    *current* parent to ``v`` and ``leaves[v]`` the number of requests below ``v`` (a request ending
    at ``v`` counts as a leaf child of ``v``, like the authors' leaf markers). Visit every non-root node
    ``x`` after all its descendants (reverse preorder); let ``p`` be its parent. For each current child
    ``y`` of ``x`` (its original children plus nodes already lifted into it)::

        gain = (leaves[y] - 1) * edge[y] - edge[x]
        if gain > 0: lift y: make it a child of p with edge[y] += edge[x]; leaves[x] -= leaves[y]

    i.e. giving the requests below ``y`` a prefix of their own saves ``edge[y]`` tokens for all but one
    of them and costs one more copy of ``x``'s edge. If ``x`` is then left with exactly one child and
    no request ending at it, ``x`` absorbs that child (a chain is one longer prefix); if it is left
    with nothing, it disappears. At the top of the recursion ``p`` is the root and ``x = c`` is a
    first-level node, so ``edge[x] = len(c)`` and ``edge[y] = len(g) - len(c)``: the rule
    ``(leaves(g) - 1) * len(g) - len(c) > 0`` of the design doc with ``len(g)`` read, as the authors'
    code computes it, as the tokens ``g`` adds below ``c``. Deeper, the same rule is applied to each
    subtree as if its root were the tree's root (a node bubbles up one level per successful test).

    Differences from the released code, none of which changes which paths become groups: its leaf test
    ``input_ids is []`` is always false, and a prompt that ends at a merged node is dropped (here leaf
    markers are counts and nothing is lost); it absorbs a lone remaining child instead of testing it,
    and it tests children in insertion order (both yield the same paths; ``tests/test_plan.py``
    checks this against a literal transcription of the released procedure).

    Then each first-level node ``c`` is a group of the requests below it, with
    ``prefix_len = min(len(c), shortest member - 1)`` (every member keeps >= 1 own token to produce
    logits; this only bites when a member's prompt ends exactly at ``c``). A group of one request, or
    whose prefix is shorter than ``min_prefix``, is replaced by singleton groups with prefix 0.
    """
    if min_prefix < 1:
        raise ValueError(f"min_prefix must be >= 1, got {min_prefix}")
    if trie.num_requests == 0:
        z = np.zeros(0, dtype=np.int64)
        return Grouping(z, z.copy(), z.copy())
    tree = _lift_groups(trie)
    return _collect_groups(trie, tree, min_prefix)


class _LiftedTree(NamedTuple):
    """The working tree after the gain rule (``batchllm_groups``): per node its current children, edge
    (tokens from its current parent) and leaf count, the original node whose ending requests it holds,
    and the original node where its path now ends."""

    children: list[list[int]]
    edge: list[int]
    leaves: list[int]
    holder: list[int]
    end: list[int]


def _lift_groups(trie: PrefixTrie) -> _LiftedTree:
    """The bottom-up gain-rule transformation of ``batchllm_groups``' docstring, on working copies of
    ``trie`` (a non-empty tree): afterwards every child of the root is a group."""
    n_nodes = trie.num_nodes
    parent = trie.parent.tolist()
    edge = trie.edge_len.tolist()
    leaves = trie.leaves.tolist()
    nterm = np.bincount(trie.term_node, minlength=n_nodes).tolist()
    ptr, ids = trie.children()
    ptr_l, ids_l = ptr.tolist(), ids.tolist()
    children = [ids_l[ptr_l[v] : ptr_l[v + 1]] for v in range(n_nodes)]
    holder = list(range(n_nodes))  # original node whose requests-ending-here this node now holds
    end = list(range(n_nodes))  # original node where this node's path now ends

    for x in range(n_nodes - 1, 0, -1):
        kids = children[x]
        ex = edge[x]
        stay = []
        moved = False
        for y in kids:
            ly = leaves[y]
            if ly == 0:  # emptied by lifting all it held: gone
                moved = True
                continue
            if ly > 1 and (ly - 1) * edge[y] > ex:
                edge[y] += ex
                children[parent[x]].append(y)
                leaves[x] -= ly
                moved = True
            else:
                stay.append(y)
        if not moved:
            continue
        if len(stay) == 1 and nterm[x] == 0:
            w = stay[0]
            edge[x] += edge[w]
            children[x] = children[w]
            holder[x] = holder[w]
            end[x] = end[w]
            children[w] = []
        else:
            children[x] = stay
    return _LiftedTree(children, edge, leaves, holder, end)


def _collect_groups(trie: PrefixTrie, tree: _LiftedTree, min_prefix: int) -> Grouping:
    """The groups of a lifted tree, one per first-level node, with ``prefix_len = min(edge, shortest
    member - 1)``; a group of one request or sharing fewer than ``min_prefix`` tokens dissolves into
    singletons (prefix 0)."""
    n_nodes = trie.num_nodes
    children, edge, leaves, holder, end = tree
    # Collect, for each first-level node, the original nodes whose ending requests it holds.
    owner = np.full(n_nodes, -1, dtype=np.int64)
    tops = [c for c in children[0] if leaves[c] > 0]
    for g, c in enumerate(tops):
        stack = [c]
        while stack:
            v = stack.pop()
            owner[holder[v]] = g
            stack.extend(children[v])
    req_group = owner[trie.term_node]
    depth = np.array([edge[c] for c in tops], dtype=np.int64)
    anchor = np.array([end[c] for c in tops], dtype=np.int64)
    size = np.bincount(req_group, minlength=len(tops))
    min_len = np.full(len(tops), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(min_len, req_group, trie.lengths)
    prefix = np.minimum(depth, min_len - 1)

    shared = (size > 1) & (prefix >= min_prefix)
    # Re-number: kept groups first, then one singleton per request of a dissolved group.
    new_id = np.full(len(tops), -1, dtype=np.int64)
    new_id[shared] = np.arange(int(shared.sum()))
    req_new = new_id[req_group]
    loose = np.flatnonzero(req_new < 0)
    n_kept = int(shared.sum())
    req_new[loose] = n_kept + np.arange(len(loose))
    prefix_out = np.concatenate([prefix[shared], np.zeros(len(loose), dtype=np.int64)])
    anchor_out = np.concatenate([anchor[shared], trie.term_node[loose]])
    return Grouping(req_new, prefix_out, anchor_out)


def decode_ratio(expected_output: np.ndarray, prompt_tokens: np.ndarray) -> np.ndarray:
    """Expected output tokens per prompt token (0 where nothing is computed)."""
    out = np.asarray(expected_output, dtype=np.float64)
    den = np.asarray(prompt_tokens, dtype=np.float64)
    return np.divide(out, den, out=np.zeros_like(out), where=den > 0)


def order_groups(trie: PrefixTrie, grouping: Grouping, expected_output: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Execution order: returns ``(group_order, request_order)``.

    ``group_order`` lists group ids (of ``grouping``) in execution order; ``request_order`` lists all
    request indices, group by group.

    Decode ratio of a group = its expected output tokens / the prompt tokens it computes
    (``prefix_len + sum(len_i - prefix_len)``); of a set of groups = the same two sums' quotient.

    Groups are emitted by a depth-first walk of the original prefix tree. Each group sits at its
    ``anchor`` node. At a node, the items to visit are the groups anchored there and the child subtrees
    holding at least one group; they are taken by decreasing decode ratio (a subtree's ratio is that
    of all groups anchored in it), ties by the smallest request index of the group / of the groups
    anchored in the subtree (input order).
    So sibling groups under one system prompt stay adjacent, and among siblings the decode-heavy ones
    start first (their decode steps then overlap the prefill of those that follow).

    Within a group, members go by decreasing own decode ratio ``expected_output[i] / len_i``, ties by
    request index.
    """
    n = trie.num_requests
    out = np.asarray(expected_output, dtype=np.float64)
    G = grouping.num_groups
    if n == 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z.copy()
    rg = grouping.req_group
    lens = trie.lengths
    size = np.bincount(rg, minlength=G)
    g_out = np.bincount(rg, weights=out, minlength=G)
    g_comp = np.bincount(rg, weights=lens, minlength=G) - (size - 1) * grouping.prefix_len
    g_first = np.full(G, n, dtype=np.int64)
    np.minimum.at(g_first, rg, np.arange(n, dtype=np.int64))
    g_ratio = decode_ratio(g_out, g_comp)

    sub_ratio, sub_cnt, first = _subtree_keys(trie, grouping.anchor, g_out, g_comp, g_first)
    group_order_a = _dfs_group_order(trie, grouping.anchor, g_ratio.tolist(), g_first.tolist(),
                                     sub_ratio, sub_cnt, first)
    rank = np.empty(G, dtype=np.int64)
    rank[group_order_a] = np.arange(G)
    own_ratio = decode_ratio(out, lens)
    request_order = np.lexsort((np.arange(n), -own_ratio, rank[rg]))
    return group_order_a, request_order


def _subtree_keys(trie: PrefixTrie, anchor: np.ndarray, g_out: np.ndarray, g_comp: np.ndarray,
                  g_first: np.ndarray) -> tuple[list[float], list[int], list[int]]:
    """Per tree node, over the groups anchored in its subtree: their decode ratio, their count and the
    smallest request index among them (``order_groups``' subtree sort keys)."""
    # Sums by contiguous preorder range, minimum by a bottom-up pass.
    n, n_nodes = trie.num_requests, trie.num_nodes
    node_out = np.bincount(anchor, weights=g_out, minlength=n_nodes)
    node_comp = np.bincount(anchor, weights=g_comp, minlength=n_nodes)
    node_cnt = np.bincount(anchor, minlength=n_nodes)
    end = trie.end
    ids = np.arange(n_nodes)
    sub = []
    for arr in (node_out, node_comp, node_cnt):
        cs = np.concatenate([[0], np.cumsum(arr)])
        sub.append(cs[end] - cs[ids])
    sub_ratio = decode_ratio(sub[0], sub[1]).tolist()
    sub_cnt = sub[2].tolist()
    node_first = np.full(n_nodes, n, dtype=np.int64)
    np.minimum.at(node_first, anchor, g_first)
    first = node_first.tolist()
    par = trie.parent.tolist()
    for v in range(n_nodes - 1, 0, -1):
        first[par[v]] = min(first[par[v]], first[v])
    return sub_ratio, sub_cnt, first


def _dfs_group_order(trie: PrefixTrie, anchor: np.ndarray, g_ratio_l: list[float], g_first_l: list[int],
                     sub_ratio: list[float], sub_cnt: list[int], first: list[int]) -> np.ndarray:
    """Group ids in ``order_groups``' depth-first order: at each node its anchored groups and its
    subtrees holding a group, by decreasing decode ratio, then smallest request index."""
    n_nodes = trie.num_nodes
    ptr, kid_ids = trie.children()
    ptr_l, kids_l = ptr.tolist(), kid_ids.tolist()
    a_order = np.argsort(anchor, kind="stable")
    a_ptr = np.searchsorted(anchor[a_order], np.arange(n_nodes + 1)).tolist()
    a_order_l = a_order.tolist()

    group_order: list[int] = []
    # Stack of (is_group, id); items pushed in reverse so the best is popped first.
    stack = [(False, 0)]
    while stack:
        is_group, v = stack.pop()
        if is_group:
            group_order.append(v)
            continue
        items = [(-g_ratio_l[g], g_first_l[g], True, g) for g in a_order_l[a_ptr[v] : a_ptr[v + 1]]]
        items += [(-sub_ratio[c], first[c], False, c) for c in kids_l[ptr_l[v] : ptr_l[v + 1]] if sub_cnt[c]]
        if len(items) > 1:
            items.sort()
        stack.extend((it[2], it[3]) for it in reversed(items))
    return np.array(group_order, dtype=np.int64)


def split_samples(prefix_len: np.ndarray, members: list[np.ndarray], lens: np.ndarray,
                  samples: np.ndarray) -> tuple[list[int], list[np.ndarray]]:
    """The final execution groups from ordered groups ``(prefix_len[g], members[g])``: returns
    ``(prefix lengths, member arrays)`` in execution order. ``lens`` / ``samples`` (n) are indexed by
    request.

    A member of a group of two or more requests leaves it when ``own_group_pays``; it follows its group
    as a group of its own that shares all its prompt but the last token among its samples. A group of
    one request with ``n > 1`` samples and no shared prefix gets that same prefix. The other members
    keep their group and its prefix, also when only one sample is left to use it (the prefix then
    shares nothing, but it still places the group under an outer prefix; see ``nesting.py``).
    """
    out_len: list[int] = []
    out_members: list[np.ndarray] = []
    for plen, m in zip(np.asarray(prefix_len).tolist(), members):
        m = np.asarray(m, dtype=np.int64)
        alone = np.zeros(len(m), dtype=bool)
        if len(m) > 1:
            alone = np.array([own_group_pays(int(lens[i]), int(samples[i]), plen) for i in m.tolist()], dtype=bool)
        stay = m[~alone]
        if len(stay):
            if plen == 0 and len(stay) == 1 and samples[stay[0]] > 1:
                plen = int(lens[stay[0]]) - 1  # one request's samples: all but the last token
            out_len.append(plen)
            out_members.append(stay)
        for i in m[alone].tolist():
            out_len.append(int(lens[i]) - 1)
            out_members.append(np.array([i], dtype=np.int64))
    return out_len, out_members


def own_group_pays(prompt_len: int, n: int, group_prefix: int) -> bool:
    """Whether a group member with ``n`` samples should share its whole prompt (but the last token)
    among its samples instead of only the group prefix. When the group prefix is long enough to become
    an outer prefix of both (``nesting.nest``), leaving costs nothing; otherwise it costs recomputing
    the group prefix once, which must be less than what the samples save."""
    own = prompt_len - 1 - group_prefix
    if n < 2 or own < 1:
        return False
    return group_prefix > MIN_OUTER_TOKENS or (n - 1) * own > group_prefix
