"""The sort-free Triton sampling kernel against the engine sampler's torch code (same kept sets, same tokens).

Without CUDA the kernel runs in Triton's interpreter, so vocabularies are small; with CUDA the same tests
run compiled, and the ``gpu``-marked ones add real vocabulary sizes.

Exactness (``kernels/sampling.py``): kept sets of min-p and top-k are bit-exact; top-p's cut and the
race's argmax agree unless the data sits within float32 rounding of a boundary, so every comparison
first checks, in float64, that its data keeps a margin from both (``_boundaries``): the tests prove
equality on data where equality is promised, and say so when the data would not be. At real vocabulary
sizes the flat tail always puts some tie group within rounding of p; there the GPU tests allow a
difference exactly where the float64 recomputation says either answer is correct.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from batchllm.kernels.runtime import jit, load_triton
from batchllm.kernels.sampling import _row_hash, _uniform, sample_tokens

from batchllm.engine import sampler as S
from batchllm.engine.sampler import (
    SamplingBatch,
    SamplingRow,
    sample,
    truncate,
)
from batchllm.engine.sampler_random import exponential_race, noise_uniforms
from batchllm.sampling_params import SamplingParams

triton, tl = load_triton()

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
MARGIN = 1e-5  # relative distance from a rounding boundary that both implementations resolve alike


# ---- the RNG ------------------------------------------------------------------------------------------


@jit
def _uniforms_kernel(lo_ptr, hi_ptr, step_ptr, out_ptr, V, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    h = _row_hash(tl.load(lo_ptr + r), tl.load(hi_ptr + r), tl.load(step_ptr + r))
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + r * V + offs, _uniform(h, offs), mask=offs < V)


def test_kernel_uniforms_are_noise_uniforms_bit_for_bit():
    seeds = [0, 1, 2**32 - 1, 2**32, 2**64 - 1, 0xDEADBEEFCAFEBABE]
    steps = [0, 7, 2**31, 123456, 2**32 - 1, 3]
    V = 300
    s = [x & (2**64 - 1) for x in seeds]
    lo = torch.tensor([x & 0xFFFFFFFF for x in s], device=DEVICE)
    hi = torch.tensor([x >> 32 for x in s], device=DEVICE)
    st = torch.tensor(steps, device=DEVICE)
    got = torch.empty(len(s), V, device=DEVICE)
    _uniforms_kernel[(len(s),)](lo, hi, st, got, V, BLOCK=triton.next_power_of_2(V))
    assert torch.equal(got.cpu(), noise_uniforms(seeds, steps, V))


# ---- helpers ------------------------------------------------------------------------------------------


def _rows_params(R, V, seed, *, top_k=None, top_p=None, min_p=None, temperature=None, device=DEVICE):
    """Per-row launcher arguments: row r gets parameter list[r % len] (None disables the filter)."""
    g = np.random.default_rng(seed)
    seeds = [int(x) for x in g.integers(0, 2**63, R)]
    seeds[-1] = 2**64 - 1  # both seed halves at their maximum

    def col(values, dtype):
        return None if values is None else torch.tensor([values[r % len(values)] for r in range(R)], dtype=dtype, device=device)

    temps = temperature or [1.0, 0.7, 1.6]
    log_min_p = None if min_p is None else [math.log(p) if p > 0 else -math.inf for p in min_p]
    return {
        "temperature": col(temps, torch.float32),
        "seed_lo": torch.tensor([x & 0xFFFFFFFF for x in seeds], device=device),
        "seed_hi": torch.tensor([x >> 32 for x in seeds], device=device),
        "step": torch.tensor([int(x) for x in g.integers(0, 2**32, R)], device=device),
        "top_k": col(top_k, torch.int64),
        "top_p": col(top_p, torch.float32),
        "log_min_p": col(log_min_p, torch.float32),
    }


def sample_tokens_ref(
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
    return_kept: bool = False,
):
    """``sample_tokens`` by the engine sampler's torch code (``truncate`` + ``exponential_race``): the
    kernel's reference (here, not beside the kernel: the engine sampler imports the kernel module).

    Same arguments; ``out`` is not modified (a copy is returned). ``return_kept``: also return the
    (R, V) bool mask of kept tokens. Reads ``top_k`` back to the host (a reference, not a fast path).
    """
    B, V = logits.shape
    x = logits.index_select(0, rows).float() / temperature.reshape(-1, 1)
    k_max = 0
    if top_k is not None:
        top_k = top_k.reshape(-1)
        enabled = top_k[top_k < V]
        k_max = int(enabled.max()) if enabled.numel() else 0
        if not k_max:
            top_k = None
    x = truncate(x, log_min_p, top_k, k_max, top_p)
    tokens = exponential_race(x.softmax(dim=-1), seed_lo.reshape(-1), seed_hi.reshape(-1), step.reshape(-1))
    result = torch.zeros(B, dtype=torch.int64, device=logits.device) if out is None else out.clone()
    result[rows] = tokens
    return (result, x > -math.inf) if return_kept else result


def _boundaries(x, kw, kept):
    """Where rounding may legitimately decide, recomputed in float64 from ``x`` (R, V) float32 (the
    scaled logits, on the CPU) and the reference's kept set: ``ambiguous`` (R, V), the tokens of tie
    groups whose mass above lies within MARGIN of top_p (either side of such a cut is correct), and
    ``close`` (R,), rows whose two best race scores lie within MARGIN."""
    R, V = x.shape
    seeds = [int(lo) | (int(hi) << 32) for lo, hi in zip(kw["seed_lo"].tolist(), kw["seed_hi"].tolist())]
    u = noise_uniforms(seeds, kw["step"].tolist(), V).double()
    x64 = x.double()
    ambiguous = torch.zeros(R, V, dtype=torch.bool)
    close = torch.zeros(R, dtype=torch.bool)
    for r in range(R):
        w = torch.where(kept[r], (x64[r] - x64[r].max()).exp(), torch.zeros((), dtype=torch.float64))
        score = (w / -u[r].log()).sort(descending=True).values
        close[r] = bool(score[1] >= score[0] * (1 - MARGIN))
        if kw["top_p"] is None or kw["top_p"][r] >= 1.0:
            continue
        pre = _pre_top_p(x[r], kw, r)
        finite = pre > -math.inf
        values, group = torch.unique(pre[finite], return_inverse=True)  # tie groups, ascending value
        mass = torch.zeros(values.numel(), dtype=torch.float64).index_add_(0, group, (pre[finite] - pre.max()).exp())
        above = (mass.sum() - mass.cumsum(0)) / mass.sum()  # normalised mass strictly above each group
        p = float(kw["top_p"][r])
        # float sums err relative to their own size: compare relative to the larger side
        near = (above - p).abs() <= MARGIN * torch.maximum(above, torch.full_like(above, p))
        ambiguous[r] = torch.isin(x[r], values[near].float())
    return ambiguous, close


def _pre_top_p(x, kw, r):
    """Row r of the float32 ``x`` after the reference's min-p and top-k, as float64."""
    if kw["log_min_p"] is not None:
        x = x.masked_fill(x - x.max() < kw["log_min_p"][r].cpu(), -math.inf)
    if kw["top_k"] is not None and kw["top_k"][r] < x.numel():
        kth = x.sort(descending=True).values[int(kw["top_k"][r]) - 1]
        x = x.masked_fill(x < kth, -math.inf)
    return x.double()


