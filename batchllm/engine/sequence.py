"""Per-sequence engine state: one ``Sequence`` per (request, sample index), one ``SharedPrefix`` per shared prefix.

Token accounting, the one rule the scheduler and runner share::

    tokens       = prompt_ids + output_ids                       (len = total_len)
    num_computed = tokens whose K/V is in the cache              (0 <= num_computed < total_len)
    a step computes tokens[num_computed : num_computed + q]; if that reaches total_len, the last
    token's logits are sampled and the new token is appended (so total_len grows by one).

A decode is just q == 1; a prefill chunk is q > 1; recomputation after preemption resets num_computed
(to the shared prefix length when the sequence belongs to a group) and recomputes prompt and output
alike.

``Sequence`` and ``SharedPrefix`` are both ``Schedulable``: the protocol below is everything the
scheduler and the KV manager read or write on a unit of work, so neither asks which kind it holds.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, ClassVar, Protocol

import numpy as np

from batchllm.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Schedulable(Protocol):
    """A unit of work the scheduler runs and the KV manager holds pages for.

    ``pages`` cover ``tokens[:len(pages) * page_size]``; the first ``prefix.length`` tokens come from the
    outer ``prefix`` (its full pages shared, its partial last page copied) when there is one.
    ``generates``: a sampled sequence (decodes, counts against ``max_num_seqs``, grows as it outputs)
    rather than a shared prefix (prefill only, done once all its tokens are computed).
    """

    generates: ClassVar[bool]
    prefix: SharedPrefix | None
    pages: list[int]
    num_computed: int
    num_cached: int
    num_preemptions: int
    status: SeqStatus

    @property
    def prompt_len(self) -> int: ...

    @property
    def total_len(self) -> int: ...

    @property
    def num_pending(self) -> int: ...

    def token_slice(self, start: int, end: int) -> np.ndarray: ...


@dataclasses.dataclass(eq=False)
class SharedPrefix:
    """A prefix group's shared prompt prefix: computed once, its pages shared by every member.

    The prefix keeps its own reference on its pages until ``unfinished`` reaches zero, so a preempted
    member can share them again when it is re-admitted. Its dependents are its member samples and the
    prefixes that extend it: a prefix may itself extend an outer ``prefix`` (multi-level sharing), and
    is then computed like a member of that one: its first ``prefix.length`` tokens are shared, not
    computed. ``unfinished`` counts member samples not finished plus extending prefixes not released.
    """

    generates: ClassVar[bool] = False
    prefix_id: int
    token_ids: np.ndarray  # the prefix tokens (int32), from position 0 (outer prefix's tokens included)
    unfinished: int  # dependents (member samples, extending prefixes) not done yet
    pages: list[int] = dataclasses.field(default_factory=list)
    prefix: SharedPrefix | None = None  # the outer prefix this one extends
    num_computed: int = 0
    num_cached: int = 0  # leading tokens shared from the outer prefix, not computed
    num_preemptions: int = 0  # times its pages were released before its dependents were done
    status: SeqStatus = SeqStatus.WAITING

    @property
    def length(self) -> int:
        return len(self.token_ids)

    # a prefix is all prompt: these name its length in the protocol's terms
    prompt_len = total_len = length

    @property
    def ready(self) -> bool:
        return self.num_computed == self.length

    @property
    def num_pending(self) -> int:
        return self.length - self.num_computed

    def token_slice(self, start: int, end: int) -> np.ndarray:
        return self.token_ids[start:end]


@dataclasses.dataclass(eq=False)
class Sequence:
    """One sample of one request: its prompt, its output so far, and its sampling state."""

    generates: ClassVar[bool] = True
    seq_id: int
    request_index: int  # index into the job's request list
    sample_index: int
    prompt_ids: np.ndarray  # int32
    params: SamplingParams
    seed: int
    eos_ids: frozenset[int]
    prefix: SharedPrefix | None = None
    output_ids: list[int] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    num_cached: int = 0  # prompt tokens whose KV came from a shared prefix (or cache), not computed
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    exclude_last_token: bool = False  # finished on EOS / a stop token id: that token is not in the text
    detokenizer: Any = None  # IncrementalDetokenizer, only for sequences with stop strings
    text: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # engine.structured.GrammarMatcher of a constrained sequence (params.structured), created by the engine
    # at its first sampling step; it has accepted exactly output_ids (preemption keeps the output)
    matcher: Any = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens whose K/V still has to be computed before the next sample."""
        return self.total_len - self.num_computed

    def token_slice(self, start: int, end: int) -> np.ndarray:
        """tokens[start:end] over prompt + output without concatenating the whole sequence."""
        p = self.prompt_len
        if end <= p:
            return self.prompt_ids[start:end]
        out = np.asarray(self.output_ids[max(start - p, 0) : end - p], dtype=np.int32)
        if start >= p:
            return out
        return np.concatenate([self.prompt_ids[start:], out])
