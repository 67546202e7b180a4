"""The execution plan of a job: the groups the engine runs, in order, and what they save.

This is the PLAN stage of the pipeline (BatchLLM, arXiv 2412.03594, Sec. 4.1-4.2): one global prefix
tree over every prompt (``trie.py``), split into single-level prefix groups by the authors' gain rule
and ordered decode-heavy first within a depth-first walk (``groups.py``); then a request with ``n > 1``
samples leaves its group when its samples are better off sharing its whole prompt
(``groups.split_samples``); then neighbouring groups whose prefixes share a head get an outer prefix
computed once for all of them (``nesting.py``: multi-level sharing).

The plan is what runs: ``Plan.groups`` are the final execution groups in execution order and
``Plan.nesting`` the outer prefixes over exactly these groups; ``engine/sources.py`` turns them into
engine work one to one, so the planned prompt tokens are the prompt tokens the engine computes (with
enough KV memory: preemption recomputes). ``Plan.subset`` is the part a Ray replica runs,
``Plan.without`` the plan less the prompts a KV pool cannot hold.

Planners (``build_plan``'s ``planner``): the token tree (``trie.py``: token-exact prefixes, every
prompt token in memory) or the page tree (``pages.py``: one 64-bit symbol per KV page, so memory grows
with pages, built streaming; a prefix is shared up to the last full page two prompts have in common,
or whole between identical prompts). ``"auto"`` takes the token tree up to ``TOKEN_PLAN_MAX_TOKENS``
prompt tokens. Both give a ``Plan`` of the same form, executed the same way.

Policies: ``"batchllm"`` plans as above; ``"fcfs-lru"``, the streaming baseline, is the plan of no
sharing: input order, each request its own group with prefix 0, its ``n`` samples independent
sequences (the baseline engine shares prompts only through its page cache, as vLLM does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from batchllm.io.requests import Request
from batchllm.plan.groups import batchllm_groups, order_groups, split_samples
from batchllm.plan.nesting import Nesting, nest, nest_by_lcp
from batchllm.plan.pages import PagePrompts, page_trie
from batchllm.plan.trie import PrefixTrie

POLICIES = ("batchllm", "fcfs-lru")
PLANNERS = ("auto", "tokens", "pages")
# "auto" plans jobs of up to this many prompt tokens on the token tree (about 12 bytes per token, so
# under 1 GB here), bigger ones on the page tree (about 1 byte per token: ``pages.py``).
TOKEN_PLAN_MAX_TOKENS = 1 << 26


@dataclass
class PrefixGroup:
    """One execution group: the samples of ``members`` around one shared prefix.

    The first ``prefix_len`` prompt tokens of every member are identical, and
    ``prefix_len <= len(prompt) - 1`` for every member, so each sample computes at least its last token.
    The engine computes the prefix once (beyond its outer prefix) when two or more samples share it;
    with one sample the prefix still places the group under its outer prefix. ``prefix_len == 0``
    means no sharing (a lone request, or the baseline plan).
    """

    group_id: int  # its position in ``Plan.groups``
    prefix_len: int
    members: np.ndarray  # request indices (into the job's request list), in execution order
    outer: int = -1  # the outer prefix (``Plan.nesting``) this group's prefix extends, or -1


@dataclass
class Plan:
    """The execution groups in order, their outer prefixes, and the prompt token accounting.

    ``order`` is the concatenation of the groups' members; ``prompt_lens`` and ``samples`` (each
    request's ``n``) are aligned with ``order``. Request indices are indices into the job's request
    list, also in a ``subset`` or ``without``. ``nesting`` holds the outer prefixes over exactly these
    groups, in order; every outer prefix has at least two dependents (groups or outer prefixes directly
    below it).

    Token counts, over every sample of every member: ``logical_prompt_tokens`` = sum of ``n * len``;
    ``planned_prompt_tokens`` = each outer prefix level once + each group's prefix beyond its outer
    prefix once + each sample's tokens beyond its group's prefix: what the engine computes when
    nothing is preempted (``tests/test_plan_execution.py``).
    ``unique_prompt_tokens`` (distinct non-empty prefixes: the best any cache can do) is measured on
    the prompt tree of a ``"batchllm"`` plan, None where no tree was built (the baseline) or the plan
    is derived (``subset``, ``without``). On the page tree it counts prefixes by whole pages (two
    prompts diverging inside a page both count that page), so it may exceed the token count and
    ``max_saving`` then understates the best, even below ``saving``.
    """

    groups: list[PrefixGroup]
    order: np.ndarray
    prompt_lens: np.ndarray
    samples: np.ndarray
    nesting: Nesting
    logical_prompt_tokens: int
    planned_prompt_tokens: int
    unique_prompt_tokens: int | None

    def saving(self) -> float:
        """Prefill saving of this plan: ``1 - planned / logical``."""
        return 1.0 - self.planned_prompt_tokens / self.logical_prompt_tokens if self.logical_prompt_tokens else 0.0

    def max_saving(self) -> float | None:
        """The most any prefix cache could save: ``1 - unique / logical`` (None: not measured)."""
        if self.unique_prompt_tokens is None:
            return None
        return 1.0 - self.unique_prompt_tokens / self.logical_prompt_tokens if self.logical_prompt_tokens else 0.0

    @property
    def num_requests(self) -> int:
        return len(self.order)

    def bounds(self) -> np.ndarray:
        """Group ``g``'s members are ``order[bounds[g] : bounds[g + 1]]`` (length ``len(groups) + 1``)."""
        return np.concatenate([[0], np.cumsum([len(g.members) for g in self.groups], dtype=np.int64)]).astype(np.int64)

    def subset(self, group_ids: Sequence[int]) -> Plan:
        """The groups ``group_ids`` (positions in ``groups``), in the given order, as a plan of their own:
        what a Ray replica runs. Outer prefixes are those the listed groups extend, less levels that
        would have a single dependent there (``Nesting.restrict``); the token counts are the subset's."""
        ids = [int(g) for g in group_ids]
        if len(set(ids)) != len(ids) or any(not 0 <= g < len(self.groups) for g in ids):
            raise ValueError(f"group ids must be distinct positions in the plan's {len(self.groups)} groups")
        b = self.bounds()
        pos = np.concatenate([np.arange(b[g], b[g + 1]) for g in ids]) if ids else np.zeros(0, dtype=np.int64)
        return _from_groups([self.groups[g].prefix_len for g in ids], [self.groups[g].members for g in ids],
                            self.prompt_lens[pos], self.samples[pos], self.nesting.restrict(ids), unique=None)

    def without(self, request_ids: Iterable[int]) -> Plan:
        """This plan less the requests ``request_ids`` (each a member): the other members keep their
        groups, prefixes and order; emptied groups go, and outer prefixes as in ``subset``."""
        drop = np.fromiter((int(i) for i in request_ids), dtype=np.int64)
        gone = np.isin(self.order, drop)
        if int(gone.sum()) != len(np.unique(drop)):
            raise ValueError("every request to remove must be a member of the plan")
        b = self.bounds()
        kept = [g for g in range(len(self.groups)) if not gone[b[g] : b[g + 1]].all()]
        members = [self.groups[g].members[~gone[b[g] : b[g + 1]]] for g in kept]
        return _from_groups([self.groups[g].prefix_len for g in kept], members, self.prompt_lens[~gone],
                            self.samples[~gone], self.nesting.restrict(kept), unique=None)