def _compare(logits, kw, rows=None, strict=True):
    """Kernel vs reference on ``rows`` of ``logits``: same kept sets (finite tokens), same tokens.

    ``strict``: the data must keep clear of rounding boundaries (``_boundaries``), so equality is
    exact. Otherwise (real vocabularies, whose flat tails put some tie group within rounding of any
    p) kept sets may differ only in ambiguous tokens and tokens only when the winner is one of them
    or the race is that close."""
    B, _V = logits.shape
    rows = torch.arange(B, device=logits.device) if rows is None else rows
    out, cut = sample_tokens(logits, rows, **kw, return_cut=True)
    ref, kept = sample_tokens_ref(logits, rows, **kw, return_kept=True)
    x = logits.index_select(0, rows).float() / kw["temperature"][:, None]
    mine = x >= cut[:, None]
    if kw["log_min_p"] is not None:
        mine &= ~(x - x.amax(-1, keepdim=True) < kw["log_min_p"][:, None])
    mine &= x > -math.inf
    ambiguous, close = _boundaries(x.cpu(), {k: v if v is None else v.cpu() for k, v in kw.items()}, kept.cpu())
    if strict:
        assert not ambiguous.any(), "test data within rounding of a top-p cut"
        assert not close.any(), "test data with a race near-tie"
    assert not ((mine != kept).cpu() & ~ambiguous).any(), "kept sets differ"
    rows_cpu = rows.cpu()
    for r in range(len(rows_cpu)):
        t, t_ref = int(out[rows_cpu[r]]), int(ref[rows_cpu[r]])
        if not (close[r] or ambiguous[r, t] or ambiguous[r, t_ref]):
            assert t == t_ref, f"row {r}: token {t}, reference {t_ref}"
    assert torch.equal(out, ref) or not strict
    return out, kept


