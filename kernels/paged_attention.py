"""Paged attention for a whole engine step: decodes and prefill chunks, GQA-stacked, from a work list.

Follows flash-decoding / vLLM's paged attention: K/V live in fixed-size pages reached through a block
table; each program walks the keys of one tile of queries with an online softmax. Two generalisations
make the same kernel serve prefix-shared attention (``prefix_attention.py``, Hydragen / BatchLLM):

* A program's **work item** is "these consecutive query rows against this key range of that block-table
  row", not "one sequence". A decode, a slice of a prefill chunk, a piece of a long context (split-KV)
  and a prefix group's stacked queries against its shared prefix are all work items, so one launch
  runs any mix of them (BatchLLM's horizontal fusion).
* A program may write a **partial** result (output normalised over its key range, plus the
  log-sum-exp); a small merge kernel then combines the partials of each query exactly.

GQA: the ``G = num_heads / num_kv_heads`` query heads that read the same KV head go into the same tile,
``BLOCK_M = tokens x G`` rows, so each K/V tile loaded from memory serves all of them.

Work item layout (int32, ``WORK_FIELDS`` per row)::

    [q_row, num_tokens, bt_row, kv_lo, kv_hi, part_row]
    queries   q[q_row : q_row + num_tokens]  (all heads of kv head program_id(1))
    keys      positions [kv_lo, kv_hi) of block_tables[bt_row], causal: key j visible to a query at
              position p iff j <= p (positions come from ``tok_pos``)
    result    part_row <  0: final output written to out[q_row + t] (and lse)
              part_row >= 0: partial written to part_o / part_lse rows part_row + t, merged later

Everything the kernels need per step is built once on the host (``plan_paged_attention`` here,
``plan_prefix_shared_attention`` for prefix groups) and reused by every layer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch
from batchllm.engine.kv_cache import check_kv_scales
from batchllm.kernels.runtime import check_device, interpreting, jit, load_triton

triton, tl = load_triton()  # Triton in the mode kernels/runtime.py decided (before Triton loads)

WORK_FIELDS = 6
_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------


# stride_bt is the block-table width, which changes from one eager step to the next: left unspecialised, or
# Triton would compile a variant for width 1, one for widths divisible by 16 and one for the rest.
@jit(do_not_specialize=["stride_bt"])
def _attn_tiles_kernel(
    q_ptr, stride_qt, stride_qh,
    k_ptr, v_ptr, stride_kp, stride_ks, stride_kh,
    bt_ptr, stride_bt,
    work_ptr, tok_pos_ptr,
    out_ptr, stride_ot, stride_oh,
    lse_ptr, stride_lt,
    part_o_ptr, part_lse_ptr,
    kv_scale_ptr,
    num_heads, qk_scale_log2,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    STORE_LSE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8_KV: tl.constexpr,
):
    # grid: (work items, kv heads)
    wid = tl.program_id(0)
    kvh = tl.program_id(1)
    w = work_ptr + wid * 6
    q_row = tl.load(w)
    num_tokens = tl.load(w + 1)
    bt_row = tl.load(w + 2)
    kv_lo = tl.load(w + 3)
    kv_hi = tl.load(w + 4)
    part_row = tl.load(w + 5)

    # tile row r = query token r // G, query head kvh * G + r % G (the heads sharing this KV head)
    r = tl.arange(0, BLOCK_M)
    t = r // G
    head = kvh * G + r % G
    row_ok = t < num_tokens
    tok = (q_row + t).to(tl.int64)
    pos = tl.load(tok_pos_ptr + tok, mask=row_ok, other=-1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
    if UPCAST:  # the CPU interpreter computes 16-bit tl.dot wrongly; the GPU keeps 16-bit operands
        q = q.to(tl.float32)

    # an fp8 cache holds x / scale per KV head (kv_scale_ptr: rows k_scale, v_scale, ...): k_scale folds
    # into the score scale and v_scale into the output, so K and V tiles dequantize with a plain upcast
    score_scale = qk_scale_log2
    if FP8_KV:
        score_scale = qk_scale_log2 * tl.load(kv_scale_ptr + kvh)
    # keys past the last query position of the tile are invisible to every row: skip them
    kv_end = tl.minimum(kv_hi, tl.max(pos, axis=0) + 1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt = bt_ptr + bt_row.to(tl.int64) * stride_bt
    head_off = kvh.to(tl.int64) * stride_kh
    for start in range(kv_lo, kv_end, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < kv_end
        page = tl.load(bt + j // PAGE_SIZE, mask=j_ok, other=0)
        kv_off = page.to(tl.int64) * stride_kp + (j % PAGE_SIZE).to(tl.int64) * stride_ks + head_off
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        # to q's dtype (float32 when UPCAST): an fp8 cache upcasts here (its scales apply to s and o); else a no-op
        k = k.to(q.dtype)
        v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * score_scale
        visible = j_ok[None, :] & (j[None, :] <= pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a row with nothing visible yet keeps m = -inf; shift by 0 there so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # no visible key: output 0 with lse -inf, which a merge weighs as nothing
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    if FP8_KV:
        o = o * tl.load(kv_scale_ptr + num_heads // G + kvh)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)

    # masks built per row (not from a scalar) so that every Triton version broadcasts them alike
    prow = (part_row + t).to(tl.int64)
    direct = row_ok & (prow < t)  # part_row < 0
    partial = row_ok & (prow >= t)
    out_off = tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + out_off, o.to(out_ptr.dtype.element_ty), mask=direct[:, None] & d_ok[None, :])
    if STORE_LSE:
        tl.store(lse_ptr + tok * stride_lt + head, lse, mask=direct)
    part_off = (prow[:, None] * num_heads + head[:, None]) * HEAD_DIM + d[None, :]
    tl.store(part_o_ptr + part_off, o, mask=partial[:, None] & d_ok[None, :])
    tl.store(part_lse_ptr + prow * num_heads + head, lse, mask=partial)


@jit
def _merge_partials_kernel(
    part_o_ptr, part_lse_ptr,
    dst_ptr, src_start_ptr, src_ptr,
    out_ptr, stride_ot, stride_oh,
    lse_ptr, stride_lt,
    num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, STORE_LSE: tl.constexpr,
):
    # grid: (tokens to merge, head blocks)
    i = tl.program_id(0)
    tok = tl.load(dst_ptr + i).to(tl.int64)
    first = tl.load(src_start_ptr + i)
    last = tl.load(src_start_ptr + i + 1)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_ok = h < num_heads
    mask = h_ok[:, None] & (d < HEAD_DIM)[None, :]
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for k in range(first, last):
        src = tl.load(src_ptr + k).to(tl.int64)
        lse = tl.load(part_lse_ptr + src * num_heads + h, mask=h_ok, other=float("-inf"))
        o = tl.load(part_o_ptr + (src * num_heads + h[:, None]) * HEAD_DIM + d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp(m - m_safe)
        b = tl.exp(lse - m_safe)
        acc = acc * a[:, None] + o * b[:, None]
        l = l * a + b
        m = m_new
    empty = l == 0.0
    l_safe = tl.where(empty, 1.0, l)
    o = acc / l_safe[:, None]
    tl.store(out_ptr + tok * stride_ot + h[:, None] * stride_oh + d[None, :], o.to(out_ptr.dtype.element_ty), mask=mask)
    if STORE_LSE:
        tl.store(lse_ptr + tok * stride_lt + h, tl.where(empty, float("-inf"), m + tl.log(l_safe)), mask=h_ok)


# --------------------------------------------------------------------------------------------------
# planning (host side, once per step)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile shape of one class of work items; ``block_m`` rows = tokens x G query heads."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class AttentionTuning:
    """Knobs of the planner. Defaults are a guess until measured on the GPU (scripts/bench_kernels.py).

    ``wide``: tiles for prefill chunks and prefix stacks (many query rows per tile).
    ``narrow``: tiles for decodes and chunks of at most ``narrow.block_m // G`` tokens; a decode of a GQA
    model fills only G rows, so a smaller tile wastes less tensor-core work.
    ``one_launch``: put every item in the wide class (a single launch per step, before the merge).
    ``kv_chunk``: split each item's key range into pieces of at most this many keys (split-KV); None
    picks a size so that the step has about ``programs_per_sm`` programs per SM, never below
    ``min_kv_chunk``; 0 never splits.
    ``merge_heads``: heads per program of the merge kernel (a power of two); None: 8 on the GPU (decode
    steps merge few tokens, so spread them), all heads in the interpreter (fewer programs run faster).
    """

    wide: TileConfig | None = None
    narrow: TileConfig | None = None
    one_launch: bool = False
    kv_chunk: int | None = None
    min_kv_chunk: int = 256
    programs_per_sm: int = 2
    merge_heads: int | None = None


def default_tiles(head_dim: int, group_size: int, interpret: bool,
                  dtype: torch.dtype | None = None) -> tuple[TileConfig, TileConfig]:
    """(wide, narrow) tiles for ``dtype`` (None: 16-bit). Rows must hold at least one token's G heads;
    tl.dot needs 16 or more. Registers and spills per tile on sm_90: docs/kernels.md."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    g = triton.next_power_of_2(group_size)
    if interpret:  # small tiles keep the CPU interpreter fast
        return TileConfig(max(16, g), 16), TileConfig(max(16, g), 16)
    if dtype == torch.float32:
        # float32 runs tl.dot as IEEE FMAs (no tensor cores): the 16-bit tiles below spill heavily there
        # (64x64 at d 128: ~70 KB of spills, 25-30 s of ptxas per variant). 16-key tiles do not spill
        # up to 32 rows at d 128, compile in 2-3 s, and one shape for both classes means one variant.
        tile = TileConfig(max(16, g), 16, num_warps=8 if max(16, g) >= 64 else 4)
        return tile, tile
    wide_m = max(64 if block_d >= 128 else 128, g)
    wide = TileConfig(wide_m, 64 if block_d <= 128 else 32, num_warps=8 if wide_m * block_d >= 128 * 128 else 4)
    narrow = TileConfig(max(16, g), 64 if block_d <= 128 else 32, num_warps=4)
    return wide, narrow


