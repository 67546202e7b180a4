"""Prompts reduced to their KV pages: the input of the page-granular planner.

The engine shares KV at page granularity, so the plan of a big job need not hold every prompt token:
``PagePrompts`` keeps, per prompt, one 64-bit *symbol* per page of ``page_size`` tokens (8 bytes per
page: half a byte per token at 16-token pages) and its token length. Full pages get a chained hash,
``h_j = mix(h_{j-1} * M + content(page j))`` (the scheme of ``engine/prefix_cache.page_hash``, in 64
bits and vectorised); a partial last page of ``r`` tokens gets the same chain over its ``r`` tokens
with ``r`` folded in, so it equals another prompt's last symbol only when both prompts are the same.
Prompts are added in batches and can be dropped once added (``add``): the plan is built streaming.

``page_trie`` builds the prefix tree (``trie.PrefixTrie``) over these symbol sequences: its depths and
lengths are in tokens, so ``groups.py`` and ``nesting.py`` run on it unchanged. A node at ``d``
symbols is ``d`` full pages (``d * page_size`` tokens) or, when its last symbol is a partial page,
the whole of identical prompts. What this gives up against the token-exact tree: two prompts that
diverge inside a page share only the pages before it, and a prompt that is a prefix of another
shares only its full pages with it (its partial last page is its own symbol).

Collisions. Requests are sorted and compared by symbols on the understanding that equal symbols at
page ``j`` mean equal pages ``0..j`` (``symbol_order``, ``chained_lcp``), so two prompts are wrongly
merged only if two *different* pages following the *same* prefix get the same symbol (chains that
diverged earlier and meet again are never compared that far). Given the same ``h_{j-1}``, ``h_j`` is
a bijection of the page's content value ``sum_i W_i * token_i + count * M (mod 2^64)`` (``W_i``: fixed
odd random weights per place in the page), so that is the event: for two pages with some token ids
differing by an odd amount it has probability ``2^-63`` over the weights (at worst ``2^-32``, for ids
all differing by multiples of ``2^31``). A job with ``k`` distinct pages after a common prefix
has ``k^2 / 2`` such pairs there: for 10,000,000 prompts under 300 system prompts about ``300 *
33,000^2 / 2 = 1.7e11`` pairs, so a merge has probability about ``1e-8``. And nothing runs on a hash:
``engine/sources.py`` checks every member's tokens against its group's prefix, token for token, and
raises on a mismatch rather than attach a sample to another prompt's KV.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from batchllm.plan.trie import PrefixTrie, _lcp_interval_tree

_M = np.uint64(0x9E3779B97F4A7C15)  # chain multiplier (odd)
_SEED = np.uint64(0x2545F4914F6CDD1D)  # the chain's start: h_{-1}
_MAX_PAGE = 1 << 12


def _mix(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (a bijection of uint64 with full avalanche), element-wise."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


# Per position in a page: an odd random weight, so a page's content sum depends on token order.
_WEIGHTS = np.random.default_rng(0x5EED).integers(0, 1 << 63, _MAX_PAGE, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


class PagePrompts:
    """The page symbols and token lengths of a job's prompts, appended batch by batch (``add``).

    Arrays taken from ``symbols`` must be dropped before the next ``add`` or ``finish``, which grow the
    buffer in place (``ValueError`` otherwise). After ``finish`` (called by ``page_trie``): ``symbols``
    (uint64, all prompts' symbols concatenated),
    ``sym_offsets`` / ``sym_lens`` (per prompt: where its symbols start, how many: ``ceil(len / page)``)
    and ``lengths`` (per prompt: tokens). Request indices are positions in the order of addition.
    """

    def __init__(self, page_size: int):
        if not 2 <= page_size <= _MAX_PAGE:  # one-token pages: the token tree is the page tree
            raise ValueError(f"page_size must be in 2..{_MAX_PAGE}, got {page_size}")
        self.page_size = page_size
        # symbols land in one buffer grown in place (``ndarray.resize``: a ``realloc``, so a big
        # buffer moves by remapping pages rather than being copied next to itself)
        self._buf = np.zeros(1 << 16, dtype=np.uint64)
        self._used = 0
        self._len: list[np.ndarray] = []
        self.symbols = self._buf[:0]
        self.lengths = np.zeros(0, dtype=np.int64)
        self.sym_lens = np.zeros(0, dtype=np.int64)
        self.sym_offsets = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lengths) + sum(len(a) for a in self._len)

    @classmethod
    def of(cls, prompts: Iterable, page_size: int, batch: int = 4096) -> PagePrompts:
        """The page symbols of ``prompts`` (an iterable of token id arrays or lists), hashed ``batch`` at a time."""
        pp = cls(page_size)
        buf = []
        for p in prompts:
            buf.append(p)
            if len(buf) == batch:
                pp.add(buf)
                buf = []
        if buf:
            pp.add(buf)
        pp.finish()
        return pp

    def add(self, prompts: list) -> None:
        """Append a batch of prompts (each a non-empty 1-D integer array or list of token ids in the int32
        range; ``ValueError`` otherwise). The batch is not referenced afterwards."""
        if not prompts:
            return
        arrays = []
        for i, p in enumerate(prompts):
            a = np.asarray(p)
            if a.ndim != 1 or a.size == 0 or a.dtype.kind not in "iu":
                raise ValueError(f"prompt {len(self) + i}: expected a non-empty 1-D sequence of integer token ids")
            if a.dtype != np.int32 and (int(a.min()) < -(2**31) or int(a.max()) >= 2**31):
                raise ValueError(f"prompt {len(self) + i}: token id out of the int32 range")
            arrays.append(a)
        P = self.page_size
        lens = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
        nsym = -(-lens // P)
        tok_start = np.zeros(len(lens), dtype=np.int64)
        np.cumsum(lens[:-1], out=tok_start[1:])
        sym_start = np.zeros(len(lens), dtype=np.int64)
        np.cumsum(nsym[:-1], out=sym_start[1:])
        total_sym = int(nsym.sum())
        # per token: its int32 bit pattern times the weight of its place in its page
        tok = np.concatenate([a.astype(np.int32, copy=False) for a in arrays]).view(np.uint32).astype(np.uint64)
        place = np.arange(len(tok), dtype=np.int64)
        place -= np.repeat(tok_start, lens)
        place %= P
        tok *= _WEIGHTS[place]
        del place
        # per symbol: its prompt, its page number there, its first token and its token count
        sym_owner = np.repeat(np.arange(len(lens)), nsym)
        page_no = np.arange(total_sym, dtype=np.int64) - sym_start[sym_owner]
        first_tok = tok_start[sym_owner] + page_no * P
        sym_tokens = np.minimum(P, lens[sym_owner] - page_no * P).astype(np.uint64)
        content = _mix(np.add.reduceat(tok, first_tok) + sym_tokens * _M)
        del tok, sym_owner, page_no, first_tok, sym_tokens
        # chain along each prompt: column j over all prompts with more than j symbols
        sym = np.empty(total_sym, dtype=np.uint64)
        prev = np.full(len(lens), _SEED, dtype=np.uint64)
        for j in range(int(nsym.max())):
            live = np.flatnonzero(nsym > j)
            idx = sym_start[live] + j
            h = _mix(prev[live] * _M + content[idx])
            sym[idx] = h
            prev[live] = h
        if self._used + total_sym > len(self._buf):
            self.symbols = None  # drop the view, so the buffer can be resized in place
            try:
                self._buf.resize(max(self._used + total_sym, len(self._buf) * 5 // 4))
            finally:
                self.symbols = self._buf[: self._used]
        self._buf[self._used : self._used + total_sym] = sym
        self._used += total_sym
        self.symbols = self._buf[: self._used]
        self._len.append(lens)

    def finish(self) -> None:
        """Concatenate what was added (idempotent; more can be added and finished again)."""
        if not self._len:
            return
        self.symbols = None
        try:
            self._buf.resize(self._used)  # give the growth slack back
        finally:
            self.symbols = self._buf[: self._used]
        self.lengths = np.concatenate([self.lengths, *self._len])
        self._len.clear()
        self.sym_lens = -(-self.lengths // self.page_size)
        self.sym_offsets = np.zeros(len(self.lengths), dtype=np.int64)
        np.cumsum(self.sym_lens[:-1], out=self.sym_offsets[1:])

    def nbytes(self) -> int:
        """Bytes the finished arrays hold."""
        return sum(a.nbytes for a in (self.symbols, self.lengths, self.sym_lens, self.sym_offsets))


def symbol_order(symbols: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Request indices sorted by their symbol sequences (a proper prefix first; ties by index). The
    order among distinct symbols is their numeric one, which is all the tree needs: requests sharing a
    prefix are contiguous.

    Most-significant-symbol-first: runs of requests equal so far are refined by their next symbol, and
    a request leaves the work once it is alone in its run or has no next symbol; so the cost is the
    shared pages, and the memory a few integers per request (no per-request sort keys)."""
    n = len(lengths)
    order = np.arange(n, dtype=np.int64)
    run = np.zeros(n, dtype=np.int64)  # per position in order: its run (non-decreasing)
    active = np.arange(n, dtype=np.int64) if n > 1 else np.zeros(0, dtype=np.int64)  # positions still to refine
    j = 0
    while len(active):
        req = order[active]
        has = lengths[req] > j
        sym = np.where(has, symbols[offsets[req] + np.where(has, j, 0)], np.uint64(0))
        r = run[active]
        perm = np.lexsort((sym, has, r))  # stable: equal keys keep their order (ties by index)
        req, has, sym, r = req[perm], has[perm], sym[perm], r[perm]
        order[active] = req
        new = np.ones(len(req), dtype=bool)
        new[1:] = (r[1:] != r[:-1]) | (has[1:] != has[:-1]) | (sym[1:] != sym[:-1])
        ids = np.cumsum(new)
        size = np.bincount(ids)[ids]
        # runs keep increasing ids along positions: offset them past every id used so far
        run[active] = ids + int(run.max()) + 1 if len(run) else ids
        keep = has & (size > 1)
        active = active[keep]
        j += 1
    return order


def chained_lcp(symbols: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``lcp[k]``: symbols requests ``order[k-1]`` and ``order[k]`` share (``lcp[0] = 0``). Symbols are
    chained, so two requests with equal symbols at position ``j`` are equal up to ``j``: a binary search
    per pair, all pairs at once (about ``log2`` of the longest prompt's pages in vector steps)."""
    n = len(order)
    lcp = np.zeros(n, dtype=np.int64)
    if n < 2:
        return lcp
    a, b = offsets[order[:-1]], offsets[order[1:]]
    lo = np.zeros(n - 1, dtype=np.int64)
    hi = np.minimum(lengths[order[:-1]], lengths[order[1:]])
    todo = np.flatnonzero(lo < hi)
    while len(todo):
        l, h = lo[todo], hi[todo]
        mid = (l + h + 1) // 2
        eq = symbols[a[todo] + mid - 1] == symbols[b[todo] + mid - 1]
        lo[todo] = np.where(eq, mid, l)
        hi[todo] = np.where(eq, h, mid - 1)
        todo = todo[lo[todo] < hi[todo]]
    lcp[1:] = lo
    return lcp


def page_trie(pages: PagePrompts) -> PrefixTrie:
    """The prefix tree over the prompts' page symbols, with depths and lengths in tokens (see the module
    docstring): a ``PrefixTrie`` with ``page_size == pages.page_size``."""
    pages.finish()
    P = pages.page_size
    sym, off, slen, tlen = pages.symbols, pages.sym_offsets, pages.sym_lens, pages.lengths
    order = symbol_order(sym, off, slen)
    lcp = chained_lcp(sym, off, slen, order)
    depth, parent, lo, hi, term_sorted = _lcp_interval_tree(lcp, slen[order])
    n = len(tlen)
    term_node = np.empty(n, dtype=np.int64)
    term_node[order] = term_sorted
    if n:
        # d symbols = d full pages, or (a partial last page) the whole of identical prompts
        rep = order[np.minimum(lo, n - 1)]
        depth = np.minimum(depth * P, tlen[rep])
        lcp = np.minimum(lcp * P, np.minimum(tlen[order], tlen[np.roll(order, 1)]))
        lcp[0] = 0
    return PrefixTrie(sym, off, tlen, order, lcp, depth, parent, lo, hi, term_node, page_size=P, sym_lens=slen)
