"""The repetition, frequency and presence penalties of a sampling step (vLLM v1's semantics).

Repetition: a token seen in the row's prompt or output has ``logit > 0 -> logit / r`` else
``logit * r``; frequency: ``- f * count in output``; presence: ``- p * (count > 0)``. ``Penalties``
holds the rows that have any penalty as padded id matrices (built on the host once per step by
``SamplingBatch.build``); the counts are built on the device in ``apply``, without a host sync.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from batchllm.sampling_params import SamplingParams


@dataclass
class Penalties:
    """The penalised rows of a sampling batch and their factors, as device tensors."""

    rows: torch.Tensor  # (P,) batch rows that have any penalty
    repetition: torch.Tensor  # (P, 1) float32
    frequency: torch.Tensor  # (P, 1)
    presence: torch.Tensor  # (P, 1)
    output_ids: torch.Tensor  # (P, Lo) int64, padded with vocab_size
    prompt_ids: torch.Tensor | None  # (P, Lp), padded with vocab_size; None when no row has repetition != 1

    @classmethod
    def build(cls, rows: Sequence[int], params: Sequence[SamplingParams],
              prompt_ids: Sequence[Sequence[int] | np.ndarray], output_ids: Sequence[Sequence[int] | np.ndarray],
              vocab_size: int, put: Callable[[object, torch.dtype], torch.Tensor]) -> Penalties:
        """The penalties of batch rows ``rows`` (non-empty), each with its ``params``, prompt and
        output ids; ``put`` moves host data to the batch's device. Raises ValueError for an id outside
        ``[0, vocab_size)``."""
        factors = put([[p.repetition_penalty, p.frequency_penalty, p.presence_penalty] for p in params], torch.float32)
        need_prompt = any(p.repetition_penalty != 1.0 for p in params)
        return cls(
            rows=put(list(rows), torch.int64),
            repetition=factors[:, 0:1],
            frequency=factors[:, 1:2],
            presence=factors[:, 2:3],
            output_ids=put(_pad(output_ids, vocab_size), torch.int64),
            prompt_ids=put(_pad(prompt_ids, vocab_size), torch.int64) if need_prompt else None,
        )

    def apply(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """``logits`` (B, vocab_size) with the penalties applied to their rows, out of place."""
        V = vocab_size
        sub = logits.index_select(0, self.rows)
        # One extra column absorbs the padding id (V), then is dropped.
        counts = torch.zeros(sub.shape[0], V + 1, dtype=sub.dtype, device=sub.device)
        counts.scatter_add_(1, self.output_ids, torch.ones_like(self.output_ids, dtype=sub.dtype))
        counts = counts[:, :V]
        in_output = counts > 0
        seen = in_output
        if self.prompt_ids is not None:
            in_prompt = torch.zeros(sub.shape[0], V + 1, dtype=torch.bool, device=sub.device)
            in_prompt.scatter_(1, self.prompt_ids, True)
            seen = seen | in_prompt[:, :V]
            rep = torch.where(seen, self.repetition, 1.0)
            # vLLM multiplies by 1/r rather than dividing: same rounding as the reference.
            sub = sub * torch.where(sub > 0, 1.0 / rep, rep)
        sub = sub - self.frequency * counts - self.presence * in_output
        return logits.index_copy(0, self.rows, sub)


def _pad(seqs: Sequence[Sequence[int] | np.ndarray], vocab_size: int) -> np.ndarray:
    """Right-pad id sequences with ``vocab_size`` into one int64 matrix (at least one column)."""
    arrays = [np.asarray(s, dtype=np.int64).reshape(-1) for s in seqs]
    out = np.full((len(arrays), max(1, max(a.size for a in arrays))), vocab_size, dtype=np.int64)
    for j, a in enumerate(arrays):
        if a.size:
            if a.min() < 0 or a.max() >= vocab_size:
                raise ValueError(f"token ids must lie in [0, {vocab_size}), got {int(a.min())}..{int(a.max())}")
            out[j, : a.size] = a
    return out