def plan_requests(requests: Sequence[Request], policy: str, max_model_len: int | None, page_size: int,
                  planner: str = "auto") -> Plan:
    """The plan of a job's tokenized ``requests`` under ``policy`` (``POLICIES``); request indices are
    positions in ``requests``. ``page_size`` is the engine's KV page size (outer prefixes end on a page
    boundary).

    ``planner`` as in ``build_plan``. ``"batchllm"`` expects per request ``max_tokens`` (capped by what ``max_model_len`` leaves after the
    prompt; None: no cap) times ``n`` output tokens, which orders the groups decode-heavy first.
    """
    prompts = [r.token_ids for r in requests]
    samples = np.fromiter((r.sampling.n for r in requests), dtype=np.int64, count=len(requests))
    cap = max_model_len or np.iinfo(np.int64).max
    expected = np.fromiter(
        (min(r.sampling.max_tokens, max(1, cap - len(r.token_ids))) * r.sampling.n for r in requests),
        dtype=np.float64, count=len(requests),
    )
    return build_plan(prompts, expected, samples=samples, policy=policy, page_size=page_size, planner=planner)


def build_plan(
    prompts: Sequence | PagePrompts,
    expected_output: np.ndarray | Sequence[float],
    *,
    samples: np.ndarray | Sequence[int] | None = None,
    policy: str = "batchllm",
    min_prefix: int = 1,
    trie: PrefixTrie | None = None,
    page_size: int = 16,
    planner: str = "auto",
    read_tokens: Callable[[np.ndarray, int, int], np.ndarray] | None = None,
) -> Plan:
    """Plan a job.

    ``prompts``: one non-empty 1-D integer array (or list) of token ids per request, or their pages
    (``PagePrompts`` of the same ``page_size``: the page tree, whatever ``planner`` says).
    ``expected_output``: per request, the output tokens to expect (``max_tokens * n`` or an estimate), >= 0.
    ``samples``: per request, its number of samples ``n`` (>= 1; None: 1 each).
    ``policy``: ``"batchllm"`` (global prefix groups, decode-ratio DFS order, the ``n > 1`` split, outer
    prefixes) or ``"fcfs-lru"`` (the baseline: input order, no sharing; no tree is built).
    ``min_prefix``: a group sharing fewer tokens than this is split into singletons (prefix 0).
    ``trie``: the prompts' tree if already built (e.g. to plan several ways from one build).
    ``page_size``: the engine's KV page size; outer prefixes end on a page boundary.
    ``planner``: ``"tokens"``, ``"pages"`` or ``"auto"`` (see the module docstring; page size 1: tokens).
    ``read_tokens(ids, start, stop)``: tokens ``start:stop`` of each request in ``ids`` (an int64 array;
    every one of them has at least ``stop`` tokens) as an array of shape ``(len(ids), stop - start)``,
    where ``prompts`` are ``PagePrompts`` (e.g. read from the job's token file): with it a page-tree plan
    extends each group's prefix token-exactly into the page where its members diverge (at most one page
    read per member), without it group prefixes end on a page boundary. Prompts given as token arrays
    are read directly.
    Raises ``ValueError`` for bad input.
    """
    out, n_s, lens = _checked_inputs(prompts, expected_output, samples, policy, planner, min_prefix, page_size)
    if policy == "fcfs-lru":
        return _from_groups(np.zeros(len(prompts), dtype=np.int64), list(np.arange(len(prompts))[:, None]), lens, n_s,
                            nest([np.zeros(0, np.int64)] * len(prompts)), unique=None)
    if trie is None:
        trie = _prompt_tree(prompts, lens, page_size, planner)
    elif trie.num_requests != len(prompts):
        raise ValueError("trie was built over a different number of prompts")
    plens, members = _ordered_groups(trie, min_prefix, out)
    if trie.page_size > 1:
        if read_tokens is None and not isinstance(prompts, PagePrompts):
            def read_tokens(ids, start, stop):
                return np.array([np.asarray(prompts[i][start:stop]) for i in ids.tolist()], dtype=np.int64)
        if read_tokens is not None:
            plens = _exact_prefixes(plens, members, lens, trie.page_size, read_tokens)
    plens, members = split_samples(plens, members, lens, n_s)
    # the tokens neighbouring groups' prefixes share: where outer prefixes can go
    lcp = [trie.common_prefix(int(a[0]), int(b[0]), min(pa, pb)) if pa and pb else 0
           for pa, pb, a, b in zip(plens[:-1], plens[1:], members[:-1], members[1:])]
    order = np.concatenate(members) if members else np.zeros(0, dtype=np.int64)
    return _from_groups(plens, members, lens[order], n_s[order], nest_by_lcp(plens, lcp, align=page_size),
                        unique=trie.unique_tokens())