@dataclasses.dataclass
class WorkLaunch:
    work: torch.Tensor  # (n, WORK_FIELDS) int32 on the device
    tile: TileConfig


@dataclasses.dataclass
class AttentionPlan:
    """Device-side description of one step's attention, shared by all layers.

    ``launches``: one per tile class that has items. ``merge_*``: CSR lists of the partial rows to
    combine into each merged token (``merge_dst[i]`` takes rows ``merge_src[merge_start[i]:merge_start[i+1]]``).
    """

    num_tokens: int
    num_heads: int
    num_kv_heads: int
    tok_pos: torch.Tensor  # (T,) int32: position of each query token in its sequence
    launches: list[WorkLaunch]
    num_partials: int
    merge_dst: torch.Tensor | None
    merge_start: torch.Tensor | None
    merge_src: torch.Tensor | None
    merge_heads: int
    # host copies, for tests and for the benchmark's report
    work_host: list[np.ndarray] = dataclasses.field(default_factory=list)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one by one; splitting only needs to be exercised


@dataclasses.dataclass
class WorkItems:
    """Work items under construction (numpy int64 columns) with a flag for those needing a merge."""

    q_row: np.ndarray
    num_tokens: np.ndarray
    bt_row: np.ndarray
    kv_lo: np.ndarray
    kv_hi: np.ndarray
    partial: np.ndarray  # bool: result must be merged with others of the same tokens
    wide: np.ndarray  # bool: wide tile class
    max_pos: np.ndarray  # largest query position in the item (keys past it are never read)

    @staticmethod
    def concat(parts: list[WorkItems]) -> WorkItems:
        return WorkItems(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(WorkItems)))

    def take(self, idx: np.ndarray) -> WorkItems:
        return WorkItems(*(getattr(self, f.name)[idx] for f in dataclasses.fields(WorkItems)))


