"""Compressed prefix tree (radix tree) over the prompt token ids of a whole job.

BatchLLM (arXiv 2412.03594, Sec. 4.1) finds the common prefixes of a job globally with one prefix tree
over all prompts. The authors' code inserts prompts one by one into a pointer-based tree, which is far
too slow in Python for 10^5..10^6 prompts. This module builds the same tree from a sorted order
instead, the way a suffix tree is read off a suffix array (the LCP-interval tree of Abouelhoda, Kurtz
and Ohlebusch, "Replacing suffix trees with enhanced suffix arrays", 2004):

1. sort the prompts lexicographically (Python's sort over big-endian byte strings: one ``memcmp`` per
   comparison);
2. compute the longest common prefix (LCP) of each pair of neighbours in that order, vectorised with
   numpy over chunks of pairs;
3. one stack pass over the LCP array yields every branching node (an "LCP interval": a maximal run of
   neighbours whose LCPs are all >= d, with d the minimum) and every leaf.

In sorted order every subtree is a contiguous range of sorted positions, so a node is fully described
by its depth and its range ``[lo, hi)``; the number of requests below it is ``hi - lo``. Node ids are
in depth-first preorder with children in lexicographic order (node 0 is the root), so a subtree is
also a contiguous range of node ids. A node stores no tokens: its path is
``tokens of request rep[v], positions [0, depth[v])`` and its edge is the part from ``depth[parent]``.

Nodes are the root, every branching point, and every prefix at which some prompt ends. A prompt that
is a prefix of another (or a duplicate) therefore ends at an inner node: ``term_node`` maps each
request to the node where it ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Token-pair comparisons per LCP chunk: bounds the temporaries to a few hundred MB.
_LCP_CHUNK = 1 << 23
# Tokens converted to sort keys at a time.
_KEY_CHUNK = 1 << 24


def concat_prompts(prompts: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate prompts and pack them into one flat int32 array.

    Returns ``(tokens, offsets, lengths)``: prompt ``i`` is ``tokens[offsets[i]:offsets[i] + lengths[i]]``.
    Each prompt must be a non-empty 1-D sequence of integers in the int32 range (``ValueError`` otherwise).
    """
    n = len(prompts)
    lengths = np.empty(n, dtype=np.int64)
    arrays = []
    for i, p in enumerate(prompts):
        a = p if isinstance(p, np.ndarray) else np.asarray(p)
        if a.ndim != 1:
            raise ValueError(f"prompt {i}: expected a 1-D sequence of token ids, got shape {a.shape}")
        if a.size == 0:
            raise ValueError(f"prompt {i}: empty prompt (every request needs at least one token)")
        if a.dtype.kind not in "iu":
            raise ValueError(f"prompt {i}: token ids must be integers, got dtype {a.dtype}")
        if a.dtype != np.int32:
            if a.dtype.itemsize >= 4 and (int(a.min()) < -(2**31) or int(a.max()) >= 2**31):
                raise ValueError(f"prompt {i}: token id out of the int32 range")
            a = a.astype(np.int32)
        lengths[i] = a.size
        arrays.append(a)
    tokens = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int32)
    offsets = np.zeros(n, dtype=np.int64)
    if n:
        np.cumsum(lengths[:-1], out=offsets[1:])
    return tokens, offsets, lengths


