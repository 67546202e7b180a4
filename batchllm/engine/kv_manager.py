"""The KV manager: which pages each unit of work holds, and the page work the scheduler asks for.

The scheduler decides what runs; it touches KV memory only through this manager (nano-vllm's block
manager, vLLM v1's KV cache manager). Its operations:

- page counts for admission: ``pages_to_admit``, ``chain_pages``, ``shared_pages``, ``num_free``;
- ``grow`` an item's pages to cover its next tokens (False: the pool is short, nothing allocated; the
  scheduler then preempts);
- ``admit`` an item: attach it to its shared prefix (the prefix's full pages shared, its partial last
  page copied: copy-on-extend, the copies batched into one ``flush_copies`` per step);
- ``release`` an item's pages (preemption, or its pages requeued), ``finish`` a sequence (and drop its
  reference on its prefix), ``prefix_computed`` (a computed prefix keeps its pages while dependents
  remain), ``release_held_prefixes`` (computed prefixes nobody runs under give their pages back);
- the prefix-cache hooks ``lookup`` / ``on_scheduled``, which do nothing here: ``PrefixCachingKVManager``
  (``prefix_cache.py``, the fcfs-lru baseline) caches pages by content. ``lookup``'s result is opaque
  to the scheduler: it only hands it back to ``pages_to_admit`` and ``admit``.

Page lifetime of a ``SharedPrefix``: it holds its own reference on its pages until ``unfinished`` (its
member samples not finished plus extending prefixes not released) reaches zero after it is computed;
releasing it drops its reference on its outer prefix in turn.

Invariant (``check_integrity``, mini-sglang's): free + cached + in use == total; ``check_all_free``:
when the scheduler is idle every page is free again.
"""

from __future__ import annotations

from typing import Any

from batchllm.engine.kv_cache import KVCache, PagePool
from batchllm.engine.sequence import Schedulable, SharedPrefix


