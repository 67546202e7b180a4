"""Prefix-shared attention: Hydragen's decomposition with BatchLLM's horizontal fusion.

For the members of a prefix group, attention over ``[shared prefix | own tokens]`` splits exactly into
two softmax-normalised parts that merge with their log-sum-exps (Hydragen, arXiv 2402.05099)::

    m = max(lse_a, lse_b)
    o = (o_a * exp(lse_a - m) + o_b * exp(lse_b - m)) / (exp(lse_a - m) + exp(lse_b - m))

* prefix part: the queries of all members of a group (decodes and prefill chunks alike, times the G query
  heads of a KV head) are stacked into tiles against the prefix pages, which are therefore read once
  per tile of stacked queries instead of once per member; matrix-matrix work instead of matrix-vector.
* own part: ordinary paged attention over each member's keys ``[prefix_len, seq_len)``.

Both kinds of tile, of every group, plus the sequences outside any group, are work items of the one
tile kernel in ``paged_attention.py`` (BatchLLM's horizontal fusion: no per-group launches, no tail of
small launches): one launch per tile shape (wide tiles for stacks and prefill chunks, narrow ones for
decodes; ``AttentionTuning.one_launch`` makes it one), then one merge kernel over the tokens that have
more than one partial.

What a group needs (``PrefixGroupDescriptor``): its members are the consecutive sequences
``seq_start:seq_end`` of the step, and their K/V at positions ``[0, prefix_len)`` are identical. The
prefix pages are read through the block table of the first member, so ``prefix_len`` may end inside a
page: the engine copies the partial last prefix page per member, but every copy holds the same prefix
tokens. Queries at positions below ``prefix_len`` are still correct (the causal mask applies to the
prefix part too), only pointless.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from batchllm.kernels.paged_attention import (
    AttentionPlan,
    AttentionTuning,
    WorkItems,
    check_heads,
    check_lens,
    dequantized_kv,
    finish_plan,
    num_sms,
    own_items,
    paged_attention_ref,
    resolve_tiles,
    run_plan,
    split_kv,
    token_positions,
)
from batchllm.kernels.runtime import check_device, jit, load_triton

triton, tl = load_triton()  # Triton in the mode kernels/runtime.py decided (before Triton loads)


def _group_fields(g: Any) -> tuple[int, int, int]:
    """(seq_start, seq_end, prefix_len) of a PrefixGroupDescriptor or a plain 3-tuple."""
    if hasattr(g, "seq_start"):
        return int(g.seq_start), int(g.seq_end), int(g.prefix_len)
    start, end, plen = g
    return int(start), int(end), int(plen)


def check_groups(groups: Iterable[Any], ql: np.ndarray, sl: np.ndarray, min_group_size: int) -> list[tuple[int, int, int]]:
    """Validated groups worth the prefix path: non-empty prefix, at least ``min_group_size`` members."""
    out = []
    covered = np.zeros(ql.size, dtype=bool)
    for g in groups:
        start, end, plen = _group_fields(g)
        if not 0 <= start < end <= ql.size:
            raise ValueError(f"prefix group seqs [{start}, {end}) outside the step's {ql.size} sequences")
        if plen < 0:
            raise ValueError(f"prefix group [{start}, {end}): negative prefix_len {plen}")
        if covered[start:end].any():
            raise ValueError(f"prefix group [{start}, {end}) overlaps another group")
        covered[start:end] = True
        if (sl[start:end] < plen).any():
            raise ValueError(f"prefix group [{start}, {end}): a member is shorter than its prefix ({plen} tokens)")
        if plen > 0 and end - start >= min_group_size:
            out.append((start, end, plen))
    return out


def plan_prefix_shared_attention(
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    prefix_groups: Iterable[Any] | None,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    device: torch.device | str,
    tuning: AttentionTuning | None = None,
    min_group_size: int = 2,
    dtype: torch.dtype | None = None,
) -> AttentionPlan:
    """Plan a step in which the groups' members read their shared prefix once per stacked tile.

    A group of one gains nothing from stacking (its prefix is read once anyway) and costs a merge, so it
    runs as ordinary paged attention unless ``min_group_size`` is 1. Sequences outside every group run
    as ordinary paged attention in the same launches. ``dtype``: of q and the cache (default tiles).
    """
    tuning = tuning or AttentionTuning()
    device = torch.device(device)
    g = check_heads(num_heads, num_kv_heads)
    ql, sl = check_lens(query_lens, seq_lens)
    groups = check_groups(prefix_groups or (), ql, sl, max(1, min_group_size))
    wide, narrow = resolve_tiles(head_dim, g, tuning, dtype)
    tok_pos = token_positions(ql, sl)
    wide_tokens = wide.block_m // g
    narrow_tokens = 0 if tuning.one_launch else narrow.block_m // g

    kv_lo = np.zeros_like(ql)
    member = np.zeros(ql.size, dtype=bool)
    for start, end, plen in groups:
        kv_lo[start:end] = plen
        member[start:end] = True
    parts = [own_items(ql, sl, kv_lo, member, wide_tokens, narrow_tokens)]

    starts = np.cumsum(ql) - ql
    for start, end, plen in groups:
        first, last = int(starts[start]), int(starts[end - 1] + ql[end - 1])
        q_row = np.arange(first, last, wide_tokens)
        n = np.minimum(wide_tokens, last - q_row)
        k = q_row.size
        parts.append(WorkItems(
            q_row=q_row, num_tokens=n, bt_row=np.full(k, start), kv_lo=np.zeros(k, dtype=np.int64),
            kv_hi=np.full(k, plen), partial=np.ones(k, dtype=bool), wide=np.ones(k, dtype=bool),
            max_pos=np.maximum.reduceat(tok_pos[first:last], q_row - first),
        ))
    items = split_kv(WorkItems.concat(parts), num_kv_heads, wide.block_n, tuning, num_sms(device))
    return finish_plan(items, tok_pos, num_heads, num_kv_heads, wide, narrow, device, tuning)


def prefix_shared_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    prefix_groups: Iterable[Any] | None,
    scale: float,
    *,
    return_lse: bool = False,
    tuning: AttentionTuning | None = None,
    min_group_size: int = 2,
    kv_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plan and run prefix-shared attention in one call; equal to ordinary paged attention up to rounding.
    ``kv_scales``: an fp8 cache's scales (``run_plan``)."""
    if q.dim() != 3 or kv_cache.dim() != 5:
        raise ValueError(f"q must be (T, heads, d) and kv_cache (2, pages, page_size, kv_heads, d); got "
                         f"{tuple(q.shape)}, {tuple(kv_cache.shape)}")
    plan = plan_prefix_shared_attention(query_lens, seq_lens, prefix_groups, num_heads=q.shape[1],
                                        num_kv_heads=kv_cache.shape[3], head_dim=q.shape[2], device=q.device,
                                        tuning=tuning, min_group_size=min_group_size, dtype=q.dtype)
    return run_plan(q, kv_cache, block_tables, plan, scale, return_lse=return_lse, kv_scales=kv_scales)


