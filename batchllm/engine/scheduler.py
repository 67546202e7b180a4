"""Step packing: which tokens of which sequences go into the next forward pass.

Each step spends one token budget (``max_num_batched_tokens``), Sarathi-style:

1. running decodes first (one token each), in admission order, so decodes piggyback on prefill compute;
2. then unfinished prefill chunks of running sequences (and of shared prefixes being computed);
3. then new admissions from the waiting queue, in plan order, while KV memory allows.

Admission is bounded by KV memory, not by a sequence count (BatchLLM's memory-centric token batching):
a waiting sequence is admitted when the pages for its whole pending prompt fit now and the projected
peak of KV memory, with every running sequence growing to its expected output length and freeing its
pages when it ends, still fits the pool (``_projected_peak_pages``). ``max_num_seqs`` is an optional
cap (the streaming baseline uses 256, as vLLM does). When a running decode cannot get a page, the most
recently admitted sequence is preempted by recomputation: its pages are released (a shared prefix stays
shared) and it goes back to the front of the queue.

Shared prefixes (``SharedPrefix``) are scheduled like prefill-only sequences: the plan puts a group's
prefix right before its members in the queue; a member is admitted once its prefix is fully computed,
or, when the prefix ends on a page boundary, in the step that computes the prefix's last chunk (each
layer stores the step's K/V before it attends, as for vLLM's same-step cache hits), so the group's
prefill does not wait a step for its prefix. A member starts with the prefix's full pages shared plus
a private copy of the prefix's last partial page (which is why a prefix that ends inside a page must
be computed first: its copy is taken before the forward pass).
A prefix that extends an outer prefix (multi-level sharing) attaches to it the same way, as if it were
one of its members; the outer prefix is held until every prefix extending it has been released.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterator, Union

import numpy as np

from batchllm.engine.kv_cache import KVCache, PagePool
from batchllm.engine.prefix_cache import PrefixCachingPool
from batchllm.engine.sequence import Sequence, SeqStatus, SharedPrefix

Schedulable = Union[Sequence, SharedPrefix]

# Above this many (breakpoint x sequence) cells the projected peak uses an O(n log n) bound instead.
_EXACT_PEAK_CELLS = 200_000


@dataclasses.dataclass
class SchedulerConfig:
    page_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int | None = None  # None: bounded by KV memory only
    max_model_len: int = 4096
    # Fraction of running sequences' expected KV growth kept free before admitting more. 1.0 never
    # preempts when outputs reach their expected length; lower values admit more and preempt on misses.
    growth_reserve: float = 1.0


@dataclasses.dataclass
class ScheduledStep:
    """The sequences of one step, decodes first, and how many tokens of each the step computes."""

    items: list[Schedulable]
    num_tokens: list[int]
    num_decodes: int

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


class OutputLengthEstimator:
    """Expected output length of a sequence, for the memory reserve.

    Requests that ignore EOS run to max_tokens exactly. Others are estimated from the outputs finished so
    far in this job (mean x 1.5, capped by max_tokens); before any finishes, half of max_tokens.
    """

    def __init__(self) -> None:
        self._sum = 0
        self._count = 0

    def observe(self, completion_tokens: int) -> None:
        self._sum += completion_tokens
        self._count += 1

    def expected(self, seq: Sequence, max_model_len: int) -> int:
        """Expected total output tokens of ``seq``; never more than its context leaves room for."""
        mx = min(seq.params.max_tokens, max(1, max_model_len - seq.prompt_len))
        if seq.params.ignore_eos:
            return mx
        if self._count == 0:
            return max(1, mx // 2)
        return max(1, min(mx, int(1.5 * self._sum / self._count) + 1))


class Scheduler:
    def __init__(self, pool: PagePool, kv: KVCache, cfg: SchedulerConfig, source: Iterator[Schedulable]):
        self.pool, self.kv, self.cfg = pool, kv, cfg
        self._source = source
        self._source_done = False
        self.waiting: collections.deque[Schedulable] = collections.deque()
        self.running: list[Schedulable] = []  # admission order
        self.estimator = OutputLengthEstimator()
        self.num_preemptions = 0
        self.prompt_tokens_computed = 0  # for the achieved prefill saving
        self.peak_pages_in_use = 0  # most pages referenced at once (peak KV memory)
        self._num_seqs_running = 0
        self._stale = False  # running holds finished items / completed prefixes: compact before use
        self._held_prefixes: dict[int, SharedPrefix] = {}  # computed prefixes whose pages are still held
        self._copies: list[tuple[int, int]] = []  # partial prefix pages to copy before the next forward
        self._completing: set[int] = set()  # ids of prefixes whose last chunk is in the step being built

    # -- queue -------------------------------------------------------------------------------------
    def _peek_waiting(self) -> Schedulable | None:
        if not self.waiting and not self._source_done:
            nxt = next(self._source, None)
            if nxt is None:
                self._source_done = True
            else:
                self.waiting.append(nxt)
        return self.waiting[0] if self.waiting else None

    def has_work(self) -> bool:
        self._compact()
        return bool(self.running) or self._peek_waiting() is not None

    def _compact(self) -> None:
        """Drop finished sequences and completed prefixes from ``running`` in one pass (not one
        list.remove each: with thousands running that would be quadratic)."""
        if self._stale:
            self.running = [x for x in self.running if x.status is SeqStatus.RUNNING]
            self._stale = False

    # -- memory ------------------------------------------------------------------------------------
    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.cfg.page_size)

    def _shared_pages(self, s: Schedulable) -> int:
        """Full pages ``s`` shares with the prefix it extends (0 without one): pages it does not allocate."""
        return s.prefix.length // self.cfg.page_size if s.prefix is not None else 0

    def _growth_row(self, x: Sequence, held_pages: int) -> tuple[float, float, float]:
        """(pages held, tokens, expected remaining tokens) of a sequence for the projection, not counting
        the full pages it shares with its group's prefix (those stay until the whole group ends)."""
        shared = self._shared_pages(x)
        left = self.estimator.expected(x, self.cfg.max_model_len) - len(x.output_ids)
        remaining = max(1, int(left * self.cfg.growth_reserve + 0.999))
        return held_pages - shared, x.total_len - shared * self.cfg.page_size, remaining

    def _growth_rows(self) -> list[tuple[float, float, float]]:
        return [self._growth_row(x, len(x.pages)) for x in self.running if isinstance(x, Sequence)]

    def _projected_peak_pages(self, rows: list[tuple[float, float, float]], extra_pages: int = 0) -> int:
        """Peak pages in use if nothing else is admitted and every sequence in ``rows`` (running ones,
        plus a candidate) grows to its expected length, then frees its pages; ``extra_pages`` are about
        to be allocated now.

        Sequences finish at different times, so the peak is far below "everyone at their maximum at
        once": at ``t`` steps from now, sequence i holds ``ceil((len_i + t) / page)`` pages while
        ``t <= r_i`` (its expected remaining tokens) and none after. The peak is reached at one of the
        ``r_i``: computed exactly there when that is cheap, else through the bound
        ``ceil(x / page) <= (x + page - 1) / page``, O(n log n) after a sort. Shared-prefix pages count as
        held throughout.
        """
        used = self.pool.num_pages - self.pool.num_free + extra_pages
        if not rows or self.cfg.growth_reserve <= 0:
            return used
        ps = self.cfg.page_size
        held, length, remaining = (np.asarray(c, dtype=np.float64) for c in zip(*rows))
        n = len(held)
        breakpoints = np.unique(remaining)
        if len(breakpoints) * n <= _EXACT_PEAK_CELLS:
            t = breakpoints[:, None]
            pages_at = np.where(remaining[None, :] >= t, np.ceil((length[None, :] + t) / ps), 0.0)
            growth = (pages_at - held[None, :]).sum(axis=1)
        else:  # at t = r[k] (sorted) sequences k.. still hold their pages, ..k-1 have freed theirs
            order = np.argsort(remaining)
            r, held, length = remaining[order], held[order], length[order]
            still = np.cumsum(((length + ps - 1) / ps - held)[::-1])[::-1]
            freed = np.concatenate([[0.0], np.cumsum(held)[:-1]])
            growth = still + np.arange(n, 0, -1) * r / ps - freed
        return used + max(0, int(np.ceil(growth.max() - 1e-9)))

    def _grow(self, item: Schedulable, upto_tokens: int) -> bool:
        """Make item's pages cover ``upto_tokens`` tokens; False if the pool is short (nothing allocated)."""
        need = self._pages_for(upto_tokens) - len(item.pages)
        if need <= 0:
            return True
        if not self.pool.can_allocate(need):
            return False
        item.pages.extend(self.pool.allocate(need))
        return True

    def _preempt(self, victim: Schedulable) -> None:
        """Release victim's pages and put it back at the front of the queue, to be recomputed.

        ``num_cached`` keeps the value of the first admission (as vLLM reports it)."""
        if self.running and self.running[-1] is victim:  # the usual case: the latest admitted
            self.running.pop()
        else:
            self.running.remove(victim)
        self.num_preemptions += 1
        self.pool.release(victim.pages)
        victim.pages = []
        victim.status = SeqStatus.WAITING
        victim.num_computed = 0
        if isinstance(victim, Sequence):
            self._num_seqs_running -= 1
            victim.page_hashes = []
            victim.num_preemptions += 1
        self.waiting.appendleft(victim)

    def _chain_pages(self, s: Schedulable) -> int:
        """Pages ``s`` needs with its chain of prefixes (each level shares its outer level's full pages)."""
        length = s.length if isinstance(s, SharedPrefix) else s.total_len
        if s.prefix is None:
            return self._pages_for(length)
        return self._chain_pages(s.prefix) + self._pages_for(length) - self._shared_pages(s)

    def _fits_alone(self, s: Schedulable | None) -> bool:
        """Whether ``s`` (with its prefixes) fits an otherwise empty pool: only then can freeing help."""
        return s is not None and self._chain_pages(s) <= self.pool.num_pages

    def _requeue_held_prefixes(self) -> bool:
        """Nothing runs and the head of the queue does not fit: computed prefixes whose members are all
        waiting (they were preempted) hold pages nobody uses. Release them and queue each again right
        before its first waiting member, so it is recomputed when its group's turn comes. Returns
        whether any page was freed."""
        if not self._held_prefixes:
            return False

        def depth(p: SharedPrefix) -> int:
            return 0 if p.prefix is None else 1 + depth(p.prefix)

        # innermost first: an outer prefix then lands before the extending prefixes queued before it
        for p in sorted(self._held_prefixes.values(), key=depth, reverse=True):
            self.pool.release(p.pages)
            p.pages = []
            p.num_computed = 0
            p.status = SeqStatus.WAITING
            at = next((i for i, x in enumerate(self.waiting) if x.prefix is p), len(self.waiting))
            self.waiting.insert(at, p)
        self._held_prefixes.clear()
        return True

    def _grow_or_preempt(self, item: Schedulable, upto_tokens: int, scheduled: set[int]) -> bool:
        """Grow item's pages, preempting the latest-admitted items not yet in this step as needed.

        Returns False when the item could not grow: it was itself the latest candidate (and is now
        preempted), or every later item is already part of this step (the item waits a step).
        """
        while not self._grow(item, upto_tokens):
            victim = next((v for v in reversed(self.running) if id(v) not in scheduled), None)
            if victim is None:
                return False
            self._preempt(victim)
            if victim is item:
                return False
        return True

    # -- the step ----------------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep | None:
        self._compact()
        budget = self.cfg.max_num_batched_tokens
        items: list[Schedulable] = []
        counts: list[int] = []
        scheduled: set[int] = set()
        self._completing.clear()

        # 1. decodes
        i = 0
        while i < len(self.running) and budget > 0:
            s = self.running[i]
            if isinstance(s, Sequence) and s.num_pending == 1:
                if not self._grow_or_preempt(s, s.total_len, scheduled):
                    break  # s itself was the latest admitted; everything after it is gone too
                self._take(items, counts, s, 1)
                scheduled.add(id(s))
                budget -= 1
            i += 1
        num_decodes = len(items)

        # 2. prefill chunks of running items
        for s in list(self.running):
            if budget <= 0:
                break
            if id(s) in scheduled or s.status is not SeqStatus.RUNNING or s.num_pending <= 0:
                continue
            if isinstance(s, Sequence) and s.num_pending == 1:
                continue  # a decode that did not fit the budget
            q = min(s.num_pending, budget)
            if not self._grow_or_preempt(s, s.num_computed + q, scheduled):
                continue
            self._take(items, counts, s, q)
            scheduled.add(id(s))
            budget -= q

        # 3. admissions
        rows = self._growth_rows() if self.cfg.growth_reserve > 0 else []  # built once per step
        while budget > 0:
            s = self._peek_waiting()
            if s is None:
                break
            hit = self._cache_lookup(s)
            row = self._can_admit(s, hit, rows)
            if row is None:
                break
            self.waiting.popleft()
            self._admit(s, hit)
            if row is not True:
                rows.append(row)
            q = min(s.num_pending, budget)
            if not self._grow(s, s.num_computed + q):  # _can_admit checked the whole prompt fits
                raise RuntimeError("admission check passed but allocation failed")
            self._take(items, counts, s, q)
            budget -= q

        if self._copies:  # partial prefix pages of new members, one batched copy per layer
            self.kv.copy_pages([a for a, _ in self._copies], [b for _, b in self._copies])
            self._copies = []
        if not items:
            if not self.running and self._fits_alone(self._peek_waiting()) and self._requeue_held_prefixes():
                return self.schedule()
            return None
        self.peak_pages_in_use = max(self.peak_pages_in_use, self.pool.num_pages - self.pool.num_free)
        return ScheduledStep(items, counts, num_decodes)

    def _take(self, items: list[Schedulable], counts: list[int], s: Schedulable, q: int) -> None:
        """Put ``q`` tokens of ``s`` into the step. With a prefix-caching pool its full pages up to
        ``num_computed + q`` are registered now, at scheduling time, as vLLM v1 does: a request admitted
        later in the same step already hits them (each layer stores the step's K/V before attending, so
        the pages are filled by the time anyone reads them)."""
        items.append(s)
        counts.append(q)
        if isinstance(s, SharedPrefix) and s.num_computed + q == s.length:
            self._completing.add(id(s))
        if isinstance(s, Sequence) and isinstance(self.pool, PrefixCachingPool):
            self.pool.register(s.pages, s.page_hashes, s.token_slice, s.num_computed + q)

    def _cache_lookup(self, s: Schedulable) -> tuple[list[int], list[bytes]] | None:
        """With a prefix-caching pool (streaming baseline): the cached pages a new sequence can reuse."""
        if not isinstance(self.pool, PrefixCachingPool) or not isinstance(s, Sequence) or s.prefix is not None:
            return None
        limit = s.total_len - 1  # the last token is always computed: it yields the logits
        return self.pool.lookup(s.token_slice(0, limit), limit)

    def _can_admit(self, s: Schedulable, hit, rows: list[tuple[float, float, float]]):
        """None if ``s`` cannot start now; else True, or the projection row to add for an admitted sequence.

        Memory-centric admission: its pages must fit now, and the projected peak of KV memory with it
        (``_projected_peak_pages``) must fit the pool. Idle, anything that fits now starts.
        """
        row = True
        if isinstance(s, Sequence):
            if s.prefix is not None and not self._available(s.prefix):
                return None  # its prefix is still being computed (or waiting)
            if self.cfg.max_num_seqs is not None and self._num_seqs_running >= self.cfg.max_num_seqs:
                return None
            shared = self._shared_pages(s)
            need = self._pages_for(s.total_len) - shared
            if hit is not None:  # reused pages need no allocation, but reviving evictable ones uses free slots
                need += self.pool.num_evictable(hit[0]) - len(hit[0])
            if self.cfg.growth_reserve > 0:
                row = self._growth_row(s, need + shared)
        else:
            if s.prefix is not None and not self._available(s.prefix):
                return None  # the outer prefix it extends is still being computed (or waiting)
            need = self._pages_for(s.length) - self._shared_pages(s)
        if self.pool.num_free < need:
            return None
        if not self.running or self.cfg.growth_reserve <= 0:
            return row
        candidate = rows + [row] if row is not True else rows
        return row if self._projected_peak_pages(candidate, need) <= self.pool.num_pages else None

    def _admit(self, s: Schedulable, hit: tuple[list[int], list[bytes]] | None = None) -> None:
        s.status = SeqStatus.RUNNING
        self.running.append(s)
        if not isinstance(s, Sequence):
            if s.prefix is not None:
                self._attach(s, s.prefix)
            return
        self._num_seqs_running += 1
        first = s.num_preemptions == 0
        if hit is not None and hit[0]:
            self.pool.share(hit[0])
            s.pages = list(hit[0])
            s.page_hashes = list(hit[1])
            s.num_computed = len(hit[0]) * self.cfg.page_size
            if first:
                s.num_cached = min(s.num_computed, s.prompt_len)
        if s.prefix is not None:
            self._attach(s, s.prefix)
            s.num_cached = s.prefix.length

    def _available(self, p: SharedPrefix) -> bool:
        """Whether dependents of ``p`` may start now: it is computed, or it ends on a page boundary and
        its last chunk is in this step (then they share only full pages, all filled by this forward)."""
        return p.ready or (id(p) in self._completing and p.length % self.cfg.page_size == 0)

    def _attach(self, s: Schedulable, p: SharedPrefix) -> None:
        """Start ``s`` after its prefix ``p`` (``_available``): p's full pages shared, its partial last
        page copied."""
        full = p.length // self.cfg.page_size
        shared = p.pages[:full]
        self.pool.share(shared)
        s.pages = list(shared)
        if p.length % self.cfg.page_size:
            # the partial last page is copied (batched at the end of schedule()): s writes its own
            # tokens after the prefix
            (own,) = self.pool.allocate(1)
            self._copies.append((p.pages[full], own))
            s.pages.append(own)
        s.num_computed = p.length

    # -- after the forward pass --------------------------------------------------------------------
    def advance(self, step: ScheduledStep) -> None:
        """Record that the step's tokens are now in the cache; completed prefixes leave the running list."""
        for item, q in zip(step.items, step.num_tokens):
            if isinstance(item, Sequence):  # prompt tokens computed (recomputation after preemption counts)
                self.prompt_tokens_computed += max(0, min(item.num_computed + q, item.prompt_len) - item.num_computed)
            else:
                self.prompt_tokens_computed += q
            item.num_computed += q
            if isinstance(item, SharedPrefix) and item.ready:
                item.status = SeqStatus.FINISHED  # computed; leaves running, pages held until its members finish
                self._stale = True
                if item.unfinished == 0:
                    self._release_prefix(item)
                else:
                    self._held_prefixes[id(item)] = item

    def finish(self, s: Sequence) -> None:
        """A sequence is done: free its pages, and its prefix's when it was the prefix's last member."""
        if s.status is SeqStatus.RUNNING:
            self._num_seqs_running -= 1
            self._stale = True  # removed from running at the next compaction
        s.status = SeqStatus.FINISHED
        self.pool.release(s.pages)
        s.pages = []
        self.estimator.observe(len(s.output_ids))
        if s.prefix is not None:
            s.prefix.unfinished -= 1
            if s.prefix.unfinished == 0 and s.prefix.ready:
                self._release_prefix(s.prefix)

    def _release_prefix(self, p: SharedPrefix) -> None:
        """p is computed and has no dependents left: free its pages; it no longer holds its outer prefix."""
        self.pool.release(p.pages)
        p.pages = []
        self._held_prefixes.pop(id(p), None)
        outer = p.prefix
        if outer is not None:
            outer.unfinished -= 1
            if outer.unfinished == 0 and outer.ready:
                self._release_prefix(outer)

    def check_idle_integrity(self) -> None:
        """When all work is done, every page must be free again (cached pages count as free: evictable)."""
        self._compact()
        if self.running or self.waiting:
            raise RuntimeError("scheduler not idle")
        self.pool.check_integrity()
        if self.pool.num_free != self.pool.num_pages:
            raise RuntimeError(f"page leak: {self.pool.num_pages - self.pool.num_free} pages still referenced")
