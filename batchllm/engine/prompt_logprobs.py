"""Prompt log-probabilities: per prompt position, the log-probability of the next prompt token, its rank, and
the most likely tokens, collected from the rows the model runner computes (``ModelRunner.prompt_logprobs``).

A shared prefix's rows are computed once and serve every member: its positions are held by the prefix, and
its last position keeps the whole distribution, since each member continues it with its own token.
``PromptLogprobs.entries`` gives vLLM's per-position ``prompt_logprobs`` structure; ``score`` sums a span's
log-likelihood (``batchllm score``, the lm-eval adapter).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import numpy as np
import torch

from batchllm.engine.sequence import Sequence, SharedPrefix


@dataclasses.dataclass
class _PromptRows:
    """One item's prompt log-probabilities by position ``p`` (the logits at ``p`` score token ``p + 1``)."""

    logprob: np.ndarray  # float64 [length]: log P(token p+1 | tokens[:p+1]); NaN where not computed
    rank: np.ndarray  # int64 [length]: token p+1's rank at p (1: the argmax)
    top_ids: np.ndarray | None = None  # int64 [length, top_k]: the top_k tokens at p, best first
    top_logprobs: np.ndarray | None = None  # float64 [length, top_k]
    last: torch.Tensor | None = None  # a prefix's log-softmax at its last position (float32 [vocab], host)


class PromptTokenLogprobs(NamedTuple):
    """vLLM's ``prompt_logprobs`` of one sequence: entry ``j`` (for prompt token ``j >= 1``; entry 0 is None)
    is that token's log-probability given the tokens before it, its rank, and the ``k`` most likely tokens."""

    logprobs: list[float | None]
    ranks: list[int | None]
    top: list[list[tuple[int, float]] | None]


class TokenScore(NamedTuple):
    """Prompt tokens ``start..end-1`` of a sequence, scored: summed log-likelihood, and whether every one of
    them is the argmax of the logits before it (lm-evaluation-harness's ``is_greedy``)."""

    logprob: float
    is_greedy: bool