# --------------------------------------------------------------------------------------------------
# two-way merge (the formula above as a standalone kernel)
# --------------------------------------------------------------------------------------------------


@jit
def _merge_two_kernel(
    oa_ptr, sa_t, sa_h, la_ptr, sla_t,
    ob_ptr, sb_t, sb_h, lb_ptr, slb_t,
    o_ptr, so_t, so_h, l_ptr,
    num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_ok = h < num_heads
    mask = h_ok[:, None] & (d < HEAD_DIM)[None, :]
    la = tl.load(la_ptr + t * sla_t + h, mask=h_ok, other=float("-inf"))
    lb = tl.load(lb_ptr + t * slb_t + h, mask=h_ok, other=float("-inf"))
    oa = tl.load(oa_ptr + t * sa_t + h[:, None] * sa_h + d[None, :], mask=mask, other=0.0).to(tl.float32)
    ob = tl.load(ob_ptr + t * sb_t + h[:, None] * sb_h + d[None, :], mask=mask, other=0.0).to(tl.float32)
    m = tl.maximum(la, lb)
    m = tl.where(m == float("-inf"), 0.0, m)  # both parts empty: weights 0, result 0, lse -inf
    wa = tl.exp(la - m)
    wb = tl.exp(lb - m)
    l = wa + wb
    l_safe = tl.where(l == 0.0, 1.0, l)
    o = (oa * wa[:, None] + ob * wb[:, None]) / l_safe[:, None]
    tl.store(o_ptr + t * so_t + h[:, None] * so_h + d[None, :], o.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(l_ptr + t * num_heads + h, tl.where(l == 0.0, float("-inf"), m + tl.log(l_safe)), mask=h_ok)


def merge_attn_states(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor, *, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two attention results over disjoint key sets: (o (T, H, D), lse (T, H) float32)."""
    if o_a.dim() != 3 or o_a.shape != o_b.shape:
        raise ValueError(f"o_a and o_b must be (T, H, D) of one shape, got {tuple(o_a.shape)}, {tuple(o_b.shape)}")
    T, H, D = o_a.shape
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if lse.shape != (T, H) or lse.dtype != torch.float32 or lse.stride(1) != 1:
            raise ValueError(f"{name} must be float32 (T, H) = {(T, H)} with contiguous heads, got {lse.dtype} {tuple(lse.shape)}")
    if o_a.stride(2) != 1 or o_b.stride(2) != 1:
        raise ValueError("o_a and o_b need a contiguous head dimension")
    if len({o_a.device, o_b.device, lse_a.device, lse_b.device}) != 1:
        raise ValueError("all inputs must be on one device")
    check_device(o_a.device)
    out = torch.empty(T, H, D, dtype=out_dtype or o_a.dtype, device=o_a.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=o_a.device)
    if T:
        _merge_two_kernel[(T,)](
            o_a, o_a.stride(0), o_a.stride(1), lse_a, lse_a.stride(0),
            o_b, o_b.stride(0), o_b.stride(1), lse_b, lse_b.stride(0),
            out, out.stride(0), out.stride(1), lse,
            H,
            HEAD_DIM=D, BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D),
        )
    return out, lse


def merge_attn_states_ref(o_a, lse_a, o_b, lse_b, out_dtype=None):
    """Torch reference of ``merge_attn_states``."""
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    l = wa + wb
    o = (o_a.float() * wa[..., None] + o_b.float() * wb[..., None]) / torch.where(l > 0, l, torch.ones_like(l))[..., None]
    lse = torch.where(l > 0, m + torch.log(torch.where(l > 0, l, torch.ones_like(l))), torch.full_like(l, float("-inf")))
    return o.to(out_dtype or o_a.dtype), lse


def prefix_shared_attention_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    prefix_groups: Iterable[Any] | None,
    scale: float,
    kv_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decomposition spelled out in torch: prefix part of each group (stacked members against the
    first member's pages), own parts, and the merge. Equals ``paged_attention_ref`` up to rounding.
    ``kv_scales``: an fp8 cache's scales (``dequantized_kv``)."""
    ql, sl = check_lens(query_lens, seq_lens)
    groups = check_groups(prefix_groups or (), ql, sl, 1)
    kv_lo = np.zeros_like(ql)
    for start, end, plen in groups:
        kv_lo[start:end] = plen
    o, lse = paged_attention_ref(q, kv_cache, block_tables, ql.tolist(), sl.tolist(), scale, kv_start=kv_lo.tolist(),
                                 kv_scales=kv_scales)
    o = o.float()
    starts = np.cumsum(ql) - ql
    for start, end, plen in groups:
        rows = slice(int(starts[start]), int(starts[end - 1] + ql[end - 1]))
        # every stacked query against the first member's prefix pages, causal by its own position
        pos = torch.from_numpy(token_positions(ql, sl)[rows]).to(q.device)
        pref_o, pref_lse = _prefix_part_ref(q[rows], kv_cache, block_tables[start], plen, pos, scale, kv_scales)
        o[rows], lse[rows] = merge_attn_states_ref(pref_o, pref_lse, o[rows], lse[rows], out_dtype=torch.float32)
    return o.to(q.dtype), lse


def _prefix_part_ref(q, kv_cache, pages, plen, pos, scale, kv_scales):
    """Stacked queries (n, H, D) against prefix keys [0, plen) of one block-table row, causal by ``pos``."""
    H, D = q.shape[1], q.shape[2]
    kvh, ps = kv_cache.shape[3], kv_cache.shape[2]
    idx = pages[: (plen + ps - 1) // ps].long()
    k, v = dequantized_kv(kv_cache[:, idx], kv_scales)
    k = k.reshape(-1, kvh, D)[:plen].repeat_interleave(H // kvh, dim=1)
    v = v.reshape(-1, kvh, D)[:plen].repeat_interleave(H // kvh, dim=1)
    s = torch.einsum("thd,lhd->thl", q.float(), k) * scale
    visible = torch.arange(plen, device=q.device)[None, :] <= pos[:, None]
    s = s.masked_fill(~visible[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    return torch.einsum("thl,lhd->thd", p, v), lse
