"""Summary numbers of a plan: how much it shares and how its groups are shaped.

The figures follow BatchLLM's own report (``print_batchllm_info`` in the authors' code: sharing degree,
prefix and distinct lengths, logical vs. physical tokens) plus the distributions a user needs to judge
a job. Pure numbers (Python ints, floats and lists, JSON-ready); printing them is the CLI's job.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from batchllm.plan.plan import Plan


def _summary(x: np.ndarray) -> dict:
    if len(x) == 0:
        return {"min": 0, "p50": 0.0, "p90": 0.0, "max": 0, "mean": 0.0}
    return {
        "min": int(x.min()),
        "p50": float(np.percentile(x, 50)),
        "p90": float(np.percentile(x, 90)),
        "max": int(x.max()),
        "mean": float(x.mean()),
    }


def _log2_hist(x: np.ndarray) -> dict:
    """Counts in power-of-two buckets ``[edges[k], edges[k+1])``, edges 1, 2, 4, ... (values >= 1)."""
    if len(x) == 0:
        return {"edges": [1, 2], "counts": [0]}
    top = int(np.ceil(np.log2(max(int(x.max()), 1) + 1)))
    edges = 2 ** np.arange(top + 1)
    counts, _ = np.histogram(x, bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def plan_stats(plan: Plan, prompt_lens: np.ndarray | Sequence[int]) -> dict:
    """Numbers describing ``plan`` for prompts of lengths ``prompt_lens`` (indexed by request).

    ``prompt_lens`` is indexed by request index (the job's list; only the plan's members are read).
    Groups are the plan's execution groups (a request whose ``n`` samples share its own prompt is a
    group of its own). Keys: ``requests``, ``num_groups``, ``shared_groups`` (prefix > 0), ``requests_in_shared_groups``,
    ``logical_prompt_tokens``, ``unique_prompt_tokens``, ``planned_prompt_tokens``, ``saving``,
    ``max_saving``, ``saving_of_max`` (saving / max_saving; both None when the plan did not measure
    ``unique_prompt_tokens``), ``avg_sharing_degree`` (requests per
    shared group), ``outer_prefixes`` (shared heads of neighbouring groups' prefixes, computed once);
    ``group_size`` / ``prefix_len`` / ``distinct_len`` as {min, p50, p90, max, mean}
    (prefix over shared groups, distinct = own tokens per request) and ``group_size_hist`` /
    ``prefix_len_hist`` as power-of-two histograms {edges, counts}.
    """
    lens = np.asarray(prompt_lens, dtype=np.int64)
    if lens.ndim != 1 or (plan.num_requests and len(lens) <= int(plan.order.max())):
        raise ValueError(f"prompt_lens must have one value per request index of the plan, got shape {lens.shape}")
    sizes = np.array([len(g.members) for g in plan.groups], dtype=np.int64)
    prefixes = np.array([g.prefix_len for g in plan.groups], dtype=np.int64)
    shared = prefixes > 0
    distinct = lens[plan.order] - np.repeat(prefixes, sizes)
    saving, max_saving = plan.saving(), plan.max_saving()
    return {
        "requests": plan.num_requests,
        "num_groups": len(plan.groups),
        "shared_groups": int(shared.sum()),
        "requests_in_shared_groups": int(sizes[shared].sum()),
        "logical_prompt_tokens": plan.logical_prompt_tokens,
        "unique_prompt_tokens": plan.unique_prompt_tokens,
        "planned_prompt_tokens": plan.planned_prompt_tokens,
        "saving": saving,
        "max_saving": max_saving,
        "saving_of_max": None if max_saving is None else saving / max_saving if max_saving > 0 else 1.0,
        "avg_sharing_degree": float(sizes[shared].mean()) if shared.any() else 0.0,
        "outer_prefixes": plan.nesting.num_outer,
        "group_size": _summary(sizes),
        "group_size_hist": _log2_hist(sizes),
        "prefix_len": _summary(prefixes[shared]),
        "prefix_len_hist": _log2_hist(prefixes[shared]),
        "distinct_len": _summary(distinct),
    }