def _checked_inputs(prompts: Sequence | PagePrompts, expected_output: np.ndarray | Sequence[float],
                    samples: np.ndarray | Sequence[int] | None, policy: str, planner: str, min_prefix: int,
                    page_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``build_plan``'s arguments checked (``ValueError`` for the first bad one; ``PagePrompts`` are
    finished): per prompt its expected output (float64), its samples and its length (int64)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown plan policy {policy!r}; expected one of {POLICIES}")
    if planner not in PLANNERS:
        raise ValueError(f"unknown planner {planner!r}; expected one of {PLANNERS}")
    if isinstance(prompts, PagePrompts):
        prompts.finish()
        if prompts.page_size != page_size:
            raise ValueError(f"the prompts' pages have {prompts.page_size} tokens, the plan's {page_size}")
    if isinstance(min_prefix, bool) or not isinstance(min_prefix, (int, np.integer)) or min_prefix < 1:
        raise ValueError(f"min_prefix must be an integer >= 1, got {min_prefix!r}")
    out = np.asarray(expected_output, dtype=np.float64)
    if out.shape != (len(prompts),):
        raise ValueError(f"expected_output must have one value per prompt ({len(prompts)}), got shape {out.shape}")
    if not np.all(np.isfinite(out)) or np.any(out < 0):
        raise ValueError("expected_output must be finite and >= 0")
    n_s = np.ones(len(prompts), dtype=np.int64) if samples is None else np.asarray(samples, dtype=np.int64)
    if n_s.shape != (len(prompts),) or np.any(n_s < 1):
        raise ValueError(f"samples must be one integer >= 1 per prompt ({len(prompts)})")
    if isinstance(prompts, PagePrompts):
        lens = prompts.lengths
    else:
        lens = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=len(prompts))
    if np.any(lens < 1):
        raise ValueError("every prompt must have at least one token")
    return out, n_s, lens


