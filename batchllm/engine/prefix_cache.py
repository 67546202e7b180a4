"""Automatic prefix caching for the streaming baseline policy (``--policy fcfs-lru``), after vLLM v1.

vLLM's v1 KV cache manager, reproduced on our page pool:
- every *full* page of computed tokens gets a chained hash, ``h_i = H(h_{i-1}, tokens of page i)``,
  and is registered in a hash -> page map;
- a new request looks up the longest chain of cached full pages of its tokens (at most ``len - 1``
  tokens, so the last token is always computed and yields logits) and shares them;
- pages whose refcount drops to zero stay cached but become evictable: one queue holds every
  unreferenced page, cached or not, in the order they were freed (a request's pages in reverse, so its
  tail goes first); allocation takes pages from the head and drops their hash (LRU eviction);
- a cache hit on an unreferenced page takes it out of the queue.

``PrefixCachingPool`` is that allocator and index; ``PrefixCachingKVManager`` is the KV manager's
prefix-caching strategy on top of it: it looks up a waiting sequence's cached pages, starts the sequence
from them, and registers each item's full pages as they are scheduled (keeping each item's hash chain).

The BatchLLM policy does not use this: its plan knows every prefix in advance and keeps each exactly
as long as its group runs (``SharedPrefix``).
"""

from __future__ import annotations

import collections
import hashlib
from typing import NamedTuple

import numpy as np

from batchllm.engine.kv_cache import OutOfPages, PagePool
from batchllm.engine.kv_manager import KVManager
from batchllm.engine.sequence import Schedulable


def page_hash(parent: bytes, tokens: np.ndarray) -> bytes:
    """Chained hash of one full page; collisions are as unlikely as for vLLM's sha256 option."""
    return hashlib.blake2b(parent + np.ascontiguousarray(tokens, dtype=np.int32).tobytes(), digest_size=16).digest()


