"""Sort-free sampling of a step's random rows: temperature, min-p, top-k, top-p, exponential race.

The semantics are ``batchllm.engine.sampler``'s (its torch code is the reference: ``truncate`` for the
kept sets, ``batchllm.engine.sampler_random``'s ``exponential_race`` and ``noise_uniforms`` for the draw); this kernel finds the same kept
sets without sorting and draws the same uniforms, so for the same rows it returns the same tokens.

One program per row, a fixed small number of passes over the row (no sort, no (R, V) temporaries):

1. ``x = logit / temperature`` (IEEE division, as torch), the row's max ``m`` and its smallest and
   largest value.
2. top-k: the k-th largest value ``t_k`` of the whole row (counted with multiplicity) by a
   multi-pivot search (below) on the count of tokens ``>= t``. The reference takes the k-th largest
   after min-p, but min-p keeps every token above its lowest survivor, so that is ``t_k`` when at
   least k tokens survive and -inf (no cut) otherwise: either way ``kept = min-p & x >= t_k``.
3. top-p: one pass for the mass ``Z`` of the tokens min-p and top-k keep (weights ``exp(x - m)``),
   then the same search for the largest value ``t_p`` whose tokens and all above carry mass >= p Z.
4. the draw: ``argmax over kept tokens of exp(x - m) / -log(u)``, ``u`` the sampler's murmur3
   uniform of (seed, step, token id); dropped tokens score 0, as their probability 0 does in torch.

Search. Floats are mapped to int keys that order like the floats (the bits, with the magnitude bits of
negatives flipped; -0.0 maps to +0.0's key). ``F(t)`` (count or mass of kept tokens with key >= t)
never increases with t, and the answer is the largest token key with ``F >= target``. Each pass
evaluates F at ``NP`` evenly spaced keys inside the bracket ``[lo, hi)`` (one read of the row, an
(BLOCK, NP) comparison per block), then narrows the bracket to the last pivot that meets the target
and the first that does not, snapping both ends to the nearest token keys inside. 32-bit keys and
NP = 16 pivots (4 bits a pass) bound it at 8 passes; snapping usually ends it sooner (the bracket
closes as soon as it holds one distinct value): on model-like rows of 49k and 128k tokens, top-k=50
took 4-5 passes and top-p=0.9 4-7 (float32) or 4 (bfloat16), so a row with both costs ~15 reads.
Every decision stays on the device: no host sync, one launch for all rows. (FlashInfer's and
vLLM's Qrita kernels search pivots the same way; here the pivots live in key space, which makes the
search exact and bounded.)

Tie semantics (identical to ``truncate``): every cut is a value threshold (keep ``x >= t``), so tied
logits are kept or dropped together: top-k keeps all tokens tied with the k-th; top-p keeps a token
iff the mass of the tokens strictly above its value is < p (all of a tie group or none); min-p drops
``x - m < log_min_p`` with the same float32 operands as torch.

Exactness. Temperature scaling, min-p, top-k (pure comparisons of identically computed float32
values) and the uniforms (integer arithmetic) are bit-identical to the torch reference. Two steps use
``exp`` and float sums, whose rounding differs between any two implementations (torch's CPU and CUDA
paths differ too): the top-p cut can differ only when the mass above a tie group lies within float32
rounding (~1e-6 relative) of ``p Z`` (either answer is then correct; it changes the token only if a
token of that group wins the race), and the draw only when two tokens' race scores are within a few
ulps (probability ~1e-6 per row). The tests check both margins on their data.

Penalties and min_tokens bans are not here: they are scatters over each row's seen-token lists, run
in torch on the GPU (``sampler.apply_penalties``, already vectorised and sync-free, and only for the
rows that have them); the kernel then reads the penalised float32 logits. Greedy rows stay with
torch's argmax; rows are addressed through ``rows`` so the random rows are read in place.
"""

from __future__ import annotations

