"""Cost-balanced assignment of whole prefix groups to replicas, work units, and the work queue.

Pure numpy / Python, no Ray: the driver (``driver.py``) uses these, and the tests check them alone.

Contracts:
- A prefix group is never split: its shared prefix is computed once, on one replica, so the plan's
  saving survives scale-out. Every function here moves group indices (positions in ``Plan.groups``),
  never requests.
- Cost of a group (``group_costs``): the prompt tokens the engine computes for it (the shared prefix
  once when two or more samples share it, plus each sample's own tokens) plus its expected output
  tokens (``max_tokens`` per sample, weighted by ``output_weight``). Groups are the plan's final
  execution groups (a lone request with ``n > 1`` already has its prompt but the last token as its
  prefix). Outer prefixes (computed once per replica for neighbouring groups) are not modelled: the
  estimate errs high for groups under one.
- ``balance``: longest-processing-time-first (LPT) greedy, each group to the least loaded replica; the
  heaviest load is at most 4/3 of the optimum (Graham). Each replica's groups come back in plan order,
  so the decode-heavy-first ordering of the plan holds on every replica.
- ``make_units``: a replica's groups in consecutive chunks (work units), each at most ``max_cost`` and
  ``max_rows`` output rows unless one group alone is bigger. A unit is what one replica call runs and
  what one shard commits, so it bounds both the work lost to a crash and the granularity of stealing.
- ``WorkQueue``: per-replica queues of units; a replica runs its own units first, then steals the last
  unit of the replica with the most queued cost; a failed replica's units (and the one it was running)
  go to the least loaded live replicas. A unit that failed (``requeue``) goes to the head of the least
  loaded live replica it has not failed on yet (any live replica when it failed on all), and is never
  stolen by a replica it failed on: a retry runs soon, and elsewhere when there is an elsewhere.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Sequence

import numpy as np


def group_costs(
    group_members: Sequence[np.ndarray],
    prefix_lens: Sequence[int],
    prompt_lens: np.ndarray,
    samples: np.ndarray,
    max_tokens: np.ndarray,
    output_weight: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per group: (estimated cost, output rows). ``group_members[g]``: request indices of group ``g``;
    ``prompt_lens`` / ``samples`` (n) / ``max_tokens`` are indexed by request."""
    G = len(group_members)
    if G == 0:
        return np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.int64)
    sizes = np.fromiter((len(m) for m in group_members), dtype=np.int64, count=G)
    if np.any(sizes == 0):
        raise ValueError("a prefix group has no member")
    members = np.concatenate([np.asarray(m, dtype=np.int64) for m in group_members])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    lens = np.asarray(prompt_lens, dtype=np.int64)[members]
    n = np.asarray(samples, dtype=np.int64)[members]
    mt = np.asarray(max_tokens, dtype=np.float64)[members]
    rows = np.add.reduceat(n, starts)
    plen = np.asarray(prefix_lens, dtype=np.int64)
    shared = np.where((plen > 0) & (rows > 1), plen, 0)
    own = np.add.reduceat(n * (lens - np.repeat(shared, sizes)), starts)
    output = np.add.reduceat(n * mt, starts)
    return (shared + own).astype(np.float64) + output_weight * output, rows


def balance(costs: np.ndarray, num_replicas: int) -> list[np.ndarray]:
    """LPT: each group, heaviest first, to the replica with the least cost so far. Returns, per replica,
    its group indices in ascending (plan) order. Deterministic: ties go to the lower replica index."""
    if num_replicas < 1:
        raise ValueError("num_replicas must be at least 1")
    costs = np.asarray(costs, dtype=np.float64)
    owner = np.empty(len(costs), dtype=np.int64)
    heap = [(0.0, r) for r in range(num_replicas)]
    for g in np.argsort(-costs, kind="stable").tolist():
        load, r = heapq.heappop(heap)
        owner[g] = r
        heapq.heappush(heap, (load + float(costs[g]), r))
    return [np.flatnonzero(owner == r) for r in range(num_replicas)]