def _prompt_tree(prompts: Sequence | PagePrompts, lens: np.ndarray, page_size: int, planner: str) -> PrefixTrie:
    """The prompts' tree under ``planner``: the page tree for ``PagePrompts``, ``"pages"``, or ``"auto"``
    over ``TOKEN_PLAN_MAX_TOKENS`` prompt tokens (page size 1: always the token tree), else the token tree."""
    by_pages = isinstance(prompts, PagePrompts) or page_size > 1 and (
        planner == "pages" or planner == "auto" and int(lens.sum()) > TOKEN_PLAN_MAX_TOKENS)
    if by_pages:
        return page_trie(prompts if isinstance(prompts, PagePrompts) else PagePrompts.of(prompts, page_size))
    return PrefixTrie.build(prompts)


def _ordered_groups(trie: PrefixTrie, min_prefix: int, expected_output: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The tree's prefix groups (``groups.batchllm_groups``) in execution order (``groups.order_groups``):
    each group's prefix length and its members, in execution order."""
    grouping = batchllm_groups(trie, min_prefix)
    group_order, order = order_groups(trie, grouping, expected_output)
    size = np.bincount(grouping.req_group, minlength=grouping.num_groups)[group_order]
    members = np.split(order, np.cumsum(size)[:-1]) if len(order) else []
    return grouping.prefix_len[group_order], members


def _exact_prefixes(plens: np.ndarray, members: list[np.ndarray], lens: np.ndarray, page_size: int,
                    read_tokens: Callable[[np.ndarray, int, int], np.ndarray], chunk: int = 4096) -> np.ndarray:
    """Group prefixes of a page-tree plan extended by the tokens all members share in the next page
    (at most ``page_size - 1`` more, and each member keeps one own token): token-exact where they
    diverge inside that page. Members are read ``chunk`` at a time, until the window is used up."""
    out = np.asarray(plens, dtype=np.int64).copy()
    for g, m in enumerate(members):
        p = int(out[g])
        if p == 0 or len(m) < 2:
            continue
        stop = min(p + page_size - 1, int(lens[m].min()) - 1)
        if stop <= p:
            continue
        head = np.asarray(read_tokens(m[:1], p, stop))[0]
        common = len(head)
        for k in range(0, len(m), chunk):
            w = np.asarray(read_tokens(m[k : k + chunk], p, p + common))
            diff = (w != head[:common]).any(axis=0)
            if diff.any():
                common = int(np.argmax(diff))
                if common == 0:
                    break
        out[g] = p + common
    return out


def _from_groups(prefix_lens: Sequence[int], members: list[np.ndarray], lens: np.ndarray, samples: np.ndarray,
                 nesting: Nesting, unique: int | None) -> Plan:
    """A plan of groups ``(prefix_lens[g], members[g])`` (int64 arrays) in execution order, with ``nesting``
    over them; ``lens`` / ``samples`` are the members' prompt lengths and sample counts, aligned with
    the concatenated members. The token counts follow ``Plan``'s definitions."""
    groups = [PrefixGroup(g, p, m, o) for g, (p, m, o) in
              enumerate(zip(np.asarray(prefix_lens, dtype=np.int64).tolist(), members, nesting.group_parent.tolist()))]
    order = np.concatenate(members) if members else np.zeros(0, dtype=np.int64)
    lens, samples = np.asarray(lens, dtype=np.int64), np.asarray(samples, dtype=np.int64)
    return Plan(
        groups=groups,
        order=order,
        prompt_lens=lens,
        samples=samples,
        nesting=nesting,
        logical_prompt_tokens=int((samples * lens).sum()),
        planned_prompt_tokens=_planned_tokens(np.asarray(prefix_lens, dtype=np.int64), members, nesting, lens, samples),
        unique_prompt_tokens=unique,
    )


def _planned_tokens(prefix_lens: np.ndarray, members: list[np.ndarray], nesting: Nesting, lens: np.ndarray,
                    samples: np.ndarray) -> int:
    """Outer prefix levels once + each group's prefix beyond its outer prefix + each sample's own tokens.

    A group of one sample counts its prefix beyond the outer prefix once and its own tokens once: the
    same sum as the sample computing everything beyond the outer prefix, which is what the engine does."""
    plen = np.repeat(prefix_lens, [len(m) for m in members]) if members else np.zeros(0, dtype=np.int64)
    gp = nesting.group_parent
    outer = nesting.outer_len[np.maximum(gp, 0)] if nesting.num_outer else np.zeros(len(gp), dtype=np.int64)
    beyond_outer = int((prefix_lens - np.where(gp >= 0, outer, 0)).sum())
    return nesting.outer_tokens() + beyond_outer + int((samples * (lens - plen)).sum())