def _logits(R, V, seed, dtype=torch.float32, scale=3.0, ties=False, banned=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, V, generator=g) * scale
    if ties:
        x = (x * 2).round() / 2  # a grid of 0.5: dozens of tokens share each value
    if banned:
        x = x.masked_fill(torch.rand(R, V, generator=g) < banned, -math.inf)
    return x.to(dtype).to(DEVICE)


# ---- kernel vs reference --------------------------------------------------------------------------------

CASES = {
    "temperature": {},
    "top_k": {"top_k": [1, 2, 40, 999, 1000, 5000]},  # k = 1, small, V - 1, V, > V
    "top_p": {"top_p": [1.0, 0.9, 0.5, 1e-6, 0.99, 0.3]},
    "min_p": {"min_p": [0.0, 0.05, 0.5, 1.0, 0.01, 0.2]},
    "top_k+top_p": {"top_k": [50, 3, 1000, 10], "top_p": [0.8, 0.5, 0.95, 1.0]},
    "all": {"top_k": [20, 1000, 7], "top_p": [0.9, 0.6, 0.99], "min_p": [0.02, 0.0, 0.1], "temperature": [0.5, 1.0, 1.3]},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype):
    logits = _logits(6, 1000, seed=len(case), dtype=dtype)
    _compare(logits, _rows_params(6, 1000, seed=1, **CASES[case]))


@pytest.mark.parametrize("case", ["top_k", "top_p", "all"])
def test_ties_are_kept_together(case):
    # 0.5-grid logits: the k-th value and the top-p boundary fall inside large tie groups
    logits = _logits(6, 1000, seed=7, ties=True)
    _, kept = _compare(logits, _rows_params(6, 1000, seed=2, **CASES[case]))
    x = logits.float() / _rows_params(6, 1000, seed=2, **CASES[case])["temperature"][:, None]
    for r in range(6):  # the cut is a value: no token tied with a kept one is dropped
        lowest = x[r][kept[r]].min()
        assert bool(kept[r][x[r] == lowest].all())


def test_top_k_one_with_tied_maximum_keeps_all_tied():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 2.0, 3.0]] * 4, device=DEVICE)
    kw = _rows_params(4, 6, seed=3, top_k=[1], temperature=[1.0])
    out, kept = _compare(logits, kw)
    assert kept.cpu().tolist() == [[False, True, True, False, False, True]] * 4
    assert set(out.tolist()) <= {1, 2, 5}


def test_top_p_keeps_the_whole_tie_group_at_the_cut():
    # probs 0.4, 0.2, 0.2, 0.2: p = 0.5 needs one token of the 0.2 group, so all three stay
    logits = torch.tensor([[0.4, 0.2, 0.2, 0.2]], device=DEVICE).log()
    kw = _rows_params(1, 4, seed=4, top_p=[0.5], temperature=[1.0])
    _, kept = _compare(logits, kw)
    assert kept.cpu().tolist() == [[True, True, True, True]]
    kw = _rows_params(1, 4, seed=4, top_p=[0.3], temperature=[1.0])
    _, kept = _compare(logits, kw)
    assert kept.cpu().tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_banned_tokens_never_sampled(dtype):
    # -inf logits (min_tokens bans, masks); one row has fewer finite tokens than its top_k
    logits = _logits(6, 700, seed=5, banned=0.4, dtype=dtype)
    logits[3, 5:] = -math.inf
    kw = _rows_params(6, 700, seed=5, top_k=[10, 1, 300], top_p=[0.95, 1.0], min_p=[0.0, 0.01, 0.3])
    out, _ = _compare(logits, kw)
    assert bool((logits[torch.arange(6, device=DEVICE), out] > -math.inf).all())