import torch
from batchllm.kernels.runtime import check_device, jit, load_triton

triton, tl = load_triton()  # Triton in the mode kernels/runtime.py decided (before Triton loads)

__all__ = ["sample_tokens"]

# Keys of non-NaN floats lie in [key(-inf), key(+inf)] = [-0x7F800001, 0x7F800000], so the int32
# extremes are free to serve as sentinels. (Compiled kernels may only read constexpr globals.)
_KEY_ABOVE = tl.constexpr((1 << 31) - 1)  # above every float32 key
_KEY_BELOW = tl.constexpr(-(1 << 31))  # below every float32 key


@jit
def _float_key(x):
    """int32 key ordered like the float32 ``x`` (NaN aside); +0.0 and -0.0 share a key."""
    b = x.to(tl.int32, bitcast=True)
    key = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)
    return tl.where(x == 0.0, 0, key)


@jit
def _key_float(key):
    """The float32 whose key is ``key`` (inverse of ``_float_key``)."""
    k = key.to(tl.int32)
    return tl.where(k >= 0, k, k ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@jit
def _load_scaled(row_ptr, offs, V, temp):
    """Logits / temperature as float32, -inf past the row's end; and their keys."""
    raw = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    # div_rn: IEEE division like torch's; a plain '/' compiles to an approximate one on CUDA.
    x = tl.div_rn(raw, temp)
    return x, _float_key(x)


@jit
def _kept_by_min_p(x, m, log_min_p, HAS_MIN_P: tl.constexpr):
    """Not dropped by min-p: the negation of torch's ``x - m < log_min_p`` (same float32 operands)."""
    keep = tl.full(x.shape, True, tl.int1)
    if HAS_MIN_P:
        keep = ~((x - m) < log_min_p)
    return keep


# ---- the counter-based RNG (murmur3_x86_32, as batchllm.engine.sampler_random._uniforms) -----------------
# uint32 arithmetic wraps modulo 2**32 in Triton (and in the interpreter's numpy), which is exactly
# murmur3's arithmetic; the torch reference emulates it in int64.


@jit
def _rotl32(x, r: tl.constexpr):
    return (x << r) | (x >> (32 - r))


@jit
def _mix_k(k):
    return _rotl32(k * 0xCC9E2D51, 15) * 0x1B873593


@jit
def _murmur_block(h, k):
    return _rotl32(h ^ _mix_k(k), 13) * 5 + 0xE6546B64


@jit
def _row_hash(seed_lo, seed_hi, step):
    """murmur3 state after the row's three words (the part every token id of the row shares)."""
    h = tl.zeros([], tl.uint32)
    h = _murmur_block(h, seed_lo.to(tl.uint32))
    h = _murmur_block(h, seed_hi.to(tl.uint32))
    return _murmur_block(h, step.to(tl.uint32))


@jit
def _uniform(h_row, offs):
    """float32 uniforms in (0, 1) for token ids ``offs``: the last block, length, fmix, top 23 bits."""
    h = _murmur_block(h_row, offs.to(tl.uint32)) ^ 16
    h = (h ^ (h >> 16)) * 0x85EBCA6B
    h = (h ^ (h >> 13)) * 0xC2B2AE35
    h = h ^ (h >> 16)
    return ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)


# ---- the cut search ---------------------------------------------------------------------------------


