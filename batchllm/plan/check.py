"""The plan verifier: ``check_plan`` states, as code, every invariant a ``Plan`` promises its prompts.

The tests run it over every plan they build (``plan.py``: the token and page planners, subsets,
plans less some requests); it reads every prompt, so the pipeline does not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from batchllm.plan.plan import Plan


def check_plan(plan: Plan, prompts: Sequence | Mapping[int, Sequence]) -> None:
    """Verify a plan against its prompts; raises ``ValueError`` naming the first violation.

    ``prompts``: the job's prompts by request index, a list or (for a subset) a mapping; every one of
    them appears in exactly one group. Groups are contiguous runs of ``order`` with ``group_id`` their
    position; ``prompt_lens`` are the prompts' lengths, ``samples`` >= 1; every member starts with its
    group's prefix (the first member's first ``prefix_len`` tokens) and keeps at least one own token;
    every group's prefix is longer than its outer prefix and starts with it (the outer prefix's tokens:
    those of its first group), every outer prefix extends its parent and has at least two dependents;
    the token counts match their definitions (except ``unique_prompt_tokens``).
    """
    keys = sorted(prompts) if isinstance(prompts, Mapping) else list(range(len(prompts)))
    if len(plan.order) != len(keys) or not np.array_equal(np.sort(plan.order), np.asarray(keys, dtype=np.int64)):
        raise ValueError("order does not hold every request exactly once")
    if not np.array_equal(np.concatenate([g.members for g in plan.groups] or [np.zeros(0, np.int64)]), plan.order):
        raise ValueError("order is not the concatenation of the groups' members")
    lens = np.array([len(prompts[i]) for i in plan.order.tolist()], dtype=np.int64)
    if not np.array_equal(plan.prompt_lens, lens) or len(plan.samples) != len(lens) or np.any(plan.samples < 1):
        raise ValueError("prompt_lens / samples disagree with the prompts")
    nst = plan.nesting
    if len(nst.group_parent) != len(plan.groups):
        raise ValueError("the nesting is over a different number of groups")
    b = plan.bounds()
    heads = []
    for gid, g in enumerate(plan.groups):
        if g.group_id != gid or len(g.members) == 0:
            raise ValueError(f"group {gid}: wrong id or no members")
        if g.prefix_len > lens[b[gid] : b[gid + 1]].min() - 1:
            raise ValueError(f"group {gid}: prefix_len {g.prefix_len} leaves a member without an own token")
        head = np.asarray(prompts[int(g.members[0])])[: g.prefix_len]
        heads.append(head)
        for i in g.members[1:].tolist():
            if not np.array_equal(np.asarray(prompts[i])[: g.prefix_len], head):
                raise ValueError(f"group {gid}: request {i} does not start with the group's prefix")
        if g.outer != int(nst.group_parent[gid]):
            raise ValueError(f"group {gid}: its outer prefix disagrees with the nesting")
    for gid, g in enumerate(plan.groups):
        if g.outer >= 0:
            olen = int(nst.outer_len[g.outer])
            if olen >= g.prefix_len or not np.array_equal(heads[gid][:olen], heads[int(nst.outer_first[g.outer])][:olen]):
                raise ValueError(f"group {gid}: its prefix does not extend its outer prefix {g.outer}")
    deps = np.bincount(nst.group_parent[nst.group_parent >= 0], minlength=nst.num_outer)
    deps += np.bincount(nst.outer_parent[nst.outer_parent >= 0], minlength=nst.num_outer)
    for o in range(nst.num_outer):
        par, olen = int(nst.outer_parent[o]), int(nst.outer_len[o])
        first = heads[int(nst.outer_first[o])]
        if par >= 0 and (nst.outer_len[par] >= olen or not np.array_equal(first[: nst.outer_len[par]], heads[int(nst.outer_first[par])][: nst.outer_len[par]])):
            raise ValueError(f"outer prefix {o} does not extend its parent {par}")
        if deps[o] < 2:
            raise ValueError(f"outer prefix {o} has fewer than two dependents")
    planned = sum(int(nst.outer_len[o]) - (int(nst.outer_len[p]) if p >= 0 else 0) for o, p in enumerate(nst.outer_parent.tolist()))
    for gid, g in enumerate(plan.groups):
        n, ln = plan.samples[b[gid] : b[gid + 1]], lens[b[gid] : b[gid + 1]]
        planned += g.prefix_len - (int(nst.outer_len[g.outer]) if g.outer >= 0 else 0) + int((n * (ln - g.prefix_len)).sum())
    if planned != plan.planned_prompt_tokens or int((plan.samples * lens).sum()) != plan.logical_prompt_tokens:
        raise ValueError("planned / logical prompt token counts are wrong")
