"""Memory-centric admission (BatchLLM): the projected peak of KV memory as running sequences grow and finish.

A waiting sequence is admitted when the pages for its whole pending prompt fit now and the projected
peak of KV memory, with every running sequence growing to its expected output length and freeing its
pages when it ends, still fits the pool. This module holds the two halves of that projection: how long
outputs are expected to be (``OutputLengthEstimator``) and the peak itself (``projected_peak_pages``)
over one ``GrowthRow`` per sequence. The scheduler builds the rows and decides.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from batchllm.engine.sequence import Sequence

# Above this many (breakpoint x sequence) cells the projected peak uses an O(n log n) bound instead.
EXACT_PEAK_CELLS = 200_000


class GrowthRow(NamedTuple):
    """One sequence in the projection, not counting the full pages it shares with its group's prefix
    (those stay until the whole group ends)."""

    held: int  # pages held (or about to be, for a candidate)
    length: int  # tokens
    remaining: int  # expected tokens still to come, reserve applied (at least 1)


class OutputLengthEstimator:
    """Expected output length of a sequence, for the memory reserve.

    Requests that ignore EOS run to max_tokens exactly. Others are estimated from the outputs finished so
    far in this job (mean x 1.5, capped by max_tokens); before any finishes, half of max_tokens.
    """

    def __init__(self) -> None:
        self._sum = 0
        self._count = 0

    def observe(self, completion_tokens: int) -> None:
        self._sum += completion_tokens
        self._count += 1

    def expected(self, seq: Sequence, max_model_len: int) -> int:
        """Expected total output tokens of ``seq``; never more than its context leaves room for."""
        mx = min(seq.params.max_tokens, max(1, max_model_len - seq.prompt_len))
        if seq.params.ignore_eos:
            return mx
        if self._count == 0:
            return max(1, mx // 2)
        return max(1, min(mx, int(1.5 * self._sum / self._count) + 1))


def projected_peak_pages(rows: list[GrowthRow], used: int, page_size: int) -> int:
    """Peak pages in use if nothing else is admitted and every sequence in ``rows`` grows to its expected
    length, then frees its pages; ``used``: pages in use now (plus any about to be allocated).

    Sequences finish at different times, so the peak is far below "everyone at their maximum at once":
    at ``t`` steps from now, sequence i holds ``ceil((len_i + t) / page)`` pages while ``t <= r_i`` (its
    expected remaining tokens) and none after. The peak is reached at one of the ``r_i``: computed
    exactly there when that is cheap, else through the bound ``ceil(x / page) <= (x + page - 1) / page``,
    O(n log n) after a sort. Shared-prefix pages count as held throughout.
    """
    if not rows:
        return used
    ps = page_size
    held, length, remaining = (np.asarray(c, dtype=np.float64) for c in zip(*rows))
    n = len(held)
    breakpoints = np.unique(remaining)
    if len(breakpoints) * n <= EXACT_PEAK_CELLS:
        t = breakpoints[:, None]
        pages_at = np.where(remaining[None, :] >= t, np.ceil((length[None, :] + t) / ps), 0.0)
        growth = (pages_at - held[None, :]).sum(axis=1)
    else:  # at t = r[k] (sorted) sequences k.. still hold their pages, ..k-1 have freed theirs
        order = np.argsort(remaining)
        r, held, length = remaining[order], held[order], length[order]
        still = np.cumsum(((length + ps - 1) / ps - held)[::-1])[::-1]
        freed = np.concatenate([[0.0], np.cumsum(held)[:-1]])
        growth = still + np.arange(n, 0, -1) * r / ps - freed
    return used + max(0, int(np.ceil(growth.max() - 1e-9)))
