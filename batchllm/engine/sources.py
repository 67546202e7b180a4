"""The engine's work, in plan order: shared prefixes and sequences built from a plan's groups.

``build_sources`` is the glue between the PLAN stage and the engine. It turns each group into a
``SharedPrefix`` (when more than one sample shares it) followed by its members' samples, and gives
neighbouring groups whose prefixes share a head an outer ``SharedPrefix`` that their prefixes extend
(``plan.nesting``: multi-level sharing). The same function serves one process and each Ray replica
(which gets a list of whole groups): the nesting is recomputed from the groups it is given.

Unit of work = one shared prefix and the samples below it: a group, or a request with ``n > 1``
samples that leaves its group because its samples can share its whole prompt but the last token.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np

from batchllm.engine.engine import derive_seed
from batchllm.engine.sequence import Sequence, SharedPrefix
from batchllm.io.requests import Request
from batchllm.plan.nesting import MIN_OUTER_TOKENS, nest
from batchllm.plan.plan import Plan, PrefixGroup


class _Unit(NamedTuple):
    prefix_len: int  # tokens its members' samples share (0: none)
    members: list[int]  # request indices
    samples: int  # sum of the members' n

    @property
    def has_prefix(self) -> bool:
        """Whether the unit computes a shared prefix of its own (two or more samples share it)."""
        return self.prefix_len > 0 and self.samples > 1


def build_sources(requests: list[Request], plan: Plan | None, eos: frozenset[int], job_seed: int,
                  page_size: int = 16) -> Iterator[Sequence | SharedPrefix]:
    """Yield the engine's work in plan order: outer prefixes, each group's shared prefix, its members' samples.

    Without a plan (the streaming baseline), requests go in input order as independent samples, and a
    request's ``n > 1`` samples are n sequences that share its prompt only through the page cache, as
    vLLM fans such a request out into n child requests. Every prefix is
    yielded before anything that extends it; ``SharedPrefix.unfinished`` counts its dependents exactly.
    Outer prefixes end on a ``page_size`` boundary (the engine's), so extending them copies no page.
    """
    ids = itertools.count()
    if plan is None:  # the baseline plans nothing: stream the requests as they come
        for i, r in enumerate(requests):
            yield from _unit_sources(requests, _Unit(0, [i], r.sampling.n), None, ids, eos, job_seed)
        return
    units = list(_units(requests, plan.groups))
    heads = [requests[u.members[0]].token_ids[: u.prefix_len] for u in units]
    nesting = nest(heads, align=page_size)

    # dependents of each outer prefix: extending outer prefixes, unit prefixes, samples attached directly
    deps = np.bincount(nesting.outer_parent[nesting.outer_parent >= 0], minlength=nesting.num_outer)
    for ui, u in enumerate(units):
        o = nesting.unit_parent[ui]
        if o >= 0:
            deps[o] += 1 if u.has_prefix else u.samples

    outers: list[SharedPrefix | None] = [None] * nesting.num_outer
    next_outer = 0
    for ui, u in enumerate(units):
        while next_outer < nesting.num_outer and nesting.outer_first[next_outer] == ui:
            o, par = next_outer, int(nesting.outer_parent[next_outer])
            outers[o] = SharedPrefix(next(ids), np.ascontiguousarray(heads[ui][: nesting.outer_len[o]]),
                                     unfinished=int(deps[o]), prefix=outers[par] if par >= 0 else None)
            yield outers[o]
            next_outer += 1
        o = int(nesting.unit_parent[ui])
        yield from _unit_sources(requests, u, outers[o] if o >= 0 else None, ids, eos, job_seed)


def _unit_sources(requests, u: _Unit, outer: SharedPrefix | None, ids, eos, job_seed) -> Iterator[Sequence | SharedPrefix]:
    """A unit's own shared prefix (extending ``outer``), when it has one, then its members' samples."""
    parent = outer
    if u.has_prefix:
        head = requests[u.members[0]].token_ids[: u.prefix_len]
        parent = SharedPrefix(next(ids), np.ascontiguousarray(head), unfinished=u.samples, prefix=outer)
        yield parent
    for ri in u.members:
        r = requests[ri]
        for sample in range(r.sampling.n):
            yield Sequence(
                seq_id=next(ids),
                request_index=ri,
                sample_index=sample,
                prompt_ids=r.token_ids,
                params=r.sampling,
                seed=derive_seed(job_seed, r.custom_id, sample, r.sampling.seed),
                eos_ids=eos,
                prefix=parent,
            )


def _units(requests: list[Request], groups: Iterable[PrefixGroup]) -> Iterator[_Unit]:
    """Each group as a unit, minus its requests whose samples are better off sharing their own prompt:
    those follow as units of their own (prefix = all but the last prompt token)."""
    for g in groups:
        members = [int(i) for i in g.members]
        alone = [i for i in members if _own_unit_pays(requests[i], g.prefix_len)] if len(members) > 1 else []
        if alone:
            leaving = set(alone)
            members = [i for i in members if i not in leaving]
        if members:
            plen, samples = g.prefix_len, sum(requests[i].sampling.n for i in members)
            if plen == 0 and len(members) == 1 and samples > 1:
                plen = len(requests[members[0]].token_ids) - 1  # one request's samples: all but the last token
            yield _Unit(plen, members, samples)
        for i in alone:
            yield _Unit(len(requests[i].token_ids) - 1, [i], requests[i].sampling.n)


def _own_unit_pays(r: Request, group_prefix: int) -> bool:
    """Whether a group member with n > 1 samples should share its whole prompt (but the last token)
    among its samples instead of only the group prefix. When the group prefix is long enough to become
    an outer prefix of both (``nest``), leaving costs nothing; otherwise it costs recomputing the group
    prefix once, which must be less than what the samples save."""
    n = r.sampling.n
    own = len(r.token_ids) - 1 - group_prefix
    if n < 2 or own < 1:
        return False
    return group_prefix > MIN_OUTER_TOKENS or (n - 1) * own > group_prefix
