"""Token sampling for one engine step, with vLLM v1's semantics and a batch-independent RNG.

Order of operations (as vLLM v1's ``Sampler``):

1. raw log-probs (``log_softmax`` of the model's logits, before any processing) if any row asked;
2. ``min_tokens``: the row's EOS and stop token ids are banned (-inf) while it has generated fewer;
3. penalties (``penalties.py``): repetition (tokens seen in prompt or output: ``logit > 0 -> logit / r`` else
   ``logit * r``), frequency (``- f * count in output``), presence (``- p * (count > 0)``);
4. greedy rows (temperature < 1e-5) take the argmax; the other rows divide by temperature, apply
   min_p, then top_k, then top_p, then sample (``truncate`` states the kept sets exactly).

Every truncation keeps the tokens at or above a value threshold, so tied logits are always kept or
dropped together. Two formulations differ from vLLM's only where vLLM's result depends on rounding
or on the order a sort leaves tied values in, so that a sort-free kernel can match them exactly:
min_p compares ``x - max(x) < log(min_p)`` (vLLM: ``probs < max(probs) * min_p``, the same set in
exact arithmetic) and top_p keeps every token tied with the last one it keeps (vLLM keeps whichever
of the tied tokens the sort put last).

Randomness: a sampled token depends only on (seed, step, logits) of its row, never on the batch's
composition or order or on any device RNG state. Row ``r`` draws one uniform per vocabulary id ``v``
from a counter-based hash, ``u = uniform(murmur3_32(seed_lo, seed_hi, step, v))`` with 23 random
bits, and takes ``argmax(probs / -log(u))``: the exponential race, which samples exactly from
``probs`` (the Gumbel-max trick in probability space). The hash is plain integer arithmetic, so CPU,
CUDA and the Triton kernel produce the same uniforms bit for bit (``sampler_random``).

Backends: on CUDA the random rows are sampled by the sort-free Triton kernel
``batchllm.kernels.sampling.sample_tokens`` (one program per row, same kept sets, same uniforms);
the torch code here is its reference and the CPU path. ``sample(..., backend=)`` chooses per call
("auto" by default; "torch" or "triton" force one), and the engine passes its ``sampler_backend``.
Penalties and min_tokens bans run in torch on either backend (``apply_penalties``).

Nothing here reads a device tensor back to the host: every shape and index set is decided from the
rows in ``SamplingBatch.build``, so ``sample`` only enqueues work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from batchllm.engine.penalties import Penalties
from batchllm.engine.sampler_random import exponential_race, rng_words
from batchllm.sampling_params import SamplingParams

__all__ = [
    "SAMPLER_BACKENDS",
    "SamplerOutput",
    "SamplingBatch",
    "SamplingRow",
    "apply_penalties",
    "sample",
    "truncate",
]

# "auto": the Triton kernel for CUDA logits, torch otherwise; "torch" / "triton" force one.
SAMPLER_BACKENDS = ("auto", "torch", "triton")


@dataclass
class SamplingRow:
    """One sequence that samples a token this step.

    ``seed`` is the 64-bit per-sample seed (the engine derives it; any int, taken modulo 2**64);
    ``step`` is how many tokens the sample has generated so far (0 for the first). ``eos_ids`` are
    the tokens that end generation; ``min_tokens`` bans them and ``params.stop_token_ids`` until
    ``len(output_ids)`` reaches it (ignore_eos changes nothing here: the engine simply does not stop).
    ``grammar_ended``: the row's structured-output grammar admits nothing but EOS (its mask leaves EOS
    only), so ``min_tokens`` bans nothing there: a constrained output may end before ``min_tokens``.
    """

    params: SamplingParams
    seed: int
    step: int
    prompt_ids: Sequence[int] | np.ndarray
    output_ids: Sequence[int]
    eos_ids: frozenset[int] = frozenset()
    grammar_ended: bool = False


@dataclass
class SamplingBatch:
    """The rows of one step as device tensors; built once per step by ``build``.

    Per-random-row tensors (temperature, seeds, top_k, ...) are indexed by position in
    ``random_rows``, not by batch row. Optional parts are None when no row needs them, so ``sample``
    skips that work entirely.
    """

    num_rows: int
    vocab_size: int
    random_rows: torch.Tensor | None  # (R,) batch rows that sample; None when every row is greedy
    all_random: bool  # random_rows == arange(num_rows): skip the gather/scatter
    temperature: torch.Tensor | None  # (R, 1) float32
    seed_lo: torch.Tensor | None  # (R,) int64 in [0, 2**32)
    seed_hi: torch.Tensor | None  # (R,)
    step: torch.Tensor | None  # (R,)
    log_min_p: torch.Tensor | None  # (R, 1) float32, log(min_p); -inf where min_p is 0
    top_k: torch.Tensor | None  # (R,) int64, vocab_size where disabled
    top_k_max: int  # largest enabled top_k (the width of the topk() call)
    top_p: torch.Tensor | None  # (R,) float32, 1.0 where disabled
    ban_rows: torch.Tensor | None  # min_tokens bans as (row, token) pairs
    ban_cols: torch.Tensor | None
    penalties: Penalties | None
    max_logprobs: int | None  # largest requested ``logprobs``; None when no row asked

    @classmethod
    def build(cls, rows: Sequence[SamplingRow], vocab_size: int, device) -> SamplingBatch:
        """Gather the per-row parameters into tensors on ``device``.

        Raises ValueError for an empty batch, a non-positive vocab_size, or prompt/output ids outside
        ``[0, vocab_size)`` in a row with penalties. EOS/stop ids outside the vocabulary are ignored
        (the model can never produce them, so there is nothing to ban).
        """
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if not rows:
            raise ValueError("a sampling batch needs at least one row")
        device = torch.device(device)

        def put(data, dtype) -> torch.Tensor:
            return _to_device(torch.as_tensor(data, dtype=dtype), device)

        random = _random_params(rows, vocab_size, put)
        ban_rows, ban_cols = _min_tokens_bans(rows, vocab_size, put)
        pen = [i for i, r in enumerate(rows) if r.params.has_penalties]
        penalties = None
        if pen:
            penalties = Penalties.build(pen, [rows[i].params for i in pen], [rows[i].prompt_ids for i in pen],
                                        [rows[i].output_ids for i in pen], vocab_size, put)
        wanted = [r.params.logprobs for r in rows if r.params.logprobs is not None]
        return cls(
            num_rows=len(rows),
            vocab_size=vocab_size,
            **random._asdict(),
            ban_rows=ban_rows,
            ban_cols=ban_cols,
            penalties=penalties,
            max_logprobs=max(wanted) if wanted else None,
        )


class _RandomParams(NamedTuple):
    """``SamplingBatch``'s per-random-row fields (see there); all None / False / 0 when every row is greedy."""

    random_rows: torch.Tensor | None
    all_random: bool
    temperature: torch.Tensor | None
    seed_lo: torch.Tensor | None
    seed_hi: torch.Tensor | None
    step: torch.Tensor | None
    log_min_p: torch.Tensor | None
    top_k: torch.Tensor | None
    top_k_max: int
    top_p: torch.Tensor | None