class KVManager:
    """Pages of the running items over one ``PagePool``, the K/V tensors of ``kv`` behind them."""

    def __init__(self, kv: KVCache):
        self.kv = kv
        self.page_size = kv.page_size
        self.pool = self._new_pool(kv.num_pages)
        self._copies: list[tuple[int, int]] = []  # (prefix page, member's own page) to copy before the forward
        self._held: dict[int, SharedPrefix] = {}  # computed prefixes whose pages are still held, by id

    def _new_pool(self, num_pages: int) -> PagePool:
        return PagePool(num_pages)

    # -- counts -------------------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    @property
    def num_free(self) -> int:
        """Pages an allocation can take now (cached-but-unreferenced pages included)."""
        return self.pool.num_free

    @property
    def pages_in_use(self) -> int:
        return self.pool.num_pages - self.pool.num_free

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def shared_pages(self, s: Schedulable) -> int:
        """Full pages ``s`` shares with the prefix it extends (0 without one): pages it does not allocate."""
        return s.prefix.length // self.page_size if s.prefix is not None else 0

    def chain_pages(self, s: Schedulable) -> int:
        """Pages ``s`` needs with its chain of prefixes (each level shares its outer level's full pages)."""
        own = self.pages_for(s.total_len) - self.shared_pages(s)
        return own if s.prefix is None else own + self.chain_pages(s.prefix)

    def pages_to_admit(self, s: Schedulable, hit: Any) -> int:
        """Free pages that admitting ``s`` (with ``lookup``'s ``hit``) and computing all it has takes."""
        return self.pages_for(s.total_len) - self.shared_pages(s)

    # -- prefix-cache hooks (none without a cache) ----------------------------------------------------
    def lookup(self, s: Schedulable) -> Any:
        """Cached pages a waiting item could start from, as an opaque result for ``pages_to_admit`` and
        ``admit``; None: no cache, or nothing to look up."""
        return None

    def on_scheduled(self, s: Schedulable, num_computed: int) -> None:
        """``s``'s tokens up to ``num_computed`` are in the step being built (their K/V is stored by the
        time anyone reads it)."""

    # -- page operations ----------------------------------------------------------------------------
    def grow(self, s: Schedulable, upto_tokens: int) -> bool:
        """Make ``s``'s pages cover ``upto_tokens`` tokens; False if the pool is short (nothing allocated)."""
        need = self.pages_for(upto_tokens) - len(s.pages)
        if need <= 0:
            return True
        if not self.pool.can_allocate(need):
            return False
        s.pages.extend(self.pool.allocate(need))
        return True

    def admit(self, s: Schedulable, hit: Any) -> None:
        """``s`` starts: after its prefix (``_attach``) when it extends one; ``num_computed`` and
        ``num_cached`` count the tokens it starts with."""
        if s.prefix is not None:
            self._attach(s, s.prefix)

    def _attach(self, s: Schedulable, p: SharedPrefix) -> None:
        """Start ``s`` after its prefix ``p``: p's full pages shared, its partial last page copied (in
        ``flush_copies``, before the forward pass): s writes its own tokens after the prefix."""
        full = p.length // self.page_size
        shared = p.pages[:full]
        self.pool.share(shared)
        s.pages = list(shared)
        if p.length % self.page_size:
            (own,) = self.pool.allocate(1)
            self._copies.append((p.pages[full], own))
            s.pages.append(own)
        s.num_computed = p.length
        s.num_cached = p.length

    def flush_copies(self) -> None:
        """Copy the partial prefix pages of the items admitted since the last call: one batched copy per
        layer, before the step's forward pass."""
        if self._copies:
            self.kv.copy_pages([a for a, _ in self._copies], [b for _, b in self._copies])
            self._copies = []

    def release(self, s: Schedulable) -> None:
        """Drop ``s``'s references on its pages (it is preempted, finished, or its prefix pages are done)."""
        self.pool.release(s.pages)
        s.pages = []

    def finish(self, s: Schedulable) -> None:
        """A sequence is done: free its pages, then its prefix's when it was the prefix's last dependent."""
        self.release(s)
        if s.prefix is not None:
            self._drop_dependent(s.prefix)

    def prefix_computed(self, p: SharedPrefix) -> None:
        """``p``'s last token is computed: its pages stay for its dependents, or go now if none is left."""
        if p.unfinished == 0:
            self._release_prefix(p)
        else:
            self._held[id(p)] = p

    def _drop_dependent(self, p: SharedPrefix) -> None:
        p.unfinished -= 1
        if p.unfinished == 0 and p.ready:
            self._release_prefix(p)

    def _release_prefix(self, p: SharedPrefix) -> None:
        """``p`` is computed and has no dependents left: free its pages; it no longer holds its outer prefix."""
        self.release(p)
        self._held.pop(id(p), None)
        if p.prefix is not None:
            self._drop_dependent(p.prefix)

    def release_held_prefixes(self) -> list[SharedPrefix]:
        """Release every computed prefix still holding pages, innermost first; returns them in that order.

        For a stalled scheduler: nothing runs and the queue's head does not fit, so these pages belong to
        prefixes whose members were all preempted. Their ``unfinished`` counts stay: they are computed
        again when their group's turn comes."""

        def depth(p: SharedPrefix) -> int:
            return 0 if p.prefix is None else 1 + depth(p.prefix)

        held = sorted(self._held.values(), key=depth, reverse=True)
        for p in held:
            self.release(p)
        self._held.clear()
        return held

    # -- integrity ----------------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """The pool's bookkeeping is consistent (free + cached + in use == total); RuntimeError if not."""
        self.pool.check_integrity()

    def check_all_free(self) -> None:
        """Nothing runs: every page must be free again (cached pages count as free: evictable)."""
        self.check_integrity()
        if self.pool.num_free != self.pool.num_pages:
            raise RuntimeError(f"page leak: {self.pool.num_pages - self.pool.num_free} pages still referenced")
