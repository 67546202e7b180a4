"""Sampler tests: vLLM v1 semantics, the exponential-race distribution, and batch-independent RNG."""

from __future__ import annotations

import random
import struct
from collections import Counter

import numpy as np
import pytest
import torch

from batchllm.engine.sampler import (
    SamplingBatch,
    SamplingRow,
    apply_penalties,
    sample,
)
from batchllm.engine.sampler_random import noise_uniforms
from batchllm.sampling_params import SamplingParams


def _row(seed=0, step=0, prompt=(), output=(), eos=frozenset(), **kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), seed, step, list(prompt), list(output), frozenset(eos))


def _sample(logits, rows, device="cpu"):
    return sample(logits.to(device), SamplingBatch.build(rows, logits.shape[-1], device))


def _counts(logits_row, params_kw, n=20000, step=0):
    """Empirical counts of n independent draws (n seeds) from one logits row."""
    V = logits_row.numel()
    rows = [_row(seed=s, step=step, **params_kw) for s in range(n)]
    tok = _sample(logits_row.expand(n, V).contiguous(), rows).token_ids
    return np.bincount(tok.numpy(), minlength=V)


def _chi2(counts, probs) -> float:
    n = counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "sampled a token outside the support"
    exp = probs[keep] * n
    return float(((counts[keep] - exp) ** 2 / exp).sum())


# Chi-square critical values at p = 1e-4 are about 15 + 2.6 * dof for these small dof; the seeds
# are fixed, so a pass is deterministic, and the bound still catches any real distribution error.
def _chi2_ok(counts, probs):
    dof = int((probs > 0).sum()) - 1
    stat = _chi2(counts, probs)
    assert stat < 16 + 3 * dof, f"chi2 {stat:.1f} with {dof} dof"


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])


def _softmax64(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_distribution_matches_softmax(temperature):
    counts = _counts(LOGITS, dict(temperature=temperature))
    _chi2_ok(counts, _softmax64(LOGITS.numpy() / temperature))


def _support_topk(probs, k):
    kth = np.sort(probs)[::-1][k - 1]
    return probs >= kth


def _support_topp(probs, p):
    """Smallest high-probability set whose mass reaches p (top token always kept)."""
    order = np.argsort(-probs)
    keep = np.zeros_like(probs, dtype=bool)
    mass = 0.0
    for i in order:
        keep[i] = True
        mass += probs[i]
        if mass >= p:
            break
    return keep


def _restricted(probs, keep):
    q = np.where(keep, probs, 0.0)
    return q / q.sum()


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_k=3),
        dict(top_p=0.6),
        dict(min_p=0.3),
        dict(top_k=2, top_p=0.5),  # top_p over the renormalised top-k set keeps one token
        dict(top_k=5, top_p=0.8, min_p=0.1, temperature=0.7),
    ],
)
def test_truncation_restricts_support(kw):
    T = kw.get("temperature", 1.0)
    probs = _softmax64(LOGITS.numpy() / T)
    keep = np.ones_like(probs, dtype=bool)
    if kw.get("min_p"):
        keep &= probs >= kw["min_p"] * probs.max()
    probs_k = _restricted(probs, keep)
    if kw.get("top_k"):
        keep &= _support_topk(probs_k, kw["top_k"])
        probs_k = _restricted(probs, keep)
    if kw.get("top_p"):
        keep &= _support_topp(probs_k, kw["top_p"])
    target = _restricted(probs, keep)
    counts = _counts(LOGITS, kw)
    assert set(np.flatnonzero(counts)) == set(np.flatnonzero(keep))
    _chi2_ok(counts, target)


def test_top_k_p_combination_matches_vllm_renormalisation():
    # probs 0.4, 0.3, 0.2, 0.1: top_k=2 renormalises to 0.57/0.43, so top_p=0.5 keeps only token 0.
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    assert set(np.flatnonzero(_counts(logits, dict(top_k=2, top_p=0.5), n=2000))) == {0}
    assert set(np.flatnonzero(_counts(logits, dict(top_p=0.5), n=2000))) == {0, 1}


def test_top_k_keeps_ties_and_mixed_rows():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 2.0]] * 3)
    rows = [_row(seed=s, top_k=k) for s, k in [(0, 1), (1, -1), (2, 9)]]
    batch = SamplingBatch.build(rows, 5, "cpu")
    assert batch.top_k.tolist() == [1, 5, 5] and batch.top_k_max == 1
    n = 3000
    rows = [_row(seed=s, top_k=1) for s in range(n)]
    toks = _sample(logits[:1].expand(n, 5).contiguous(), rows).token_ids
    assert set(toks.tolist()) == {1, 2}  # both tokens tied at the k-th value survive


def test_greedy_is_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    rows = [_row(seed=i, temperature=0.0, top_k=3, top_p=0.1) for i in range(6)]
    out = _sample(logits, rows)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.top_logprobs is None


