"""The engine's work, in plan order: a plan's outer prefixes, group prefixes and samples.

``build_sources`` is the glue between the PLAN stage and the engine, and it decides nothing: the plan's
groups (``Plan.groups``, final execution groups in execution order) and their outer prefixes
(``Plan.nesting``: multi-level sharing) become ``SharedPrefix`` and ``Sequence`` objects one to one, so
the engine computes the prompt tokens the plan counts. The same function serves one process and each
Ray replica (which runs ``Plan.subset`` of the job's plan).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from collections.abc import Sequence as Seq

import numpy as np

from batchllm.engine.engine import derive_seed
from batchllm.engine.sequence import Sequence, SharedPrefix
from batchllm.io.requests import Request
from batchllm.plan.plan import Plan, PrefixGroup


def build_sources(requests: Seq[Request] | Mapping[int, Request], plan: Plan, eos: frozenset[int],
                  job_seed: int, page_size: int = 16) -> Iterator[Sequence | SharedPrefix]:
    """The engine's work in plan order, lazily: outer prefixes, each group's shared prefix, its members' samples.

    ``requests`` maps the plan's request indices to requests (the job's list, or a replica's dict).
    A group computes its prefix as a ``SharedPrefix`` (extending its outer prefix) when two or more
    samples share it; otherwise its one sample extends the outer prefix directly. A group with prefix 0
    runs its members' samples as independent sequences (the baseline plan: a request's ``n`` samples
    then share its prompt only through the page cache, as vLLM fans such a request out into ``n``
    child requests). Every prefix is yielded before anything that extends it, and
    ``SharedPrefix.unfinished`` counts its dependents exactly. ``page_size`` is the engine's: an outer
    prefix must end on a page boundary (the plan's ``page_size``), so extending it copies no page;
    ``ValueError`` otherwise.

    Every member's tokens are checked against the prefixes it extends, token for token (``ValueError``
    on a mismatch): a page-tree plan (``plan/pages.py``) groups prompts by 64-bit page hashes, and a
    hash collision must stop the job rather than attach a sample to another prompt's KV.
    """
    if np.any(plan.nesting.outer_len % page_size):
        raise ValueError(f"the plan's outer prefixes do not end on the engine's {page_size}-token page boundary")
    return _sources(requests, plan, eos, job_seed)


def _sources(requests, plan: Plan, eos: frozenset[int], job_seed: int) -> Iterator[Sequence | SharedPrefix]:
    ids = itertools.count()
    nst = plan.nesting
    # dependents of each outer prefix: extending outer prefixes, group prefixes, samples attached directly
    deps = np.bincount(nst.outer_parent[nst.outer_parent >= 0], minlength=nst.num_outer)
    for g in plan.groups:
        if g.outer >= 0:
            samples = _samples(requests, g)
            deps[g.outer] += 1 if _shares(g, samples) else samples

    outers: list[SharedPrefix | None] = [None] * nst.num_outer
    next_outer = 0
    for g in plan.groups:
        while next_outer < nst.num_outer and nst.outer_first[next_outer] == g.group_id:
            o, par = next_outer, int(nst.outer_parent[next_outer])
            head = requests[int(g.members[0])].token_ids[: nst.outer_len[o]]
            outers[o] = SharedPrefix(next(ids), np.ascontiguousarray(head), unfinished=int(deps[o]),
                                     prefix=outers[par] if par >= 0 else None)
            yield outers[o]
            next_outer += 1
        yield from _group_sources(requests, g, outers[g.outer] if g.outer >= 0 else None, ids, eos, job_seed)


def _samples(requests, g: PrefixGroup) -> int:
    return sum(requests[int(i)].sampling.n for i in g.members)


def _shares(g: PrefixGroup, samples: int) -> bool:
    """Whether the group computes a shared prefix of its own: two or more samples share it."""
    return g.prefix_len > 0 and samples > 1


def _group_sources(requests, g: PrefixGroup, outer: SharedPrefix | None, ids, eos, job_seed) -> Iterator[Sequence | SharedPrefix]:
    """A group's own shared prefix (extending ``outer``), when it has one, then its members' samples."""
    parent = outer
    samples = _samples(requests, g)
    head = requests[int(g.members[0])].token_ids[: g.prefix_len]
    if outer is not None and not np.array_equal(head[: len(outer.token_ids)], outer.token_ids):
        raise ValueError(f"plan group {g.group_id}: its prefix does not extend its outer prefix's tokens")
    if _shares(g, samples):
        parent = SharedPrefix(next(ids), np.ascontiguousarray(head), unfinished=samples, prefix=outer)
        yield parent
    for ri in g.members.tolist():
        r = requests[ri]
        if not np.array_equal(r.token_ids[: g.prefix_len], head):
            raise ValueError(f"plan group {g.group_id}: request {ri} does not start with the group's prefix")
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