def _random_params(rows: Sequence[SamplingRow], vocab_size: int,
                   put: Callable[[object, torch.dtype], torch.Tensor]) -> _RandomParams:
    """The random (non-greedy) rows of a batch and their parameters as tensors (``put``: host data ->
    the batch's device); a parameter no row uses is None."""
    V = vocab_size
    rand = [i for i, r in enumerate(rows) if not r.params.greedy]
    random_rows = temperature = seed_lo = seed_hi = step = log_min_p = top_k = top_p = None
    top_k_max = 0
    if rand:
        rp = [rows[i].params for i in rand]
        ks = [min(p.top_k, V) if p.top_k > 0 else V for p in rp]
        # One transfer for all integer columns: seed halves, step, top_k.
        packed = put([[*rng_words(rows[i].seed, rows[i].step), k] for i, k in zip(rand, ks)], torch.int64)
        seed_lo, seed_hi, step = packed[:, 0], packed[:, 1], packed[:, 2]
        # log(min_p) in float64, rounded once to float32: the same threshold on every backend.
        log_min_p_host = [math.log(p.min_p) if p.min_p > 0.0 else -math.inf for p in rp]
        floats = put([[p.temperature, lm, p.top_p] for p, lm in zip(rp, log_min_p_host)], torch.float32)
        temperature = floats[:, 0:1]
        if any(p.min_p > 0.0 for p in rp):
            log_min_p = floats[:, 1:2]
        if any(p.top_p < 1.0 for p in rp):
            top_p = floats[:, 2]
        enabled = [k for k in ks if k < V]
        if enabled:
            top_k, top_k_max = packed[:, 3], max(enabled)
        random_rows = put(rand, torch.int64)
    return _RandomParams(random_rows, len(rand) == len(rows), temperature, seed_lo, seed_hi, step, log_min_p,
                         top_k, top_k_max, top_p)


