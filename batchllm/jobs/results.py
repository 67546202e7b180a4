"""A job's output rows and its run summary: completion and error rows, the counts of ``JobSummary``.

``completion_row`` / ``error_row`` are the rows of ``io.writer.OUTPUT_SCHEMA`` (plus the kept input
columns), built the same way in one process and on each Ray replica. ``JobSummary`` is what
``pipeline.run_job`` returns and what the manifest records at the end of a run.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
from collections.abc import Sequence as Seq
from typing import Any, NamedTuple

from batchllm.engine.prompt_logprobs import PromptTokenLogprobs
from batchllm.engine.sequence import Sequence
from batchllm.io.requests import Request, RowError
from batchllm.jobs.recorder import ResultRecorder
from batchllm.models.tokenizer import byte_chars

@dataclasses.dataclass
class JobSummary:
    """What a run of a job did: ``run_job``'s result, the summary the manifest records at the end of the
    run (``to_dict``), the CLI's summary table and the bench's figures. Counts are this run's unless
    noted."""

    requests: int = 0  # every request of the job, earlier runs included
    done_before: int = 0  # requests finished by earlier runs (resume)
    errors: int = 0  # rows that failed in this run
    samples: int = 0
    prompt_tokens: int = 0  # as the user sees them (every sample's prompt)
    cached_tokens: int = 0
    output_tokens: int = 0
    load_seconds: float = 0.0
    wall_seconds: float = 0.0
    prompt_tokens_computed: int = 0  # prefill work actually done (shared prefixes once, recomputation included)
    planned_saving: float | None = None  # what the plan promised (None for the streaming baseline)
    max_saving: float | None = None  # the most any prefix cache could save on these prompts
    num_steps: int = 0
    num_preemptions: int = 0
    batch_seqs: tuple[int, float, int] = (0, 0.0, 0)  # min / median / max sequences per step
    batch_tokens: tuple[int, float, int] = (0, 0.0, 0)
    errors_by_code: dict[str, int] = dataclasses.field(default_factory=dict)
    replicas: int = 1  # engine replicas (batchllm.distributed); 1: this process
    replica_failures: int = 0  # replicas lost during the run (their work was redone elsewhere)
    preview: list[dict] = dataclasses.field(default_factory=list)

    @property
    def achieved_saving(self) -> float:
        """1 - prompt tokens computed / prompt tokens as the user sees them."""
        return 1.0 - self.prompt_tokens_computed / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.wall_seconds if self.wall_seconds else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["output_tok_s"], d["total_tok_s"] = self.output_tok_s, self.total_tok_s
        d["achieved_saving"] = self.achieved_saving
        return d


def error_row(err: RowError) -> dict:
    return {
        "custom_id": err.custom_id,
        "input_file": err.input_file,
        "input_index": err.input_index,
        "error_code": err.error_code,
        "error_message": err.error_message,
        **(err.kept or {}),
    }


def completion_row(req: Request, seq: Sequence, prompt_logprobs: PromptTokenLogprobs | None = None,
                   speller: TokenSpeller | None = None) -> dict:
    """The output row of finished sample ``seq`` of ``req``; ``prompt_logprobs``: the request's prompt
    log-probabilities when it asked for them (``SamplingParams.prompt_logprobs``), the same in every
    sample's row; ``speller``: the job's tokenizer's, which gives log-probability entries their ``token``
    text (None without a tokenizer: ``token`` is null)."""
    row = {
        "custom_id": req.custom_id,
        "input_file": req.input_file,
        "input_index": req.input_index,
        "sample_index": seq.sample_index,
        "text": seq.text,
        "finish_reason": seq.finish_reason,
        "prompt_tokens": seq.prompt_len,
        "completion_tokens": len(seq.output_ids),
        "cached_tokens": seq.num_cached,
        "token_ids": seq.output_ids,
        "request_type": "chat" if req.messages is not None else "completion",
        **(req.kept or {}),  # --keep-columns
    }
    if seq.logprobs is not None:
        row["logprobs"] = seq.logprobs
        row["logprob_tokens"] = [token_text(speller, t) for t in seq.output_ids[: len(seq.logprobs)]]
        row["top_logprobs"] = [[{"token_id": t, **token_text(speller, t), "logprob": lp} for t, lp in alts]
                               for alts in seq.top_logprobs]
    if prompt_logprobs is not None:
        row["prompt_logprobs"] = prompt_logprobs_entries(seq.prompt_ids, prompt_logprobs, speller)
    return row


def prompt_logprobs_entries(prompt_ids, pl: PromptTokenLogprobs, speller: TokenSpeller | None = None) -> list[dict | None]:
    """The ``prompt_logprobs`` column's value: per prompt token, its id, text (``token_text``),
    log-probability, rank and the top tokens (entry 0, the first token, has no context and is None), as
    vLLM returns them."""
    out: list[dict | None] = [None]
    for j in range(1, len(pl.logprobs)):
        t = int(prompt_ids[j])
        out.append({"token_id": t, **token_text(speller, t), "logprob": pl.logprobs[j], "rank": pl.ranks[j],
                    "top_logprobs": [{"token_id": a, **token_text(speller, a), "logprob": lp} for a, lp in (pl.top[j] or [])]})
    return out


def token_text(speller: TokenSpeller | None, token_id: int) -> dict[str, Any]:
    """``{"token": text, "bytes": ...}`` of a log-probability entry, OpenAI's convention: ``bytes`` is null
    when the text is the token's exact UTF-8, else (part of a character: text with ``\\xNN`` escapes) the
    token's bytes; both null without a tokenizer."""
    if speller is None:
        return {"token": None, "bytes": None}
    text, raw = speller.spell(int(token_id))
    return {"token": text, "bytes": None if text.encode("utf-8") == raw else list(raw)}