def test_rows_subset_strided_logits_and_out_untouched():
    base = _logits(9, 1300, seed=6)
    logits = base[:, :1200]  # row stride 1300: a view, not a copy
    rows = torch.tensor([7, 0, 4], device=DEVICE)
    kw = _rows_params(3, 1200, seed=6, top_k=[30, 1200, 5], top_p=[0.9, 0.7, 1.0])
    _compare(logits, kw, rows=rows)
    out = torch.full((9,), -5, dtype=torch.int64, device=DEVICE)
    sample_tokens(logits, rows, **kw, out=out)
    others = [i for i in range(9) if i not in (7, 0, 4)]
    assert (out[others] == -5).all() and (out[rows] >= 0).all()


def test_pivot_count_and_block_do_not_change_results():
    logits = _logits(4, 2000, seed=8, ties=True)
    kw = _rows_params(4, 2000, seed=8, top_k=[100, 7], top_p=[0.9, 0.4], min_p=[0.0, 0.02])
    want = sample_tokens(logits, torch.arange(4, device=DEVICE), **kw)
    for block, pivots in [(256, 2), (512, 4), (2048, 32)]:
        got = sample_tokens(logits, torch.arange(4, device=DEVICE), **kw, block=block, pivots=pivots)
        assert torch.equal(got, want)


def test_validation():
    logits = torch.zeros(2, 10, device=DEVICE)
    kw = _rows_params(2, 10, seed=0)
    rows = torch.arange(2, device=DEVICE)
    with pytest.raises(ValueError, match="column stride"):
        sample_tokens(torch.zeros(10, 2, device=DEVICE).t(), rows, **kw)
    with pytest.raises(ValueError, match="logits must be"):
        sample_tokens(logits.long(), rows, **kw)
    with pytest.raises(ValueError, match="temperature must have shape"):
        sample_tokens(logits, rows, **{**kw, "temperature": kw["temperature"][:1]})
    with pytest.raises(ValueError, match="top_k must be"):
        sample_tokens(logits, rows, **{**kw, "top_k": torch.ones(2, dtype=torch.int32, device=DEVICE)})
    with pytest.raises(ValueError, match="rows"):
        sample_tokens(logits, rows.int(), **kw)
    with pytest.raises(ValueError, match="out must be"):
        sample_tokens(logits, rows, **kw, out=torch.zeros(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="pivots"):
        sample_tokens(logits, rows, **kw, pivots=3)


# ---- through the engine sampler -------------------------------------------------------------------------


def _row(seed=0, step=0, prompt=(), output=(), eos=frozenset(), **kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), seed, step, list(prompt), list(output), frozenset(eos))


def _engine_rows():
    return [
        _row(seed=11, step=0, temperature=0.8, top_p=0.9),
        _row(seed=2**64 - 1, step=5, temperature=0.0),  # greedy: torch argmax on both backends
        _row(seed=0xDEADBEEFCAFEBABE, step=3, top_k=20, min_p=0.05),
        _row(seed=-7, step=1, temperature=1.3, repetition_penalty=1.3, prompt=[1, 2, 3], output=[4, 4]),
        _row(seed=12345, step=9, frequency_penalty=0.5, presence_penalty=0.3, output=[7, 7, 9], top_k=5),
        _row(seed=99, step=0, temperature=0.5, top_k=7, min_tokens=4, output=[1], eos={0, 3}),
        _row(seed=5, step=2, logprobs=3, top_p=0.5),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mixed", [True, False])
def test_sample_backends_agree(dtype, mixed):
    rows = _engine_rows() if mixed else [_row(seed=s, step=s, top_k=30, top_p=0.9) for s in range(5)]
    g = torch.Generator().manual_seed(9)
    logits = (torch.randn(len(rows), 800, generator=g) * 3).to(dtype).to(DEVICE)
    batch = SamplingBatch.build(rows, 800, DEVICE)
    ref = sample(logits, batch, backend="torch")
    got = sample(logits, batch, backend="triton")
    assert torch.equal(got.token_ids, ref.token_ids)
    assert (got.logprobs is None) == (ref.logprobs is None)
    if ref.logprobs is not None:
        assert torch.equal(got.logprobs, ref.logprobs)


def test_backend_choice():
    cpu = torch.zeros(1, 1)
    assert not S._use_kernel("torch", torch.zeros(1, 1, device=DEVICE))
    assert S._use_kernel("triton", cpu)
    assert S._use_kernel("auto", cpu) is False  # CPU logits: torch
    with pytest.raises(ValueError):
        sample(torch.zeros(1, 4), SamplingBatch.build([_row(seed=1)], 4, "cpu"), backend="fast")


def test_backend_argument_decides_the_path(monkeypatch):
    """``sample``'s default is "auto"; no process-wide setting changes what a call does."""
    calls = []
    real = S._sample_with_kernel
    monkeypatch.setattr(S, "_sample_with_kernel", lambda logits, batch: calls.append(1) or real(logits, batch))
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(3))
    batch = SamplingBatch.build([_row(seed=1, top_k=5), _row(seed=2)], 50, "cpu")
    default = sample(logits, batch)
    assert not calls  # CPU logits under "auto": the torch path
    forced = sample(logits, batch, backend="triton")
    assert calls == [1] and torch.equal(forced.token_ids, default.token_ids)