def _min_tokens_bans(rows: Sequence[SamplingRow], vocab_size: int,
                     put: Callable[[object, torch.dtype], torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """min_tokens: the (row, token) pairs to ban, EOS and stop ids while the row is short of its
    minimum (unless its grammar allows EOS only: the ban would leave no token); (None, None) if none."""
    bans = [
        (i, t)
        for i, r in enumerate(rows)
        if len(r.output_ids) < r.params.min_tokens and not r.grammar_ended
        for t in sorted(set(r.eos_ids) | set(r.params.stop_token_ids))
        if 0 <= t < vocab_size
    ]
    if not bans:
        return None, None
    pairs = put(bans, torch.int64)
    return pairs[:, 0], pairs[:, 1]


@dataclass
class SamplerOutput:
    """``token_ids`` (B,) int64. ``logprobs`` (B,) float32: the raw log-prob (log_softmax of the
    unprocessed logits, as vLLM v1) of each row's sampled token, present when any row asked.
    ``top_logprobs``: (ids, values), each (B, K) with K the largest requested ``logprobs``; None when
    no row asked or K == 0. Rows that did not ask get values too; the caller drops them."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor | None
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None


def sample(logits: torch.Tensor, batch: SamplingBatch, backend: str = "auto") -> SamplerOutput:
    """Sample one token per row of ``logits`` (B, V); any float dtype (computed in float32).

    ``backend``: one of ``SAMPLER_BACKENDS``: "auto" (the Triton kernel for CUDA logits when Triton
    imports, torch otherwise), "torch" or "triton" (forced).
    Both backends give the same tokens (see ``batchllm.kernels.sampling`` for the exact statement).
    ``logits`` is not modified. Raises ValueError when its shape does not match ``batch`` or the
    backend is unknown.
    """
    if logits.dim() != 2 or tuple(logits.shape) != (batch.num_rows, batch.vocab_size):
        raise ValueError(f"logits must have shape ({batch.num_rows}, {batch.vocab_size}), got {tuple(logits.shape)}")
    use_kernel = batch.random_rows is not None and _use_kernel(backend, logits)
    # The kernel converts while it loads, so without penalties or log-probs it reads the model's
    # logits directly (no float32 copy of the whole batch).
    if not use_kernel or batch.max_logprobs is not None or batch.ban_rows is not None or batch.penalties is not None:
        logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.max_logprobs is not None else None
    logits = apply_penalties(logits, batch)

    if batch.random_rows is None:
        token_ids = logits.argmax(dim=-1)
    elif use_kernel:
        token_ids = _sample_with_kernel(logits, batch)
    else:
        x = logits if batch.all_random else logits.index_select(0, batch.random_rows)
        x = truncate(x / batch.temperature, batch.log_min_p, batch.top_k, batch.top_k_max, batch.top_p)
        sampled = exponential_race(x.softmax(dim=-1), batch.seed_lo, batch.seed_hi, batch.step)
        if batch.all_random:
            token_ids = sampled
        else:
            token_ids = logits.argmax(dim=-1).index_copy(0, batch.random_rows, sampled)

    logprobs = top = None
    if raw_logprobs is not None:
        logprobs = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        if batch.max_logprobs > 0:
            values, ids = raw_logprobs.topk(batch.max_logprobs, dim=-1)
            top = (ids, values)
    return SamplerOutput(token_ids=token_ids, logprobs=logprobs, top_logprobs=top)


def _use_kernel(backend: str, logits: torch.Tensor) -> bool:
    """Whether the random rows go to the Triton kernel: forced by "triton", never with "torch", and
    with "auto" for CUDA logits when Triton imports (a CUDA machine without it keeps working)."""
    if backend not in SAMPLER_BACKENDS:
        raise ValueError(f"sampler backend must be one of {SAMPLER_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return logits.is_cuda and _kernel_module() is not None
    return backend == "triton"


_KERNEL_MODULE: object = None  # None: not tried yet; False: Triton missing


def _kernel_module():
    """``batchllm.kernels.sampling``, imported on first use (importing Triton and defining the kernel
    takes seconds, which a CPU-only run never needs); None when Triton is missing."""
    global _KERNEL_MODULE
    if _KERNEL_MODULE is None:
        try:
            from batchllm.kernels import sampling as module
        except ImportError:
            module = False
        _KERNEL_MODULE = module
    return _KERNEL_MODULE or None


def _sample_with_kernel(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Tokens for every row: the kernel writes the random rows in place; greedy rows keep the argmax."""
    module = _kernel_module()
    if module is None:
        raise RuntimeError("the triton sampler backend needs triton installed")
    if batch.all_random:
        token_ids = torch.empty(batch.num_rows, dtype=torch.int64, device=logits.device)
    else:
        token_ids = logits.argmax(dim=-1)
    return module.sample_tokens(
        logits,
        batch.random_rows,
        batch.temperature,
        batch.seed_lo,
        batch.seed_hi,
        batch.step,
        top_k=batch.top_k,
        top_p=batch.top_p,
        log_min_p=batch.log_min_p,
        out=token_ids,
    )


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The min_tokens bans and the repetition/frequency/presence penalties (vLLM v1's
    ``apply_penalties``), out of place: what greedy rows take the argmax of."""
    if batch.ban_rows is not None:
        logits = logits.index_put((batch.ban_rows, batch.ban_cols), logits.new_full((), -math.inf))
    if batch.penalties is None:
        return logits
    return batch.penalties.apply(logits, batch.vocab_size)


def truncate(
    x: torch.Tensor,
    log_min_p: torch.Tensor | None = None,
    top_k: torch.Tensor | None = None,
    top_k_max: int = 0,
    top_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """min_p, then top_k, then top_p on temperature-scaled logits ``x`` (R, V); dropped tokens -> -inf.

    Per row (parameters (R, 1) or (R,); None disables a step for every row), with ``m = max(x)``:

    * min_p drops ``x`` with ``x - m < log_min_p`` (float32 subtraction, float32 threshold);
    * top_k keeps ``x >= t_k``, ``t_k`` the k-th largest remaining value (counted with
      multiplicity); ``k >= V`` disables it. ``top_k_max`` is the largest enabled k (no host sync);
    * top_p, on the probabilities renormalised over what is left: keeps ``x >= t_p``, ``t_p`` the
      largest value whose tokens and all above it have mass >= p, i.e. a token stays iff the mass
      of the tokens strictly above its value is < p (every token tied with the last one kept stays).

    The last two are value thresholds, so tied logits share their fate: the Triton kernel finds the
    same thresholds without sorting.
    """
    if log_min_p is not None:
        x = x.masked_fill(x - x.amax(dim=-1, keepdim=True) < log_min_p.reshape(-1, 1), -math.inf)
    if top_p is not None:
        return _top_k_top_p_sorted(x, top_k, top_p.reshape(-1))
    if top_k is not None:
        return _top_k_only(x, top_k.reshape(-1), top_k_max)
    return x


def _top_k_only(x: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    """Per-row top_k without a full sort: keep logits >= the row's k-th largest (ties kept, as vLLM)."""
    V = x.shape[-1]
    kth = x.topk(k_max, dim=-1).values.gather(1, (k.clamp(max=k_max) - 1).unsqueeze(1))
    kth = torch.where((k >= V).unsqueeze(1), -math.inf, kth)
    return x.masked_fill(x < kth, -math.inf)


def _top_k_top_p_sorted(x: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
    """vLLM v1's ``apply_top_k_top_p`` (ascending sort, top_k, then top_p on the renormalised rest),
    with top_p's cut widened to whole tie groups.

    vLLM drops the sorted tokens whose ascending cumulative probability is <= 1 - p (the top token
    always stays). The cumulative sum never decreases, so the dropped tokens are a prefix of the
    sorted row and the first kept value is the cut ``t_p``; keeping every token >= t_p keeps the
    tokens tied with it that the sort happened to place in the dropped prefix.
    """
    x_sort = x.sort(dim=-1, descending=False).values
    cut = torch.full_like(x[:, :1], -math.inf)
    if k is not None:
        cut = x_sort.gather(1, (x_sort.shape[-1] - k.clamp(max=x_sort.shape[-1])).unsqueeze(1))  # k >= V: no cut
        x_sort = x_sort.masked_fill(x_sort < cut, -math.inf)
    cum = x_sort.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= 1.0 - p.unsqueeze(1)
    drop[:, -1] = False
    cut = torch.maximum(cut, x_sort.gather(1, drop.sum(dim=-1, keepdim=True)))
    return x.masked_fill(x < cut, -math.inf)


# ---- host-side helpers -------------------------------------------------------------------------


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Pinned memory makes the host-to-device copy asynchronous, so building a batch never waits
    # for the GPU to drain its queue.
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
