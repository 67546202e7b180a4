"""Step packing: which tokens of which sequences go into the next forward pass.

Each step spends one token budget (``max_num_batched_tokens``), Sarathi-style:

1. running decodes first (one token each), in admission order, so decodes piggyback on prefill compute;
2. then unfinished prefill chunks of running sequences (and of shared prefixes being computed);
3. then new admissions from the waiting queue, in plan order, while KV memory allows.

Admission is bounded by KV memory, not by a sequence count (BatchLLM's memory-centric token batching):
a waiting sequence is admitted when the pages for its whole pending prompt fit now and the projected
peak of KV memory, with every running sequence growing to its expected output length and freeing its
pages when it ends, still fits the pool (``admission.projected_peak_pages``). ``max_num_seqs`` is an
optional cap (the streaming baseline uses 256, as vLLM does). When a running decode cannot get a page,
the most recently admitted sequence is preempted by recomputation: its pages are released (a shared
prefix stays shared) and it goes back to the front of the queue.

Shared prefixes (``SharedPrefix``) are scheduled like prefill-only sequences: the plan puts a group's
prefix right before its members in the queue; a member is admitted once its prefix is fully computed,
or, when the prefix ends on a page boundary, in the step that computes the prefix's last chunk (each
layer stores the step's K/V before it attends, as for vLLM's same-step cache hits), so the group's
prefill does not wait a step for its prefix. A member starts with the prefix's full pages shared plus
a private copy of the prefix's last partial page (which is why a prefix that ends inside a page must
be computed first: its copy is taken before the forward pass).
A prefix that extends an outer prefix (multi-level sharing) attaches to it the same way, as if it were
one of its members; the outer prefix is held until every prefix extending it has been released.

The scheduler touches KV memory only through its ``KVManager`` (``kv_manager.py``): page counts, grow,
release, attach, prefix lifetimes, and the prefix cache of the streaming baseline, whose hooks the plain
manager leaves empty.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterator

from batchllm.engine.admission import GrowthRow, OutputLengthEstimator, projected_peak_pages
from batchllm.engine.kv_manager import KVManager
from batchllm.engine.sequence import Schedulable, SeqStatus, SharedPrefix


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


@dataclasses.dataclass
class _Draft:
    """The step being built: what it holds so far and the token budget left."""

    budget: int
    items: list[Schedulable] = dataclasses.field(default_factory=list)
    num_tokens: list[int] = dataclasses.field(default_factory=list)
    taken: set[int] = dataclasses.field(default_factory=set)  # ids of its items: never preempted for it


class Scheduler:
    def __init__(self, kv_manager: KVManager, cfg: SchedulerConfig, source: Iterator[Schedulable]):
        self.kv_manager, self.cfg = kv_manager, cfg
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
        self._completing: set[int] = set()  # ids of items whose last pending token is in the step being built

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

    # -- the step ----------------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep | None:
        """The next step: running decodes, then running prefill chunks, then admissions, under one token
        budget. None when nothing can run (the engine treats that as a sequence that never fits)."""
        self._compact()
        self._completing.clear()
        draft = _Draft(self.cfg.max_num_batched_tokens)
        self._schedule_decodes(draft)
        num_decodes = len(draft.items)
        self._schedule_prefills(draft)
        self._schedule_admissions(draft)
        self.kv_manager.flush_copies()  # partial prefix pages of new members, before the forward pass
        if not draft.items:
            if not self.running and self._fits_alone(self._peek_waiting()) and self._requeue_held_prefixes():
                return self.schedule()
            return None
        self.peak_pages_in_use = max(self.peak_pages_in_use, self.kv_manager.pages_in_use)
        return ScheduledStep(draft.items, draft.num_tokens, num_decodes)

    def _schedule_decodes(self, draft: _Draft) -> None:
        """One token for each running sequence that decodes, in admission order."""
        i = 0
        while i < len(self.running) and draft.budget > 0:
            s = self.running[i]
            if _decodes(s):
                if not self._grow_or_preempt(s, s.total_len, draft):
                    break  # s itself was the latest admitted; everything after it is gone too
                self._take(draft, s, 1)
            i += 1

    def _schedule_prefills(self, draft: _Draft) -> None:
        """Prefill chunks of running items (sequences and shared prefixes being computed)."""
        for s in list(self.running):
            if draft.budget <= 0:
                break
            if id(s) in draft.taken or s.status is not SeqStatus.RUNNING or s.num_pending <= 0 or _decodes(s):
                continue  # taken, preempted meanwhile, or a decode that did not fit the budget
            q = min(s.num_pending, draft.budget)
            if self._grow_or_preempt(s, s.num_computed + q, draft):
                self._take(draft, s, q)

    def _schedule_admissions(self, draft: _Draft) -> None:
        """New items from the waiting queue, in plan order, while KV memory allows (``_can_admit``)."""
        rows = self._growth_rows() if self.cfg.growth_reserve > 0 else []  # built once per step
        while draft.budget > 0:
            s = self._peek_waiting()
            if s is None:
                break
            hit = self.kv_manager.lookup(s)
            row = self._can_admit(s, hit, rows)
            if row is None:
                break
            self.waiting.popleft()
            self._admit(s, hit)
            if row is not True:
                rows.append(row)
            q = min(s.num_pending, draft.budget)
            if not self.kv_manager.grow(s, s.num_computed + q):  # _can_admit checked the whole prompt fits
                raise RuntimeError("admission check passed but allocation failed")
            self._take(draft, s, q)

    def _take(self, draft: _Draft, s: Schedulable, q: int) -> None:
        """Put ``q`` tokens of ``s`` into the step."""
        draft.items.append(s)
        draft.num_tokens.append(q)
        draft.taken.add(id(s))
        draft.budget -= q
        if s.num_computed + q == s.total_len:
            self._completing.add(id(s))
        self.kv_manager.on_scheduled(s, s.num_computed + q)

    # -- memory ------------------------------------------------------------------------------------
    def _grow_or_preempt(self, s: Schedulable, upto_tokens: int, draft: _Draft) -> bool:
        """Grow s's pages, preempting the latest-admitted items not yet in this step as needed.

        Returns False when s could not grow: it was itself the latest candidate (and is now preempted),
        or every later item is already part of this step (s waits a step).
        """
        while not self.kv_manager.grow(s, upto_tokens):
            victim = next((v for v in reversed(self.running) if id(v) not in draft.taken), None)
            if victim is None:
                return False
            self._preempt(victim)
            if victim is s:
                return False
        return True

    def _preempt(self, victim: Schedulable) -> None:
        """Release victim's pages and put it back at the front of the queue, to be recomputed.

        A sequence's ``num_cached`` keeps the value of its first admission (as vLLM reports it)."""
        if self.running and self.running[-1] is victim:  # the usual case: the latest admitted
            self.running.pop()
        else:
            self.running.remove(victim)
        self.num_preemptions += 1
        if victim.generates:
            self._num_seqs_running -= 1
        self.kv_manager.release(victim)
        _send_back(victim)
        self.waiting.appendleft(victim)

    def _fits_alone(self, s: Schedulable | None) -> bool:
        """Whether ``s`` (with its prefixes) fits an otherwise empty pool: only then can freeing help."""
        return s is not None and self.kv_manager.chain_pages(s) <= self.kv_manager.num_pages

    def _requeue_held_prefixes(self) -> bool:
        """Nothing runs and the head of the queue does not fit: computed prefixes whose members are all
        waiting (they were preempted) hold pages nobody uses. Release them and queue each again right
        before its first waiting member, so it is recomputed when its group's turn comes. Returns
        whether any page was freed."""
        released = self.kv_manager.release_held_prefixes()
        # innermost first: an outer prefix then lands before the extending prefixes queued before it
        for p in released:
            _send_back(p)
            at = next((i for i, x in enumerate(self.waiting) if x.prefix is p), len(self.waiting))
            self.waiting.insert(at, p)
        return bool(released)

    def _growth_row(self, s: Schedulable, held_pages: int) -> GrowthRow:
        """The projection's row of a sequence holding ``held_pages`` pages (its prefix's full pages left out)."""
        shared = self.kv_manager.shared_pages(s)
        left = self.estimator.expected(s, self.cfg.max_model_len) - (s.total_len - s.prompt_len)
        remaining = max(1, int(left * self.cfg.growth_reserve + 0.999))
        return GrowthRow(held_pages - shared, s.total_len - shared * self.cfg.page_size, remaining)

    def _growth_rows(self) -> list[GrowthRow]:
        return [self._growth_row(x, len(x.pages)) for x in self.running if x.generates]

    def _projected_peak_pages(self, rows: list[GrowthRow], extra_pages: int = 0) -> int:
        """Peak pages in use as the sequences of ``rows`` grow and finish (``projected_peak_pages``), with
        ``extra_pages`` about to be allocated now."""
        used = self.kv_manager.pages_in_use + extra_pages
        if self.cfg.growth_reserve <= 0:
            return used
        return projected_peak_pages(rows, used, self.cfg.page_size)

    # -- admission ---------------------------------------------------------------------------------
    def _can_admit(self, s: Schedulable, hit, rows: list[GrowthRow]) -> GrowthRow | bool | None:
        """None if ``s`` cannot start now; else True, or the projection row to add for an admitted sequence.

        Memory-centric admission: its pages must fit now, and the projected peak of KV memory with it
        (``_projected_peak_pages``) must fit the pool. Idle, anything that fits now starts.
        """
        if s.prefix is not None and not self._available(s.prefix):
            return None  # the prefix it extends is still being computed (or waiting)
        if s.generates and self.cfg.max_num_seqs is not None and self._num_seqs_running >= self.cfg.max_num_seqs:
            return None
        need = self.kv_manager.pages_to_admit(s, hit)
        row: GrowthRow | bool = True
        if s.generates and self.cfg.growth_reserve > 0:
            row = self._growth_row(s, need + self.kv_manager.shared_pages(s))
        if self.kv_manager.num_free < need:
            return None
        if not self.running or self.cfg.growth_reserve <= 0:
            return row
        candidate = rows + [row] if row is not True else rows
        return row if self._projected_peak_pages(candidate, need) <= self.kv_manager.num_pages else None

    def _admit(self, s: Schedulable, hit) -> None:
        s.status = SeqStatus.RUNNING
        self.running.append(s)
        if s.generates:
            self._num_seqs_running += 1
        self.kv_manager.admit(s, hit)

    def _available(self, p: SharedPrefix) -> bool:
        """Whether dependents of ``p`` may start now: it is computed, or it ends on a page boundary and
        its last chunk is in this step (then they share only full pages, all filled by this forward)."""
        return p.ready or (id(p) in self._completing and p.length % self.cfg.page_size == 0)

    # -- after the forward pass --------------------------------------------------------------------
    def advance(self, step: ScheduledStep) -> None:
        """Record that the step's tokens are now in the cache; completed prefixes leave the running list."""
        for item, q in zip(step.items, step.num_tokens):
            # prompt tokens computed (recomputation after preemption counts)
            self.prompt_tokens_computed += max(0, min(item.num_computed + q, item.prompt_len) - item.num_computed)
            item.num_computed += q
            if not item.generates and item.num_pending == 0:
                item.status = SeqStatus.FINISHED  # computed; leaves running, pages held until its dependents are done
                self._stale = True
                self.kv_manager.prefix_computed(item)

    def finish(self, s: Schedulable) -> None:
        """A sequence is done: free its pages, and its prefix's when it was the prefix's last dependent."""
        if s.status is SeqStatus.RUNNING:
            self._num_seqs_running -= 1
            self._stale = True  # removed from running at the next compaction
        s.status = SeqStatus.FINISHED
        self.kv_manager.finish(s)
        self.estimator.observe(s.total_len - s.prompt_len)

    def check_idle_integrity(self) -> None:
        """When all work is done, every page must be free again (cached pages count as free: evictable)."""
        self._compact()
        if self.running or self.waiting:
            raise RuntimeError("scheduler not idle")
        self.kv_manager.check_all_free()


def _decodes(s: Schedulable) -> bool:
    """Whether ``s`` computes one token and samples: a decode (or a prompt's last token)."""
    return s.generates and s.num_pending == 1


def _send_back(s: Schedulable) -> None:
    """``s`` (its pages released) waits again with nothing computed, to be recomputed."""
    s.status = SeqStatus.WAITING
    s.num_computed = 0
    s.num_preemptions += 1