def check_lens(query_lens: Sequence[int], seq_lens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    ql = np.asarray(query_lens, dtype=np.int64)
    sl = np.asarray(seq_lens, dtype=np.int64)
    if ql.ndim != 1 or ql.shape != sl.shape:
        raise ValueError(f"query_lens and seq_lens must be 1-D of the same length, got {ql.shape} and {sl.shape}")
    if ql.size and (ql.min() < 1 or (sl < ql).any()):
        raise ValueError("every sequence needs query_len >= 1 and seq_len >= query_len")
    return ql, sl


def token_positions(ql: np.ndarray, sl: np.ndarray) -> np.ndarray:
    """Position of each query token: the last ``q`` positions of its sequence, in order."""
    T = int(ql.sum())
    seq_of_tok = np.repeat(np.arange(ql.size), ql)
    starts = np.cumsum(ql) - ql
    return (sl - ql)[seq_of_tok] + (np.arange(T) - starts[seq_of_tok])


def own_items(ql: np.ndarray, sl: np.ndarray, kv_lo: np.ndarray, partial: np.ndarray, wide_tokens: int,
              narrow_tokens: int) -> WorkItems:
    """One item per sequence with at most ``narrow_tokens`` queries, else one per ``wide_tokens`` slice."""
    starts = np.cumsum(ql) - ql
    wide = ql > narrow_tokens
    per = np.where(wide, (ql + wide_tokens - 1) // wide_tokens, 1)
    seq = np.repeat(np.arange(ql.size), per)
    k = np.arange(int(per.sum())) - np.repeat(np.cumsum(per) - per, per)  # slice index within its sequence
    step = np.where(wide[seq], wide_tokens, 0)
    q_row = starts[seq] + k * step
    n = np.where(wide[seq], np.minimum(wide_tokens, ql[seq] - k * step), ql[seq])
    max_pos = (sl - ql)[seq] + (q_row - starts[seq]) + n - 1  # positions grow along a sequence
    return WorkItems(q_row, n, seq, kv_lo[seq], sl[seq], partial[seq], wide[seq], max_pos)


def split_kv(items: WorkItems, kvh: int, block_n: int, tuning: AttentionTuning, sms: int) -> WorkItems:
    """Split long key ranges so that the step fills the GPU (flash-decoding); pieces become partials."""
    hi = np.minimum(items.kv_hi, items.max_pos + 1)  # causal: nothing past the last query is read
    length = np.maximum(hi - items.kv_lo, 0)
    chunk = tuning.kv_chunk
    if chunk == 0 or not length.size:
        return items
    if chunk is None:
        per_head = max(1, (tuning.programs_per_sm * sms + kvh - 1) // kvh)
        chunk = max(tuning.min_kv_chunk, int(-(-length.sum() // per_head)))
    chunk = -(-chunk // block_n) * block_n  # whole key blocks per piece
    pieces = np.maximum(1, -(-length // chunk))
    if (pieces == 1).all():
        return items
    idx = np.repeat(np.arange(pieces.size), pieces)
    k = np.arange(idx.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    out = items.take(idx)
    out.kv_lo = items.kv_lo[idx] + k * chunk
    out.kv_hi = np.where(k == pieces[idx] - 1, items.kv_hi[idx], out.kv_lo + chunk)
    out.partial = out.partial | (pieces[idx] > 1)
    return out


def finish_plan(items: WorkItems, tok_pos: np.ndarray, num_heads: int, kvh: int, wide: TileConfig,
                narrow: TileConfig, device: torch.device, tuning: AttentionTuning) -> AttentionPlan:
    """Assign partial rows, build the merge lists, and upload everything in one copy."""
    T = tok_pos.size
    n_part = np.where(items.partial, items.num_tokens, 0)
    part_row = np.where(items.partial, np.cumsum(n_part) - n_part, -1)
    num_partials = int(n_part.sum())
    work = np.stack([items.q_row, items.num_tokens, items.bt_row, items.kv_lo, items.kv_hi, part_row], axis=1)
    if work.size and work.max() >= 2**31:
        raise ValueError("attention plan does not fit int32 indices")
    work = work.astype(np.int32)

    # every index array goes up in one packed copy (pinned, asynchronous on CUDA); the plan holds views
    arrays: list[np.ndarray] = [tok_pos]
    classes = [(sel, tile) for sel, tile in ((work[items.wide], wide), (work[~items.wide], narrow)) if len(sel)]
    arrays += [sel.reshape(-1) for sel, _ in classes]
    merge: list[np.ndarray] = []
    if num_partials:
        pi = np.flatnonzero(items.partial)
        cnt = items.num_tokens[pi]
        offset = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)  # token index within its item
        toks = np.repeat(items.q_row[pi], cnt) + offset
        rows = np.repeat(part_row[pi], cnt) + offset
        order = np.argsort(toks, kind="stable")
        toks, rows = toks[order], rows[order]
        dst, first = np.unique(toks, return_index=True)
        merge = [dst, np.append(first, toks.size), rows]
    arrays += merge
    # each array starts on a 16-byte boundary (4 int32): Triton specialises pointer arguments on 16-byte
    # alignment, so views at offsets that change with the step's sizes would compile a second variant
    sizes = [a.size for a in arrays]
    padded = [-(-n // 4) * 4 for n in sizes]
    flat = np.zeros(sum(padded), dtype=np.int32)
    for a, start in zip(arrays, np.cumsum(padded) - padded):
        flat[start : start + a.size] = a
    packed = torch.from_numpy(flat)
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    else:
        packed = packed.to(device)
    views = [v[:n] for v, n in zip(torch.split(packed, padded), sizes)]
    tok_pos_dev = views.pop(0)
    launches = [WorkLaunch(views.pop(0).view(-1, WORK_FIELDS), tile) for _, tile in classes]
    merge_dst, merge_start, merge_src = views if merge else (None, None, None)
    return AttentionPlan(T, num_heads, kvh, tok_pos_dev, launches, num_partials, merge_dst, merge_start, merge_src,
                         resolve_merge_heads(num_heads, tuning), [sel for sel, _ in classes])


def resolve_merge_heads(num_heads: int, tuning: AttentionTuning) -> int:
    """Heads per program of the merge kernel: ``tuning.merge_heads`` (a power of two) or the default,
    at most the next power of two of ``num_heads``."""
    merge_heads = tuning.merge_heads or (triton.next_power_of_2(num_heads) if interpreting() else 8)
    if merge_heads & (merge_heads - 1):
        raise ValueError(f"merge_heads must be a power of two, got {merge_heads}")
    return min(merge_heads, triton.next_power_of_2(num_heads))


def resolve_tiles(head_dim: int, group_size: int, tuning: AttentionTuning,
                  dtype: torch.dtype | None = None) -> tuple[TileConfig, TileConfig]:
    wide, narrow = default_tiles(head_dim, group_size, interpreting(), dtype)
    wide, narrow = tuning.wide or wide, tuning.narrow or narrow
    for tile in (wide, narrow):
        if tile.block_m < max(16, group_size) or tile.block_n < 16:
            raise ValueError(f"tile {tile} too small: block_m >= max(16, G={group_size}), block_n >= 16")
        if tile.block_m & (tile.block_m - 1) or tile.block_n & (tile.block_n - 1):
            raise ValueError(f"tile {tile}: block sizes must be powers of two")
    if tuning.one_launch:
        narrow = wide
    return wide, narrow


def plan_paged_attention(
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    device: torch.device | str,
    tuning: AttentionTuning | None = None,
    dtype: torch.dtype | None = None,
) -> AttentionPlan:
    """Plan ordinary paged attention for sequences with ``query_lens[i]`` new tokens, ``seq_lens[i]`` total.

    Query rows are the sequences' tokens in order (decodes and prefill chunks mixed in any order); the
    block-table row of sequence i is i. ``dtype``: of q and the cache, picks the default tiles (None: 16-bit).
    """
    tuning = tuning or AttentionTuning()
    device = torch.device(device)
    g = check_heads(num_heads, num_kv_heads)
    ql, sl = check_lens(query_lens, seq_lens)
    wide, narrow = resolve_tiles(head_dim, g, tuning, dtype)
    tok_pos = token_positions(ql, sl)
    narrow_tokens = 0 if tuning.one_launch else narrow.block_m // g
    items = own_items(ql, sl, np.zeros_like(ql), np.zeros(ql.size, dtype=bool), wide.block_m // g, narrow_tokens)
    items = split_kv(items, num_kv_heads, wide.block_n, tuning, num_sms(device))
    return finish_plan(items, tok_pos, num_heads, num_kv_heads, wide, narrow, device, tuning)


def check_heads(num_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    return num_heads // num_kv_heads


# --------------------------------------------------------------------------------------------------
# launch
# --------------------------------------------------------------------------------------------------


def _check_inputs(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, plan: AttentionPlan) -> None:
    if q.dim() != 3 or kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"q must be (T, heads, d) and kv_cache (2, pages, page_size, kv_heads, d); got {tuple(q.shape)}, {tuple(kv_cache.shape)}")
    T, H, D = q.shape
    if (T, H) != (plan.num_tokens, plan.num_heads) or kv_cache.shape[3] != plan.num_kv_heads or kv_cache.shape[4] != D:
        raise ValueError(f"q {tuple(q.shape)} / kv_cache {tuple(kv_cache.shape)} do not match the plan "
                         f"(tokens {plan.num_tokens}, heads {plan.num_heads}, kv heads {plan.num_kv_heads})")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or kv_cache.dtype not in (q.dtype, torch.float8_e4m3fn):
        raise ValueError(f"q and kv_cache must share a float dtype (float32/float16/bfloat16), or kv_cache be float8_e4m3fn; "
                         f"got {q.dtype}, {kv_cache.dtype}")
    if q.stride(2) != 1 or kv_cache.stride(4) != 1:
        raise ValueError("q and kv_cache need a contiguous head dimension (stride 1)")
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32 or block_tables.stride(1) != 1:
        raise ValueError("block_tables must be a 2-D int32 tensor with contiguous rows")
    devices = {q.device, kv_cache.device, block_tables.device, plan.tok_pos.device}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    check_device(q.device)


def run_plan(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    plan: AttentionPlan,
    scale: float,
    *,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    kv_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of ``q`` (T, H, D) over the paged cache as planned; returns (out, lse or None).

    ``lse`` is the natural log-sum-exp of the scaled scores per (token, head), float32, -inf where a
    query saw no key. ``out`` has q's dtype. ``kv_scales``: the layer's FP8 scales
    (``batchllm.engine.kv_cache.kv_scales``; None: scale 1), read on the device; an fp8 cache's keys are
    ``stored * k_scale`` and its values ``stored * v_scale``. A 16/32-bit cache ignores them.
    """
    _check_inputs(q, kv_cache, block_tables, plan)
    T, H, D = q.shape
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if fp8:
        kv_scales = check_kv_scales(kv_scales, plan.num_kv_heads, q.device)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError("out must have q's shape and dtype and a contiguous last dimension")
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device) if return_lse else None
    lse_arg = lse if lse is not None else out  # never written when STORE_LSE is off
    rows = max(plan.num_partials, 1)
    part_o = torch.empty(rows, H, D, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(rows, H, dtype=torch.float32, device=q.device)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    upcast = q.device.type != "cuda"
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    block_d = max(16, triton.next_power_of_2(D))
    for launch in plan.launches:
        tile = launch.tile
        grid = (launch.work.shape[0], plan.num_kv_heads)
        _attn_tiles_kernel[grid](
            q, q.stride(0), q.stride(1),
            k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            block_tables, block_tables.stride(0),
            launch.work, plan.tok_pos,
            out, out.stride(0), out.stride(1),
            lse_arg, H,
            part_o, part_lse,
            kv_scales if fp8 else part_lse,  # never read without FP8_KV
            H, scale * _LOG2E,
            G=H // plan.num_kv_heads, HEAD_DIM=D, BLOCK_D=block_d,
            BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, PAGE_SIZE=kv_cache.shape[2],
            STORE_LSE=return_lse, UPCAST=upcast, DOT_PRECISION=precision, FP8_KV=fp8,
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )
    if plan.merge_dst is not None:
        block_h = plan.merge_heads
        _merge_partials_kernel[(plan.merge_dst.shape[0], triton.cdiv(H, block_h))](
            part_o, part_lse,
            plan.merge_dst, plan.merge_start, plan.merge_src,
            out, out.stride(0), out.stride(1),
            lse_arg, H,
            H,
            HEAD_DIM=D, BLOCK_H=block_h, BLOCK_D=block_d, STORE_LSE=return_lse,
            num_warps=4,
        )
    return out, lse


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    scale: float,
    *,
    return_lse: bool = False,
    tuning: AttentionTuning | None = None,
    kv_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plan and run paged attention in one call (the engine plans once per step instead)."""
    if q.dim() != 3:
        raise ValueError(f"q must be (T, heads, d), got {tuple(q.shape)}")
    if kv_cache.dim() != 5:
        raise ValueError(f"kv_cache must be (2, pages, page_size, kv_heads, d), got {tuple(kv_cache.shape)}")
    plan = plan_paged_attention(query_lens, seq_lens, num_heads=q.shape[1], num_kv_heads=kv_cache.shape[3],
                                head_dim=q.shape[2], device=q.device, tuning=tuning, dtype=q.dtype)
    return run_plan(q, kv_cache, block_tables, plan, scale, return_lse=return_lse, kv_scales=kv_scales)


# --------------------------------------------------------------------------------------------------
# torch reference
# --------------------------------------------------------------------------------------------------


def paged_attention_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    scale: float,
    kv_start: Sequence[int] | None = None,
    kv_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 reference: (out in q's dtype, lse) with keys ``[kv_start[i], seq_lens[i])`` of each sequence.

    Causal: the r-th of q new tokens sits at position seq_len - q + r and sees keys up to it. An fp8
    cache is dequantized first (``dequantized_kv``: K and V times their ``kv_scales``).
    """
    T, H, D = q.shape
    kvh, ps = kv_cache.shape[3], kv_cache.shape[2]
    g = H // kvh
    out = torch.zeros(T, H, D, dtype=torch.float32, device=q.device)
    lse = torch.full((T, H), float("-inf"), dtype=torch.float32, device=q.device)
    row = 0
    for i, (qlen, slen) in enumerate(zip(query_lens, seq_lens)):
        lo = 0 if kv_start is None else int(kv_start[i])
        n_pages = (slen + ps - 1) // ps
        pages = block_tables[i, :n_pages].long()
        k, v = dequantized_kv(kv_cache[:, pages], kv_scales)
        k = k.reshape(-1, kvh, D)[:slen].repeat_interleave(g, dim=1)
        v = v.reshape(-1, kvh, D)[:slen].repeat_interleave(g, dim=1)
        qi = q[row : row + qlen].float()
        s = torch.einsum("thd,lhd->htl", qi, k) * scale
        qpos = torch.arange(slen - qlen, slen, device=q.device)[:, None]
        kpos = torch.arange(slen, device=q.device)[None, :]
        visible = (kpos <= qpos) & (kpos >= lo)
        s = s.masked_fill(~visible[None], float("-inf"))
        m = s.amax(-1, keepdim=True)
        any_visible = torch.isfinite(m)
        p = torch.exp(s - torch.where(any_visible, m, torch.zeros_like(m)))
        l = p.sum(-1, keepdim=True)
        o = torch.einsum("htl,lhd->thd", p / torch.where(l > 0, l, torch.ones_like(l)), v)
        out[row : row + qlen] = o
        lse[row : row + qlen] = torch.where(l[..., 0] > 0, (m + torch.log(l))[..., 0], float("-inf")).T
        row += qlen
    return out.to(q.dtype), lse


def dequantized_kv(kv: torch.Tensor, kv_scales: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of ``kv`` (2, ..., kv_heads, d), a slice of a cache, in float32: an fp8 cache's values times
    the per-head ``kv_scales`` (None: scale 1), any other cache's values as they are."""
    k, v = kv[0].float(), kv[1].float()
    if kv.dtype == torch.float8_e4m3fn and kv_scales is not None:
        k = k * kv_scales[0][:, None]
        v = v * kv_scales[1][:, None]
    return k, v