class TokenSpeller:
    """Token text and exact bytes for logprobs (the output columns' ``token`` / ``bytes``, the OpenAI export),
    from the job's tokenizer, each distinct id decoded once."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.cache: dict[int, tuple[str, bytes]] = {}
        self.special = set(getattr(tok, "all_special_ids", []) or [])
        added = getattr(tok, "added_tokens_decoder", None) or {}
        self.special.update(int(i) for i in added)
        self.byte_level = _byte_level(tok)
        self.byte_of = {c: b for b, c in enumerate(byte_chars())}

    def spell(self, token_id: int) -> tuple[str, bytes]:
        """(text, exact bytes) of ``token_id``; a token holding part of a UTF-8 character has its bytes as
        ``\\xNN`` escapes in the text."""
        hit = self.cache.get(token_id)
        if hit is None:
            raw = self._bytes(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("utf-8", "backslashreplace")  # part of a character: its bytes, escaped
            hit = self.cache[token_id] = (text, raw)
        return hit

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tok.convert_ids_to_tokens(int(token_id))
        if piece is None:
            return self.tok.decode([int(token_id)]).encode("utf-8")
        if token_id in self.special:
            return piece.encode("utf-8")
        if self.byte_level and all(c in self.byte_of for c in piece):
            return bytes(self.byte_of[c] for c in piece)
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)  # SentencePiece byte fallback
        if m:
            return bytes([int(m.group(1), 16)])
        if "\u2581" in piece:  # SentencePiece marks a space with U+2581
            return piece.replace("\u2581", " ").encode("utf-8")
        return self.tok.decode([int(token_id)]).encode("utf-8")


def _byte_level(tok: Any) -> bool:
    """Whether the tokenizer's decoder is byte-level BPE (GPT-2's byte alphabet), alone or in a sequence."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        decoder = json.loads(backend.to_str()).get("decoder")
    except Exception:  # noqa: BLE001  (no serialisable definition: not byte-level as far as we can tell)
        return False
    return '"ByteLevel"' in json.dumps(decoder)


def record_error(summary: JobSummary, recorder: ResultRecorder, err: RowError) -> None:
    """Count ``err`` in the summary (total and per code) and hand its row to the recorder."""
    summary.errors += 1
    summary.errors_by_code[err.error_code] = summary.errors_by_code.get(err.error_code, 0) + 1
    recorder.error(error_row(err))


def prompt_preview(req: Request) -> str:
    """The text ``--preview`` shows for a request: its last chat message, its prompt, or a token count."""
    if req.messages is not None:
        return str(req.messages[-1].get("content", ""))
    if req.prompt is not None:
        return req.prompt
    return f"<{len(req.prompt_token_ids)} token ids>"


class BatchStats(NamedTuple):
    """Engine steps of a run and the (min, median, max) sequences and tokens per step."""

    num_steps: int
    batch_seqs: tuple[int, float, int]
    batch_tokens: tuple[int, float, int]


def batch_stats(step_seqs: Seq[int], step_tokens: Seq[int]) -> BatchStats:
    """``BatchStats`` of a run from each step's sequence and token counts (all replicas' steps together
    in a distributed run); zeros for a run without a step."""
    if not len(step_seqs):
        return BatchStats(0, (0, 0.0, 0), (0, 0.0, 0))
    seqs, toks = [int(s) for s in step_seqs], [int(t) for t in step_tokens]
    return BatchStats(len(seqs), (min(seqs), float(statistics.median(seqs)), max(seqs)),
                      (min(toks), float(statistics.median(toks)), max(toks)))