class PromptLogprobs:
    """Collects prompt log-probabilities of every ``Sequence`` (from position ``first_position(seq)`` on)
    and ``SharedPrefix`` (all positions) the runner computes, and scores a finished sequence's prompt
    tokens from its own rows and its prefixes'.

    Rows are written by position, so a recomputation after preemption overwrites them with the same
    values. ``release(seq)`` drops a finished sequence's rows, and those of its prefixes with no
    unfinished dependent left; every row is held on the host.
    """

    def __init__(self, first_position: Callable[[Sequence], int], top_k: int = 0):
        """``first_position(seq)``: the first of ``seq``'s positions to score (its prompt length: none);
        ``top_k``: the most likely tokens kept per position (the run's largest ``prompt_logprobs``)."""
        self.first_position, self.top_k = first_position, top_k
        self._rows: dict[Sequence | SharedPrefix, _PromptRows] = {}

    def positions(self, item: Sequence | SharedPrefix, start: int, q: int) -> tuple[int, int]:
        """The positions ``[lo, hi)`` of ``item``'s step chunk ``[start, start + q)`` to score (maybe empty):
        a sequence's prompt positions before its last one (whose logits sample), a prefix's every one."""
        if isinstance(item, SharedPrefix):
            return start, start + q
        return max(start, self.first_position(item)), min(start + q, item.prompt_len - 1)

    def add(self, item: Sequence | SharedPrefix, lo: int, logprobs: torch.Tensor) -> None:
        """Log-softmax rows of positions ``lo..lo + len(logprobs) - 1`` of ``item`` (device tensor)."""
        tokens = item.prompt_ids if isinstance(item, Sequence) else item.token_ids
        n = item.prompt_len
        rows = self._rows.get(item)
        if rows is None:
            k = self.top_k
            rows = self._rows[item] = _PromptRows(np.full(n, np.nan), np.zeros(n, dtype=np.int64),
                                                  np.zeros((n, k), dtype=np.int64) if k else None,
                                                  np.zeros((n, k)) if k else None)
        hi = lo + logprobs.shape[0]
        scored = min(hi, n - 1) - lo  # rows whose next token is in ``tokens``
        if scored > 0:
            nxt = torch.as_tensor(tokens[lo + 1 : lo + 1 + scored].astype(np.int64), device=logprobs.device)
            part = logprobs[:scored]
            actual = part.gather(1, nxt[:, None])
            rows.logprob[lo : lo + scored] = actual[:, 0].double().cpu().numpy()
            rows.rank[lo : lo + scored] = ((part > actual).sum(dim=1) + 1).cpu().numpy()
            if self.top_k:
                vals, ids = part.topk(self.top_k, dim=1)
                rows.top_ids[lo : lo + scored] = ids.cpu().numpy()
                rows.top_logprobs[lo : lo + scored] = vals.double().cpu().numpy()
        if hi == n and isinstance(item, SharedPrefix):
            rows.last = logprobs[-1].float().cpu()

    def score(self, seq: Sequence, start: int, end: int | None = None) -> TokenScore:
        """``TokenScore`` of ``seq``'s prompt tokens ``start..end-1`` (``end`` default: the prompt's end);
        ``1 <= start`` and ``start - 1 >= first_position(seq)``, or the tokens fall in shared prefixes."""
        end = seq.prompt_len if end is None else end
        if not 1 <= start <= end <= seq.prompt_len:
            raise ValueError(f"cannot score prompt tokens {start}..{end - 1} of a {seq.prompt_len}-token prompt")
        total, greedy = 0.0, True
        for p in range(start - 1, end - 1):
            lp, rank, _ = self._at(seq, p, 0)
            total += lp
            greedy &= rank == 1
        return TokenScore(total, greedy)

    def entries(self, seq: Sequence, k: int) -> PromptTokenLogprobs:
        """``seq``'s ``PromptTokenLogprobs`` with the ``k`` (<= ``top_k``) most likely tokens per position;
        every position must have been scored (``first_position(seq) == 0``)."""
        lps: list[float | None] = [None]
        ranks: list[int | None] = [None]
        tops: list[list[tuple[int, float]] | None] = [None]
        for p in range(seq.prompt_len - 1):
            lp, rank, top = self._at(seq, p, k)
            lps.append(lp)
            ranks.append(rank)
            tops.append(top)
        return PromptTokenLogprobs(lps, ranks, tops)

    def _at(self, seq: Sequence, p: int, k: int) -> tuple[float, int, list[tuple[int, float]]]:
        """(log-probability of prompt token p + 1, its rank, the k most likely tokens) from the item that
        computed position p."""
        owner: Sequence | SharedPrefix = seq
        pref = seq.prefix
        while pref is not None and p < pref.length:  # the outermost prefix holding p computed it
            owner, pref = pref, pref.prefix
        rows = self._rows.get(owner)
        if isinstance(owner, SharedPrefix) and p == owner.length - 1 and rows is not None and rows.last is not None:
            tok = int(seq.prompt_ids[p + 1])
            lp = rows.last[tok]
            top = []
            if k:
                vals, ids = rows.last.topk(k)
                top = list(zip(ids.tolist(), vals.double().tolist()))
            return float(lp), int((rows.last > lp).sum()) + 1, top
        if rows is None or rows.logprob[p] != rows.logprob[p]:
            raise ValueError(f"position {p} of sequence {seq.seq_id} was not scored")
        top = list(zip(rows.top_ids[p, :k].tolist(), rows.top_logprobs[p, :k].tolist())) if k else []
        return float(rows.logprob[p]), int(rows.rank[p]), top

    def release(self, seq: Sequence) -> None:
        """Forget ``seq``'s rows, and its prefixes' once no dependent of theirs is unfinished."""
        self._rows.pop(seq, None)
        pref = seq.prefix
        while pref is not None and pref.unfinished == 0:
            self._rows.pop(pref, None)
            pref = pref.prefix

    def __len__(self) -> int:
        return len(self._rows)