def make_units(group_ids: np.ndarray, costs: np.ndarray, rows: np.ndarray, max_cost: float, max_rows: int) -> list[np.ndarray]:
    """Cut ``group_ids`` (in order) into consecutive chunks of at most ``max_cost`` and ``max_rows``;
    a group bigger than either limit is a chunk of its own."""
    units: list[np.ndarray] = []
    start, cost, nrows = 0, 0.0, 0
    ids = np.asarray(group_ids, dtype=np.int64)
    for k, g in enumerate(ids.tolist()):
        c, r = float(costs[g]), int(rows[g])
        if k > start and (cost + c > max_cost or nrows + r > max_rows):
            units.append(ids[start:k])
            start, cost, nrows = k, 0.0, 0
        cost += c
        nrows += r
    if start < len(ids):
        units.append(ids[start:])
    return units


class WorkQueue:
    """Which unit each replica runs next. Units are arrays of group indices; ``cost_of(unit)`` their cost."""

    def __init__(self, per_replica: list[list[np.ndarray]], costs: np.ndarray):
        self.costs = np.asarray(costs, dtype=np.float64)
        self.queues: dict[int, deque[np.ndarray]] = {r: deque(units) for r, units in enumerate(per_replica)}
        self.steals = 0
        self.failed_on: dict[tuple[int, int], set[int]] = {}  # unit key -> replicas it failed on

    @staticmethod
    def key(unit: np.ndarray) -> tuple[int, int]:
        """A unit's identity: groups are consecutive runs of one replica's share, never in two live units."""
        return int(unit[0]), len(unit)

    def cost_of(self, unit: np.ndarray) -> float:
        return float(self.costs[unit].sum())

    def queued_cost(self, replica: int) -> float:
        return sum(self.cost_of(u) for u in self.queues.get(replica, ()))

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def next_for(self, replica: int) -> np.ndarray | None:
        """The replica's next unit: its own queue's head, else the tail of the most loaded queue (work
        stealing: the tail is the work its owner would reach last)."""
        q = self.queues.get(replica)
        if q:
            return q.popleft()
        victims = sorted((r for r, other in self.queues.items() if other and r != replica),
                         key=lambda r: (-self.queued_cost(r), r))
        for victim in victims:
            q = self.queues[victim]
            for k in range(len(q) - 1, -1, -1):  # from the tail: the work its owner would reach last
                if replica not in self.failed_on.get(self.key(q[k]), ()):
                    unit = q[k]
                    del q[k]
                    self.steals += 1
                    return unit
        return None

    def requeue(self, units: list[np.ndarray], failed_on: int, parent: np.ndarray | None = None) -> list[int]:
        """Units that failed on replica ``failed_on`` (``parent``: the failed unit they were cut from, whose
        history they inherit) go back: each to the head of the live replica with the least queued cost
        among those it has not failed on, else of the least loaded live one. Returns the chosen replicas."""
        if not self.queues:
            raise RuntimeError("no live replica left to take the work")
        inherited = self.failed_on.get(self.key(parent), set()) if parent is not None else set()
        chosen = []
        for unit in units:
            seen = self.failed_on.setdefault(self.key(unit), set())
            seen |= inherited | {failed_on}
            candidates = [r for r in self.queues if r not in seen] or list(self.queues)
            r = min(candidates, key=lambda k: (self.queued_cost(k), k))
            self.queues[r].appendleft(unit)
            chosen.append(r)
        return chosen

    def remove_replica(self, replica: int, running: list[np.ndarray] = ()) -> None:
        """A replica failed: its queued units and ``running`` (the units it had not finished) go to the
        live replicas, each unit (heaviest first) to the one with the least queued cost among those it has
        not failed on (any live one if it failed on all)."""
        orphans = list(running) + list(self.queues.pop(replica, ()))
        if not self.queues:
            raise RuntimeError("no live replica left to take the work")
        loads = {r: self.queued_cost(r) for r in self.queues}
        for unit in sorted(orphans, key=self.cost_of, reverse=True):
            seen = self.failed_on.get(self.key(unit), ())
            r = min([k for k in loads if k not in seen] or loads, key=lambda k: (loads[k], k))
            self.queues[r].append(unit)
            loads[r] += self.cost_of(unit)

    def replicas(self) -> list[int]:
        return list(self.queues)
