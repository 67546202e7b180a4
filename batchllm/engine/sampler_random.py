"""The sampler's counter-based random numbers: uniforms from a hash of (seed, step, vocabulary id).

Row ``r`` of a sampling step draws one uniform per vocabulary id ``v``,
``u = uniform(murmur3_32(seed_lo, seed_hi, step, v))`` with 23 random bits, and samples by the
exponential race ``argmax(probs / -log(u))`` (``exponential_race``), which samples exactly from
``probs``. A token therefore depends only on (seed, step, logits) of its row, never on the batch or a
device RNG state; the hash is plain integer arithmetic, so CPU, CUDA and the Triton kernel
(``batchllm.kernels.sampling``) produce the same uniforms bit for bit (``noise_uniforms`` is the
reference they are held to).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
# Elements of (rows x vocab) int64 hash state materialised at once; bounds the noise's extra memory
# to a few hundred MiB however large the batch or vocabulary.
_NOISE_CHUNK_ELEMS = 1 << 24


def rng_words(seed: int, step: int) -> tuple[int, int, int]:
    """The per-row words of the hashed message: ``(seed_lo, seed_hi, step)``, each in ``[0, 2**32)``;
    ``seed`` is any int taken modulo 2**64, ``step`` modulo 2**32."""
    s = int(seed) & _MASK64
    return s & _MASK32, s >> 32, int(step) & _MASK32


# All arithmetic is on int64 tensors holding values in [0, 2**32) (torch has no uint32 arithmetic on
# every device). A product of two 32-bit values needs 64 unsigned bits and would overflow signed
# int64 (undefined in C++/Triton, even if it usually wraps), so ``_mul32`` splits the constant into
# 16-bit halves: each partial product stays below 2**48.


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) and a constant c in [0, 2**32), without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _rotl32(x: torch.Tensor, r: int) -> torch.Tensor:
    return ((x << r) | (x >> (32 - r))) & _MASK32


_C1, _C2 = 0xCC9E2D51, 0x1B873593


def _murmur_block(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """One 4-byte block of murmur3_x86_32."""
    k = _mul32(_rotl32(_mul32(k, _C1), 15), _C2)
    h = _rotl32(h ^ k, 13)
    return (h * 5 + 0xE6546B64) & _MASK32  # h * 5 < 2**35: no split needed


def _fmix32_(h: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser, in place on ``h`` (the (rows x vocab) tensor: one temporary, not ten)."""
    t = torch.empty_like(h)

    def xorshift(r: int) -> None:
        torch.bitwise_right_shift(h, r, out=t)
        h.bitwise_xor_(t)

    def mul32(c: int) -> None:  # _mul32, in place
        torch.mul(h, c >> 16, out=t)
        t.bitwise_and_(0xFFFF).bitwise_left_shift_(16)
        h.mul_(c & 0xFFFF).add_(t).bitwise_and_(_MASK32)

    xorshift(16)
    mul32(0x85EBCA6B)
    xorshift(13)
    mul32(0xC2B2AE35)
    xorshift(16)
    return h


def _uniforms(seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(R, V) float32 uniforms in (0, 1): ``murmur3_x86_32`` (seed 0) of the 16-byte little-endian
    message (seed_lo, seed_hi, step, v), top 23 bits, centred: ``((h >> 9) + 0.5) / 2**23``."""
    h = torch.zeros_like(seed_lo)
    for word in (seed_lo, seed_hi, step):  # per-row part: (R,) work only
        h = _murmur_block(h, word)
    v = torch.arange(vocab_size, dtype=torch.int64, device=seed_lo.device)
    kv = _mul32(_rotl32(_mul32(v, _C1), 15), _C2)  # per-column part of the last block: (V,) work
    # The last block's rotl(h ^ k, 13) equals rotl(h, 13) ^ rotl(k, 13): rotate the row and column
    # parts separately, so the (R, V) work starts at the multiply.
    x = _rotl32(h, 13).unsqueeze(1) ^ _rotl32(kv, 13).unsqueeze(0)
    x.mul_(5).add_(0xE6546B64).bitwise_and_(_MASK32)  # x * 5 < 2**35: no split needed
    x.bitwise_xor_(16)  # murmur3 folds in the message length (bytes)
    _fmix32_(x).bitwise_right_shift_(9)
    # 23 bits plus the half offset fill float32's 24-bit significand exactly, so u is the same on
    # every device and lies strictly inside (0, 1): -log(u) is finite and > 0. (24 bits + 0.5 would
    # round the top value up to 1.0, giving E = 0.)
    return (x.to(torch.float32) + 0.5).mul_(1.0 / (1 << 23))


def noise_uniforms(seeds: Sequence[int], steps: Sequence[int], vocab_size: int, device="cpu") -> torch.Tensor:
    """The uniforms the sampler draws for each (seed, step) row: (len(seeds), vocab_size) float32.

    The reference for other implementations (a Triton kernel must reproduce it bit for bit).
    """
    if len(seeds) != len(steps):
        raise ValueError(f"{len(seeds)} seeds but {len(steps)} steps")
    words = torch.tensor([rng_words(seed, step) for seed, step in zip(seeds, steps)], dtype=torch.int64, device=device)
    words = words.reshape(len(seeds), 3)
    return _uniforms(words[:, 0], words[:, 1], words[:, 2], vocab_size)


def exponential_race(probs: torch.Tensor, seed_lo, seed_hi, step) -> torch.Tensor:
    """argmax(probs / E) with E = -log(u) ~ Exp(1): a sample from each row of ``probs`` (R, V), the
    first index among equal maxima. ``seed_lo``, ``seed_hi``, ``step``: (R,) int64 in [0, 2**32)."""
    R, V = probs.shape
    out = torch.empty(R, dtype=torch.int64, device=probs.device)
    chunk = max(1, _NOISE_CHUNK_ELEMS // V)
    for s in range(0, R, chunk):
        e = slice(s, s + chunk)
        expo = _uniforms(seed_lo[e], seed_hi[e], step[e], V).log_().neg_()
        out[e] = (probs[e] / expo).argmax(dim=-1)
    return out