@jit
def _search_cut(row_ptr, V, temp, m, log_min_p, floor_key, lo, hi, target,
                MASS: tl.constexpr, HAS_MIN_P: tl.constexpr, BLOCK: tl.constexpr, NP: tl.constexpr):
    """The largest token key ``t`` with ``F(t) >= target``.

    ``F(t)``: over the candidates (tokens with key >= ``floor_key`` that min-p keeps), the count
    (MASS false) or the mass ``exp(x - m)`` (MASS true) of those with key >= t. Contract: ``lo`` is
    a candidate's key and the answer is >= lo (F(lo) >= target, or lo is returned); every candidate
    key is < ``hi``; target > 0. Returns ``lo`` once the bracket [lo, hi) holds one key.
    """
    j = tl.arange(0, NP).to(tl.int64)
    floor32 = floor_key.to(tl.int32)
    while hi - lo > 1:
        # NP pivots in (lo, hi); offsets (span * (j+1)) // (NP+1) < span, and the last is >= 1 for
        # span >= 2, so every pass moves one end of the bracket.
        # The bracket arithmetic is int64 (hi may be 2**31 - 1 + 1); pivots fit int32, like the keys.
        piv = (lo + ((hi - lo) * (j + 1)) // (NP + 1)).to(tl.int32)
        mass = tl.zeros([NP], tl.float32)
        first_above = tl.full([NP], _KEY_ABOVE, tl.int32)  # smallest candidate key >= pivot
        last_below = tl.full([NP], _KEY_BELOW, tl.int32)  # largest candidate key < pivot
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x, key = _load_scaled(row_ptr, offs, V, temp)
            cand = (offs < V) & (key >= floor32) & _kept_by_min_p(x, m, log_min_p, HAS_MIN_P)
            if MASS:
                w = tl.exp(x - m)
            else:
                w = tl.full([BLOCK], 1.0, tl.float32)  # counts stay exact in float32 below 2**24
            ge = key[:, None] >= piv[None, :]
            sel = ge & cand[:, None]
            mass += tl.sum(tl.where(sel, w[:, None], 0.0), axis=0)
            first_above = tl.minimum(first_above, tl.min(tl.where(sel, key[:, None], _KEY_ABOVE), axis=0))
            below = (~ge) & cand[:, None]
            last_below = tl.maximum(last_below, tl.max(tl.where(below, key[:, None], _KEY_BELOW), axis=0))
        ok = mass >= target  # a prefix of the pivots: F never increases with t
        # lo -> the last passing pivot, snapped up to its first token (F is unchanged in between);
        # hi -> the first failing pivot, snapped down to just above the last token below it.
        new_lo = tl.max(tl.where(ok, first_above.to(tl.int64), lo), axis=0)
        new_hi = tl.min(tl.where(ok, hi, last_below.to(tl.int64) + 1), axis=0)
        lo = new_lo
        hi = tl.maximum(new_hi, new_lo + 1)  # guards the bracket should rounding break F's order
    return lo


@jit
def _kept_mass(row_ptr, V, temp, m, log_min_p, floor_key,
               HAS_MIN_P: tl.constexpr, BLOCK: tl.constexpr):
    """Mass ``sum exp(x - m)`` of the tokens kept so far (key >= floor_key, min-p) and their smallest key."""
    total = tl.zeros([BLOCK], tl.float32)
    low = tl.full([BLOCK], _KEY_ABOVE, tl.int32)
    floor32 = floor_key.to(tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x, key = _load_scaled(row_ptr, offs, V, temp)
        cand = (offs < V) & (key >= floor32) & _kept_by_min_p(x, m, log_min_p, HAS_MIN_P)
        total += tl.where(cand, tl.exp(x - m), 0.0)
        low = tl.minimum(low, tl.where(cand, key, _KEY_ABOVE))
    return tl.sum(total, axis=0), tl.min(low, axis=0).to(tl.int64)


@jit
def _sampling_kernel(
    logits_ptr, stride_row, rows_ptr, out_ptr, stride_out, cut_ptr,
    temp_ptr, s_temp, seed_lo_ptr, s_lo, seed_hi_ptr, s_hi, step_ptr, s_step,
    top_k_ptr, s_k, top_p_ptr, s_p, log_min_p_ptr, s_mp,
    V,
    HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr, HAS_MIN_P: tl.constexpr,
    BLOCK: tl.constexpr, NP: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + r)
    row_ptr = logits_ptr + row * stride_row
    temp = tl.load(temp_ptr + r * s_temp)
    log_min_p = 0.0
    if HAS_MIN_P:
        log_min_p = tl.load(log_min_p_ptr + r * s_mp)

    # pass 1: max value and the key range of the row
    vmax = tl.full([BLOCK], float("-inf"), tl.float32)
    kmin = tl.full([BLOCK], _KEY_ABOVE, tl.int32)
    kmax = tl.full([BLOCK], _KEY_BELOW, tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x, key = _load_scaled(row_ptr, offs, V, temp)
        vmax = tl.maximum(vmax, x)
        kmin = tl.minimum(kmin, tl.where(offs < V, key, _KEY_ABOVE))
        kmax = tl.maximum(kmax, tl.where(offs < V, key, _KEY_BELOW))
    m = tl.max(vmax, axis=0)
    lo = tl.min(kmin, axis=0).to(tl.int64)  # the search brackets are int64 scalars
    hi = tl.max(kmax, axis=0).to(tl.int64) + 1

    # min-p commutes with the top-k cut of the unmasked row (module docstring, step 2), so t_k is
    # searched over the whole row.
    cut = lo
    if HAS_TOP_K:
        k = tl.load(top_k_ptr + r * s_k)
        if k < V:
            cut = _search_cut(row_ptr, V, temp, m, log_min_p, lo, lo, hi, k.to(tl.float32),
                              False, False, BLOCK, NP)
    if HAS_TOP_P:
        p = tl.load(top_p_ptr + r * s_p)
        if p < 1.0:
            z, low = _kept_mass(row_ptr, V, temp, m, log_min_p, cut, HAS_MIN_P, BLOCK)
            cut = _search_cut(row_ptr, V, temp, m, log_min_p, cut, low, hi, p * z,
                              True, HAS_MIN_P, BLOCK, NP)
    tl.store(cut_ptr + r, _key_float(cut))

    # the draw: exponential race over the kept tokens, first index among equal scores
    h_row = _row_hash(tl.load(seed_lo_ptr + r * s_lo), tl.load(seed_hi_ptr + r * s_hi),
                      tl.load(step_ptr + r * s_step))
    cut32 = cut.to(tl.int32)
    best = tl.full([], -1.0, tl.float32)
    best_id = tl.zeros([], tl.int64)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x, key = _load_scaled(row_ptr, offs, V, temp)
        kept = (key >= cut32) & _kept_by_min_p(x, m, log_min_p, HAS_MIN_P)
        expo = -tl.log(_uniform(h_row, offs))
        score = tl.where(kept, tl.div_rn(tl.exp(x - m), expo), 0.0)
        score = tl.where(offs < V, score, -1.0)
        block_best = tl.max(score, axis=0)
        block_id = tl.argmax(score, axis=0).to(tl.int64) + start
        take = block_best > best  # strict: an earlier block keeps a tie
        best_id = tl.where(take, block_id, best_id)
        best = tl.where(take, block_best, best)
    tl.store(out_ptr + row * stride_out, best_id)


# ---- launcher ---------------------------------------------------------------------------------------


def _row_param(t: torch.Tensor | None, name: str, R: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """A per-row parameter as a 1-D (R,) view (an (R, 1) column is accepted, as the sampler stores)."""
    if t is None:
        return None
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1 or t.shape[0] != R:
        raise ValueError(f"{name} must have shape ({R},), got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, logits on {device}")
    return t


def sample_tokens(
    logits: torch.Tensor,
    rows: torch.Tensor,
    temperature: torch.Tensor,
    seed_lo: torch.Tensor,
    seed_hi: torch.Tensor,
    step: torch.Tensor,
    *,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    log_min_p: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    return_cut: bool = False,
    block: int | None = None,
    pivots: int = 16,
):
    """Sample ``out[rows[r]]`` from ``logits[rows[r]]`` for each r; returns ``out`` (B,) int64.

    ``logits`` (B, V): float32 / bfloat16 / float16 with unit column stride (already penalised).
    ``rows`` (R,) int64, distinct, in [0, B). Per-row parameters, (R,) or (R, 1), any stride:
    ``temperature`` float32 > 0; ``seed_lo``, ``seed_hi``, ``step`` int64 in [0, 2**32) (the halves
    of the 64-bit seed and the step, as ``SamplingBatch`` holds them); ``top_k`` int64 (k >= V
    disables, >= 1); ``top_p`` float32 in (0, 1] (1 disables); ``log_min_p`` float32 (-inf disables).
    None disables a filter for every row. ``out`` (B,) int64: rows not in ``rows`` are left as they
    are (a new zero tensor when None). ``return_cut``: also return the (R,) float32 value threshold
    of each row's top-k/top-p cut (kept: ``x >= cut`` and min-p), for tests.

    Enqueues one launch and nothing else (no host sync). Raises ValueError on a bad shape, dtype,
    device or stride, and for CPU tensors outside Triton's interpreter. A row whose logits are all
    -inf or hold NaN has no defined result.
    """
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be a (B, V) float32/bfloat16/float16 tensor, got {tuple(logits.shape)} {logits.dtype}")
    if logits.stride(1) != 1:
        raise ValueError("logits must have unit column stride")
    check_device(logits.device)
    if pivots < 2 or pivots & (pivots - 1):
        raise ValueError(f"pivots must be a power of two >= 2, got {pivots}")
    B, V = logits.shape
    if V >= 1 << 24:
        raise ValueError(f"vocab size {V} too large (top-k counts are exact float32 below 2**24)")
    dev = logits.device
    if rows.dim() != 1 or rows.dtype != torch.int64 or rows.device != dev:
        raise ValueError(f"rows must be a 1-D int64 tensor on {dev}")
    R = rows.shape[0]
    temperature = _row_param(temperature, "temperature", R, torch.float32, dev)
    seed_lo = _row_param(seed_lo, "seed_lo", R, torch.int64, dev)
    seed_hi = _row_param(seed_hi, "seed_hi", R, torch.int64, dev)
    step = _row_param(step, "step", R, torch.int64, dev)
    top_k = _row_param(top_k, "top_k", R, torch.int64, dev)
    top_p = _row_param(top_p, "top_p", R, torch.float32, dev)
    log_min_p = _row_param(log_min_p, "log_min_p", R, torch.float32, dev)
    if out is None:
        out = torch.zeros(B, dtype=torch.int64, device=dev)
    elif out.dim() != 1 or out.shape[0] != B or out.dtype != torch.int64 or out.device != dev:
        raise ValueError(f"out must be a ({B},) int64 tensor on {dev}")
    cut = torch.empty(R, dtype=torch.float32, device=dev)
    if R and V:
        if block is None:
            # CPU (interpreter): few wide blocks, numpy does the work; GPU: a tile that fits registers
            # next to the (BLOCK, pivots) search temporaries.
            block = min(4096 if dev.type != "cuda" else 512, triton.next_power_of_2(V))
        dummy = temperature
        _sampling_kernel[(R,)](
            logits, logits.stride(0), rows, out, out.stride(0), cut,
            temperature, temperature.stride(0), seed_lo, seed_lo.stride(0), seed_hi, seed_hi.stride(0),
            step, step.stride(0),
            top_k if top_k is not None else dummy, top_k.stride(0) if top_k is not None else 0,
            top_p if top_p is not None else dummy, top_p.stride(0) if top_p is not None else 0,
            log_min_p if log_min_p is not None else dummy, log_min_p.stride(0) if log_min_p is not None else 0,
            V,
            HAS_TOP_K=top_k is not None, HAS_TOP_P=top_p is not None, HAS_MIN_P=log_min_p is not None,
            BLOCK=block, NP=pivots, num_warps=8 if dev.type == "cuda" else 1,
        )
    return (out, cut) if return_cut else out