def _mixed_rows():
    return [
        _row(seed=11, step=0, temperature=0.8, top_p=0.9),
        _row(seed=2**64 - 1, step=5, temperature=0.0),
        _row(seed=0xDEADBEEFCAFEBABE, step=3, top_k=20, min_p=0.05),
        _row(seed=-7, step=1, temperature=1.3, repetition_penalty=1.3, prompt=[1, 2, 3], output=[4, 4]),
        _row(seed=12345, step=9, temperature=1.0),
        _row(seed=99, step=0, temperature=0.5, top_k=7),
    ]


def test_same_seed_and_step_give_same_token_regardless_of_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 300, generator=g) * 3
    rows = _mixed_rows()
    full = _sample(logits, rows).token_ids.tolist()
    for i in range(6):  # alone
        assert _sample(logits[i : i + 1], [rows[i]]).token_ids.tolist() == [full[i]]
    perm = [4, 0, 5, 2, 3, 1]  # reordered, and padded with unrelated rows
    extra = [_row(seed=s, temperature=0.9) for s in range(3)]
    big_logits = torch.cat([logits[perm], torch.randn(3, 300, generator=g)])
    got = _sample(big_logits, [rows[i] for i in perm] + extra).token_ids.tolist()
    assert got[:6] == [full[i] for i in perm]


def test_steps_and_seeds_give_different_draws():
    V = 1000
    logits = torch.zeros(100, V)
    by_step = _sample(logits, [_row(seed=42, step=s) for s in range(100)]).token_ids
    by_seed = _sample(logits, [_row(seed=s, step=0) for s in range(100)]).token_ids
    assert len(set(by_step.tolist())) > 90 and len(set(by_seed.tolist())) > 90
    u = noise_uniforms([42, 42, 43], [0, 1, 0], V)
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])


# ---- the counter-based RNG against an independent pure-Python murmur3 ---------------------------


def _murmur3_32(data: bytes, seed: int = 0) -> int:
    M = 0xFFFFFFFF
    c1, c2 = 0xCC9E2D51, 0x1B873593
    h = seed
    n4 = len(data) // 4 * 4
    for i in range(0, n4, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * c1) & M
        k = ((k << 15) | (k >> 17)) & M
        k = (k * c2) & M
        h ^= k
        h = ((h << 13) | (h >> 19)) & M
        h = (h * 5 + 0xE6546B64) & M
    tail, k = data[n4:], 0
    for i, b in enumerate(tail):
        k |= b << (8 * i)
    if tail:
        k = (k * c1) & M
        k = ((k << 15) | (k >> 17)) & M
        h ^= (k * c2) & M
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M
    return h ^ (h >> 16)


def test_reference_murmur3_known_vectors():
    assert _murmur3_32(b"", 0) == 0
    assert _murmur3_32(b"", 1) == 0x514E28B7
    assert _murmur3_32(b"\0\0\0\0", 0) == 0x2362F9DE
    assert _murmur3_32(b"aaaa", 0x9747B28C) == 0x5A97808A
    assert _murmur3_32(b"Hello, world!", 1234) == 0xFAF6CDB3


def test_noise_uniforms_match_reference_bit_for_bit():
    seeds = [0, 1, 2**32 - 1, 2**32, 2**64 - 1, 0xDEADBEEFCAFEBABE, -1]
    steps = [0, 7, 2**31, 123456, 1, 0, 3]
    V = 97
    got = noise_uniforms(seeds, steps, V)
    for r, (s, t) in enumerate(zip(seeds, steps)):
        s &= 2**64 - 1
        for v in range(V):
            h = _murmur3_32(struct.pack("<IIII", s & 0xFFFFFFFF, s >> 32, t & 0xFFFFFFFF, v))
            assert got[r, v].item() == ((h >> 9) + 0.5) / 2**23
    assert 0.0 < got.min() and got.max() < 1.0


# ---- penalties, min_tokens, logprobs -----------------------------------------------------------


def _reference_penalties(logits, row):
    out = logits.clone().double()
    p = row.params
    seen = set(row.prompt_ids) | set(row.output_ids)
    for t in seen:
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t, c in Counter(row.output_ids).items():
        out[t] -= p.frequency_penalty * c + p.presence_penalty
    return out.float()