def test_engine_passes_its_sampler_backend(monkeypatch):
    """``LLMEngine(sampler_backend=)`` reaches ``sample``: "triton" sends the random rows to the kernel
    (the interpreter on a CPU), "torch" never does, and both generate the same tokens."""
    from batchllm.engine.engine import LLMEngine
    from tests import engine_utils

    cfg = engine_utils.tiny_config(num_layers=1)
    model = engine_utils.build(cfg, engine_utils.random_state_dict(cfg, seed=5))
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_tokens=5, ignore_eos=True)
    kernel_calls = []
    real = S._sample_with_kernel
    monkeypatch.setattr(S, "_sample_with_kernel", lambda logits, batch: kernel_calls.append(1) or real(logits, batch))
    outputs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setattr(engine_utils, "LLMEngine", functools.partial(LLMEngine, sampler_backend=backend))
        done, engine = engine_utils.run_engine(model, cfg, [[1, 2, 3, 4, 5], [6, 7, 8]], params)
        assert engine.sampler_backend == backend
        outputs[backend] = {k: [list(s.output_ids) for s in v] for k, v in done.items()}
        assert bool(kernel_calls) == (backend == "triton")
    assert outputs["triton"] == outputs["torch"]


# ---- real vocabulary sizes on the GPU ---------------------------------------------------------------------


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("V", [49152, 128256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_vocab_matches_reference_on_gpu(V, dtype):
    R = 56  # parameter lists of coprime lengths: every top_k meets every top_p
    g = torch.Generator().manual_seed(V)
    # model-like logits: a few dozen plausible tokens above a long tail; every third row flatter
    logits = torch.randn(R, V, generator=g) * 2
    logits[:, :64] += torch.rand(R, 64, generator=g) * 6
    logits[::3] *= 0.5
    logits = logits.to(dtype).to(DEVICE)
    kw = _rows_params(R, V, seed=V, top_k=[50, V, 1, 1000], top_p=[0.9, 1.0, 0.95, 0.5, 0.99, 1e-6, 0.8],
                      min_p=[0.0, 0.05, 0.0, 0.1, 0.0], temperature=[1.0, 0.7, 1.2])
    _compare(logits, kw, strict=False)


@pytest.mark.gpu
@gpu
def test_real_vocab_sample_auto_uses_kernel_and_agrees():
    V, n = 128256, 32
    rows = [_row(seed=s, step=s, top_k=[0, 50][s % 2], top_p=[0.9, 1.0, 0.95][s % 3], min_p=0.02 * (s % 2),
                 temperature=[0.0, 0.8, 1.0, 1.3][s % 4]) for s in range(n)]
    g = torch.Generator().manual_seed(10)
    logits = (torch.randn(n, V, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    batch = SamplingBatch.build(rows, V, DEVICE)
    assert S._use_kernel("auto", logits)
    assert torch.equal(sample(logits, batch, backend="auto").token_ids, sample(logits, batch, backend="torch").token_ids)