class PrefixCachingPool(PagePool):
    """A ``PagePool`` whose unreferenced pages keep their contents until evicted in LRU order."""

    def __init__(self, num_pages: int, page_size: int):
        super().__init__(num_pages)
        self.page_size = page_size
        self._queue: collections.OrderedDict[int, None] = collections.OrderedDict((p, None) for p in range(num_pages))
        self._page_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self.hits = 0  # tokens served from the cache
        self.evictions = 0

    # -- allocation ------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._queue)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._queue)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._queue):
            raise OutOfPages(f"need {n} pages, {len(self._queue)} free or evictable")
        pages = []
        for _ in range(n):
            p, _ = self._queue.popitem(last=False)
            h = self._hash_of.pop(p, None)
            if h is not None:
                del self._page_of[h]
                self.evictions += 1
            self.refcount[p] = 1
            pages.append(p)
        return pages

    def share(self, pages: list[int]) -> None:
        for p in pages:
            if self.refcount[p] == 0:
                self._queue.pop(p)  # a hit on an evictable page revives it
            self.refcount[p] += 1

    def release(self, pages: list[int]) -> None:
        for p in reversed(pages):  # the sequence's tail is the least likely to be shared: evict it first
            rc = self.refcount[p] - 1
            if rc < 0:
                raise RuntimeError(f"page {p} released more often than referenced")
            self.refcount[p] = rc
            if rc == 0:
                self._queue[p] = None

    # -- caching ---------------------------------------------------------------------------------
    def lookup(self, tokens: np.ndarray, max_tokens: int) -> tuple[list[int], list[bytes]]:
        """Pages holding the longest cached run of full pages of ``tokens[:max_tokens]``, and their hashes."""
        pages, hashes = [], []
        parent = b""
        ps = self.page_size
        for i in range(max_tokens // ps):
            h = page_hash(parent, tokens[i * ps : (i + 1) * ps])
            p = self._page_of.get(h)
            if p is None:
                break
            pages.append(p)
            hashes.append(h)
            parent = h
        return pages, hashes

    def num_evictable(self, pages: list[int]) -> int:
        """How many of ``pages`` sit in the free queue (sharing them takes them out of it)."""
        return sum(1 for p in pages if self.refcount[p] == 0)

    def register(self, pages: list[int], hashes: list[bytes], tokens_of, num_computed: int) -> None:
        """Cache every full page of computed tokens not cached yet; ``hashes`` (the sequence's chain so
        far) is extended in place. ``tokens_of(start, end)`` returns the sequence's tokens."""
        ps = self.page_size
        parent = hashes[-1] if hashes else b""
        for i in range(len(hashes), num_computed // ps):
            h = page_hash(parent, tokens_of(i * ps, (i + 1) * ps))
            hashes.append(h)
            parent = h
            p = pages[i]
            if h not in self._page_of and p not in self._hash_of:
                self._page_of[h] = p
                self._hash_of[p] = h

    def check_integrity(self) -> None:
        """Every page is in the free queue (free or cached, evictable) or in use, never both."""
        in_use = int((self.refcount > 0).sum())
        if (self.refcount < 0).any():
            raise RuntimeError("negative refcount")
        queued = np.fromiter(self._queue, dtype=np.int64, count=len(self._queue))
        if len(queued) and (self.refcount[queued] != 0).any():
            raise RuntimeError("a queued page still has references")
        if len(self._queue) + in_use != self.num_pages:
            raise RuntimeError(f"page leak: {len(self._queue)} free + {in_use} in use != {self.num_pages}")
        if len(self._page_of) != len(self._hash_of):
            raise RuntimeError("hash maps out of sync")


class CacheHit(NamedTuple):
    """Cached full pages a sequence can start from, and their chained hashes (opaque to the scheduler)."""

    pages: list[int]
    hashes: list[bytes]


class PrefixCachingKVManager(KVManager):
    """The KV manager of the streaming baseline: pages cached by content, reused across requests."""

    pool: PrefixCachingPool

    def __init__(self, kv):
        super().__init__(kv)
        self._hashes: dict[Schedulable, list[bytes]] = {}  # hash chain of each item's registered pages

    def _new_pool(self, num_pages: int) -> PrefixCachingPool:
        return PrefixCachingPool(num_pages, self.page_size)

    def lookup(self, s: Schedulable) -> CacheHit | None:
        """The longest run of cached full pages of ``s``'s tokens; None for an item that starts after a
        shared prefix (its head comes from the prefix)."""
        if s.prefix is not None:
            return None
        limit = s.total_len - 1  # the last token is always computed: it yields the logits
        return CacheHit(*self.pool.lookup(s.token_slice(0, limit), limit))

    def pages_to_admit(self, s: Schedulable, hit: CacheHit | None) -> int:
        need = super().pages_to_admit(s, hit)
        if hit is not None:  # reused pages need no allocation, but reviving evictable ones uses free slots
            need += self.pool.num_evictable(hit.pages) - len(hit.pages)
        return need

    def admit(self, s: Schedulable, hit: CacheHit | None) -> None:
        """Start ``s`` from its cached pages; ``num_cached`` keeps the value of the first admission (as
        vLLM reports it)."""
        if hit is not None and hit.pages:
            self.pool.share(hit.pages)
            s.pages = list(hit.pages)
            self._hashes[s] = list(hit.hashes)
            s.num_computed = len(hit.pages) * self.page_size
            if s.num_preemptions == 0:
                s.num_cached = min(s.num_computed, s.prompt_len)
        super().admit(s, hit)

    def on_scheduled(self, s: Schedulable, num_computed: int) -> None:
        """Register ``s``'s full pages up to ``num_computed`` now, at scheduling time, as vLLM v1 does: a
        request admitted later in the same step already hits them."""
        self.pool.register(s.pages, self._hashes.setdefault(s, []), s.token_slice, num_computed)

    def release(self, s: Schedulable) -> None:
        super().release(s)
        self._hashes.pop(s, None)