def test_penalties_match_reference():
    rng = random.Random(0)
    g = torch.Generator().manual_seed(2)
    V = 64
    rows = []
    for i in range(8):
        kw = {}
        if i % 4 != 0:
            kw = dict(
                repetition_penalty=rng.choice([1.0, 0.7, 1.5]),
                frequency_penalty=rng.uniform(-2, 2),
                presence_penalty=rng.choice([0.0, rng.uniform(-2, 2)]),
            )
        prompt = [rng.randrange(V) for _ in range(rng.randrange(0, 12))]
        output = [rng.randrange(V) for _ in range(rng.randrange(0, 20))]
        rows.append(_row(seed=i, prompt=np.array(prompt), output=output, temperature=rng.choice([0.0, 1.0]), **kw))
    rows[1] = _row(seed=1, prompt=[], output=[], repetition_penalty=1.2)  # penalty row with no ids
    rows[2] = _row(seed=2, prompt=[5, 6], output=[5, 5, 9], frequency_penalty=0.5)  # prompt not needed
    logits = torch.randn(8, V, generator=g) * 4
    before = logits.clone()
    got = apply_penalties(logits, SamplingBatch.build(rows, V, "cpu"))
    want = torch.stack([_reference_penalties(logits[i], rows[i]) for i in range(8)])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    assert torch.equal(logits, before)  # input untouched (out-of-place)


def test_penalties_steer_greedy_and_random_distribution():
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0]])
    row = _row(temperature=0.0, output=[0, 0], frequency_penalty=0.2)
    assert _sample(logits, [row]).token_ids.item() == 1
    kw = dict(repetition_penalty=2.0, presence_penalty=0.3, temperature=0.7)
    base = _row(prompt=[1], output=[0, 3], **kw)
    target = _softmax64(_reference_penalties(LOGITS, base).numpy() / 0.7)
    n = 20000
    rows = [_row(seed=s, prompt=[1], output=[0, 3], **kw) for s in range(n)]
    tok = _sample(LOGITS.expand(n, -1).contiguous(), rows).token_ids
    _chi2_ok(np.bincount(tok.numpy(), minlength=8), target)


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 0.0, 9.0, 8.0, 1.0]] * 2)  # eos=2 and stop id 3 dominate
    kw = dict(min_tokens=3, stop_token_ids=(3, 99))  # 99 is outside the vocabulary: ignored
    short = [_row(seed=0, output=[4, 4], eos={2}, temperature=0.0, **kw), _row(seed=1, output=[4], eos={2}, **kw)]
    assert all(t not in (2, 3) for t in _sample(logits, short).token_ids.tolist())
    done = _row(seed=0, output=[4, 4, 4], eos={2}, temperature=0.0, **kw)
    assert _sample(logits[:1], [done]).token_ids.item() == 2
    many = [_row(seed=s, output=[], eos={2}, ignore_eos=True, **kw) for s in range(500)]
    toks = _sample(logits[:1].expand(500, -1).contiguous(), many).token_ids.tolist()
    assert not set(toks) & {2, 3}


def test_logprobs_are_raw_log_softmax():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 40, generator=g)
    rows = [
        _row(seed=0, logprobs=2, temperature=0.0, repetition_penalty=1.5, output=[int(logits[0].argmax())]),
        _row(seed=1, logprobs=5, temperature=0.5),
        _row(seed=2),
        _row(seed=3, logprobs=0, min_p=0.2),
    ]
    out = _sample(logits.to(torch.bfloat16), rows)
    ref = torch.log_softmax(logits.to(torch.bfloat16).float(), -1)
    assert out.logprobs.dtype == torch.float32 and out.token_ids.dtype == torch.int64
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.token_ids[:, None]).squeeze(1))
    ids, vals = out.top_logprobs
    assert ids.shape == vals.shape == (4, 5)
    torch.testing.assert_close(vals, ref.topk(5, -1).values)
    assert torch.equal(ids, ref.topk(5, -1).indices)
    only_sampled = _sample(logits[:1], [_row(logprobs=0)])
    assert only_sampled.logprobs.shape == (1,) and only_sampled.top_logprobs is None


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError):
        SamplingBatch.build([], 10, "cpu")
    with pytest.raises(ValueError):
        SamplingBatch.build([_row(output=[10], presence_penalty=1.0)], 10, "cpu")
    batch = SamplingBatch.build([_row()], 10, "cpu")
    with pytest.raises(ValueError):
        sample(torch.zeros(2, 10), batch)
    with pytest.raises(ValueError):
        sample(torch.zeros(1, 11), batch)


def test_large_vocab_chunked_noise(monkeypatch):
    import batchllm.engine.sampler_random as S

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(10, 5000, generator=g)
    rows = [_row(seed=s, step=s) for s in range(10)]
    want = _sample(logits, rows).token_ids
    monkeypatch.setattr(S, "_NOISE_CHUNK_ELEMS", 3 * 5000)  # several row chunks
    assert torch.equal(_sample(logits, rows).token_ids, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 4000, generator=g) * 3
    rows = _mixed_rows()
    for r in rows:
        r.prompt_ids, r.output_ids = [1, 2, 3], [4, 4]
    cpu = _sample(logits, rows)
    gpu = _sample(logits, rows, "cuda")
    assert torch.equal(gpu.token_ids.cpu(), cpu.token_ids)
    assert torch.equal(
        noise_uniforms([1, 2**64 - 1], [0, 9], 4000, "cuda").cpu(), noise_uniforms([1, 2**64 - 1], [0, 9], 4000)
    )