def lexicographic_order(tokens: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Request indices sorted by their token sequence (a proper prefix sorts first; ties by index)."""
    n = len(lengths)
    keys: list[bytes] = []
    i = 0
    while i < n:
        # Big-endian with the sign bit flipped, so bytewise order == signed int32 order.
        j = int(np.searchsorted(offsets, offsets[i] + _KEY_CHUNK, side="right"))
        j = max(j, i + 1)
        base = int(offsets[i])
        end = int(offsets[j - 1] + lengths[j - 1])
        buf = (tokens[base:end].view(np.uint32) ^ np.uint32(0x80000000)).astype(">u4").tobytes()
        starts = ((offsets[i:j] - base) * 4).tolist()
        stops = ((offsets[i:j] + lengths[i:j] - base) * 4).tolist()
        keys.extend(buf[a:b] for a, b in zip(starts, stops))
        del buf
        i = j
    # Python's sort is stable, so equal prompts keep input order.
    return np.array(sorted(range(n), key=keys.__getitem__), dtype=np.int64)


def adjacent_lcp(tokens: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``lcp[k]`` = longest common prefix of requests ``order[k-1]`` and ``order[k]``; ``lcp[0] = 0``."""
    n = len(order)
    lcp = np.zeros(n, dtype=np.int64)
    if n < 2:
        return lcp
    a_off = offsets[order[:-1]]
    b_off = offsets[order[1:]]
    m = np.minimum(lengths[order[:-1]], lengths[order[1:]])
    cum = np.cumsum(m)
    k = 0
    while k < n - 1:
        # Pairs [k, e) whose compared tokens fit in one chunk (at least one pair).
        base = cum[k - 1] if k else 0
        e = max(int(np.searchsorted(cum, base + _LCP_CHUNK, side="right")), k + 1)
        mm = m[k:e]
        total = int(cum[e - 1] - base)
        seg = np.zeros(e - k, dtype=np.int64)
        np.cumsum(mm[:-1], out=seg[1:])
        within = np.arange(total, dtype=np.int64) - np.repeat(seg, mm)
        diff = tokens[np.repeat(a_off[k:e], mm) + within] != tokens[np.repeat(b_off[k:e], mm) + within]
        # First mismatch per pair; pairs without one match over their whole common length.
        first = np.minimum.reduceat(np.where(diff, within, np.int64(1) << 62), seg)
        lcp[k + 1 : e + 1] = np.minimum(first, mm)
        k = e
    return lcp


@dataclass
class PrefixTrie:
    """A radix tree over the prompts of one job (see the module docstring for the representation).

    Per request (index = position in the input list): ``offsets``, ``lengths``, ``term_node``.
    Per sorted position: ``sorted_ids`` (request at that position), ``lcp`` (with the previous one).
    Per node, in depth-first preorder: ``depth`` (path length from the root), ``parent`` (-1 for the
    root), ``lo``/``hi`` (range of sorted positions below it), ``rep`` (a request whose tokens spell
    the path). Invariant: ``parent[v] < v`` and the subtree of ``v`` is node ids ``[v, end[v])``.

    ``page_size == 1``: a token tree, ``tokens`` are the prompts' token ids. ``page_size > 1``: a page
    tree (``pages.page_trie``): ``tokens`` are the prompts' page symbols, ``offsets`` / ``sym_lens``
    index them, and ``lengths``, ``depth`` and ``lcp`` are in tokens; ``path`` and ``prompt`` need token
    ids, so a page tree has none.
    """

    tokens: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    sorted_ids: np.ndarray
    lcp: np.ndarray
    depth: np.ndarray
    parent: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    term_node: np.ndarray
    page_size: int = 1
    sym_lens: np.ndarray | None = None

    @classmethod
    def build(cls, prompts: Sequence) -> PrefixTrie:
        """Build the tree of ``prompts`` (a sequence of non-empty 1-D integer arrays or lists)."""
        tokens, offsets, lengths = concat_prompts(prompts)
        order = lexicographic_order(tokens, offsets, lengths)
        lcp = adjacent_lcp(tokens, offsets, lengths, order)
        depth, parent, lo, hi, term_sorted = _lcp_interval_tree(lcp, lengths[order])
        term_node = np.empty(len(lengths), dtype=np.int64)
        term_node[order] = term_sorted
        return cls(tokens, offsets, lengths, order, lcp, depth, parent, lo, hi, term_node)

    @property
    def num_requests(self) -> int:
        return len(self.lengths)

    @property
    def num_nodes(self) -> int:
        return len(self.depth)

    @property
    def rep(self) -> np.ndarray:
        """Per node: a request whose prompt starts with the node's path."""
        if self.num_requests == 0:
            return np.zeros(self.num_nodes, dtype=np.int64)
        return self.sorted_ids[np.minimum(self.lo, self.num_requests - 1)]

    @property
    def leaves(self) -> np.ndarray:
        """Per node: number of requests whose prompt starts with the node's path."""
        return self.hi - self.lo

    @property
    def edge_start(self) -> np.ndarray:
        return np.where(self.parent >= 0, self.depth[np.maximum(self.parent, 0)], 0)

    @property
    def edge_len(self) -> np.ndarray:
        return self.depth - self.edge_start

    @property
    def end(self) -> np.ndarray:
        """Per node: one past the last node id of its subtree."""
        # Preorder sorts nodes by (lo, depth), so lo is non-decreasing along node ids.
        return np.searchsorted(self.lo, self.hi, side="left") if self.num_nodes > 1 else np.array([1])

    def unique_tokens(self) -> int:
        """Number of distinct non-empty prefixes over all prompts (= total edge length)."""
        return int(self.depth.sum() - self.depth[np.maximum(self.parent, 0)].sum())

    def children(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR children lists: children of ``v`` are ``ids[ptr[v]:ptr[v+1]]``, in lexicographic order."""
        counts = np.bincount(self.parent[1:], minlength=self.num_nodes)
        ptr = np.zeros(self.num_nodes + 1, dtype=np.int64)
        np.cumsum(counts, out=ptr[1:])
        # Node ids are preorder, so a stable sort by parent keeps siblings in lexicographic order.
        ids = 1 + np.argsort(self.parent[1:], kind="stable")
        return ptr, ids

    def common_prefix(self, i: int, j: int, limit: int) -> int:
        """Tokens requests ``i`` and ``j`` share within their first ``limit`` tokens: exact in a token
        tree; in a page tree the full pages they share (the exact count rounded down to a page)."""
        if self.page_size == 1:
            return _common(self.prompt(i)[:limit], self.prompt(j)[:limit])
        k = limit // self.page_size
        si, sj = self.symbols_of(i)[:k], self.symbols_of(j)[:k]
        return _common(si, sj) * self.page_size

    def symbols_of(self, i: int) -> np.ndarray:
        """Page symbols of request ``i`` (a page tree only)."""
        return self.tokens[self.offsets[i] : self.offsets[i] + self.sym_lens[i]]

    def path(self, v: int) -> np.ndarray:
        """Token ids of node ``v``'s full path from the root (a view into ``tokens``; a token tree only)."""
        self._need_tokens()
        r = int(self.rep[v])
        return self.tokens[self.offsets[r] : self.offsets[r] + self.depth[v]]

    def prompt(self, i: int) -> np.ndarray:
        """Token ids of request ``i`` (a token tree only)."""
        self._need_tokens()
        return self.tokens[self.offsets[i] : self.offsets[i] + self.lengths[i]]

    def _need_tokens(self) -> None:
        if self.page_size != 1:
            raise ValueError("a page tree holds page symbols, not token ids")


def _common(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two 1-D arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def _lcp_interval_tree(lcp: np.ndarray, sorted_len: np.ndarray):
    """Read the radix tree off the LCP array of sorted prompts.

    Returns per-node ``depth, parent, lo, hi`` in preorder, and per sorted position the node where that
    prompt ends. Bottom-up LCP-interval traversal (Abouelhoda et al. 2004, Alg. 4.4) with a stack of
    open intervals; a prompt that is longer than both neighbouring LCPs gets its own leaf.
    """
    n = len(sorted_len)
    lcp_l = lcp.tolist() + [0]
    lens = sorted_len.tolist()
    depth = [0]
    lo = [0]
    hi = [n]
    parent = [-1]
    term = [0] * n
    # Open intervals: parallel stacks of (depth, id).
    st_d = [0]
    st_id = [0]
    for b in range(1, n + 1):
        r = lcp_l[b]
        pre_d, pre_id = st_d[-1], st_id[-1]
        lb = b - 1
        pending = -1
        while r < st_d[-1]:
            st_d.pop()
            nid = st_id.pop()
            hi[nid] = b
            lb = lo[nid]
            if r <= st_d[-1]:
                parent[nid] = st_id[-1]
            else:
                pending = nid
        if r > st_d[-1]:
            nid = len(depth)
            depth.append(r)
            lo.append(lb)
            hi.append(-1)
            parent.append(st_id[-1])
            st_d.append(r)
            st_id.append(nid)
            if pending >= 0:
                parent[pending] = nid
        # Deepest open interval containing position b-1: its left or its right neighbourhood.
        if pre_d >= st_d[-1]:
            cd, cid = pre_d, pre_id
        else:
            cd, cid = st_d[-1], st_id[-1]
        if lens[b - 1] > cd:
            nid = len(depth)
            depth.append(lens[b - 1])
            lo.append(b - 1)
            hi.append(b)
            parent.append(cid)
            term[b - 1] = nid
        else:
            term[b - 1] = cid
    depth_a = np.array(depth, dtype=np.int64)
    lo_a = np.array(lo, dtype=np.int64)
    # Preorder = sort by (lo, depth): intervals sharing lo are nested, the shallower one first.
    pre = np.lexsort((depth_a, lo_a))
    rank = np.empty_like(pre)
    rank[pre] = np.arange(len(pre))
    par = np.array(parent, dtype=np.int64)[pre]
    par = np.where(par >= 0, rank[np.maximum(par, 0)], -1)
    return (
        depth_a[pre],
        par,
        lo_a[pre],
        np.array(hi, dtype=np.int64)[pre],
        rank[np.array(term, dtype=np.int64)] if n else np.zeros(0, dtype=np.int64),
    )
