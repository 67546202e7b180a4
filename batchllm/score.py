"""The scoring task: log-likelihoods of given continuations, and rolling log-likelihoods of whole texts.

lm-evaluation-harness's contract (``lm_eval.api.model.LM``), on batchllm's plan and engine:

- ``loglikelihood``: a row ``{"context": str, "continuations": [str, ...]}`` (or ``"continuation": str``)
  gives, per continuation, the summed log-probability of its tokens after the context, their count, and
  whether greedy decoding from the context would produce exactly them (``is_greedy``). Tokenized as
  lm-eval's ``HFLM._encode_pair``: trailing spaces of the context move to the continuation, the pair is
  encoded whole and the context alone (no special tokens), and the continuation is the whole encoding past
  the context's tokens, so the split is exact; an empty context is the tokenizer's BOS (else EOS) token.
- ``loglikelihood_rolling``: a row ``{"text": str}`` gives the summed log-probability of every token of
  the text, in lm-eval's disjoint windows of ``max_length`` tokens (the first after BOS / EOS).

Every (context, continuation) pair, and every window, is one request whose prompt is context +
continuation; the job's plan groups them like any prompts, so a few-shot context shared by many
questions, and a question shared by its options, is computed once (``batchllm.plan``). The engine keeps
the prompt log-probabilities of the positions that score continuations (``PromptLogprobs``: a sequence's
own positions from its context's last token on, its shared prefixes' positions), and each request samples
one token, which nothing reads.

Scoring runs in one process and writes one output file (JSONL, or Parquet for ``.parquet``), atomically.
It is not a durable job (no job folder, shards or resume): those commit the rows of ``OUTPUT_SCHEMA``,
one per generated sample, through ``pipeline.run_job``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from batchllm.build import LoadedModel, load_model, make_engine, model_max_len
from batchllm.config import JobConfig
from batchllm.engine.prompt_logprobs import PromptLogprobs
from batchllm.engine.sequence import Sequence as EngineSequence
from batchllm.execute import EngineCallbacks, run_plan
from batchllm.io.requests import Request, RowError
from batchllm.plan.plan import plan_requests
from batchllm.sampling_params import SamplingParams

# one greedy token per request: the engine samples after the prompt, scoring reads the prompt only
_ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0.0)


class Pair(NamedTuple):
    """One scored unit: a context's tokens and a continuation's, as lm-eval splits them."""

    context: list[int]
    continuation: list[int]


@dataclasses.dataclass
class ScoreItem:
    """One output row's work: the pairs it sums (one, or a rolling text's windows)."""

    row_id: str
    input_index: int
    continuation_index: int
    kind: str  # "loglikelihood" | "rolling"
    pairs: list[Pair]


class ScoreResult(NamedTuple):
    logprob: float
    num_tokens: int
    is_greedy: bool


@dataclasses.dataclass
class ScoreRun:
    """What ``score_pairs`` did: results in input order, and the prefill the plan saved."""

    results: list[ScoreResult | None]  # None: the pair does not fit the model's context
    prompt_tokens: int  # every request's prompt, as if each were computed alone
    prompt_tokens_computed: int  # what the engine computed (shared prefixes once)
    planned_saving: float

    @property
    def achieved_saving(self) -> float:
        return 1.0 - self.prompt_tokens_computed / self.prompt_tokens if self.prompt_tokens else 0.0


def prefix_token_id(tok) -> int:
    """lm-eval's ``prefix_token_id``: the BOS token, else the EOS token."""
    tid = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if tid is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to stand for an empty context")
    return int(tid)


def _encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def encode_pair(tok, context: str, continuation: str) -> Pair:
    """``HFLM._encode_pair``: the split of context + continuation into tokens, exact by construction."""
    if context == "":
        return Pair([prefix_token_id(tok)], _encode(tok, continuation))
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tok, context + continuation)
    ctx = _encode(tok, context)
    return Pair(whole[: len(ctx)], whole[len(ctx):])


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> list[Pair]:
    """lm-eval's ``get_rolling_token_windows(context_len=1)`` made disjoint (``make_disjoint_window``):
    pairs whose continuations cover ``tokens`` once, each scored with up to ``max_length`` tokens of input."""
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix_token] + tokens[: first - 1], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        pred_len = min(len(tokens) - predicted, max_length)
        end = predicted + pred_len
        windows.append((tokens[max(0, end - max_length - 1) : end - 1], tokens[end - pred_len : end]))
        predicted += pred_len
    return [Pair(list(a[: len(a) - (len(b) - 1)]), list(b)) for a, b in windows]


def score_pairs(lm: LoadedModel, cfg: JobConfig, pairs: Sequence[Pair]) -> ScoreRun:
    """Score every pair through the job's plan and engine (``cfg``: model, device, KV pool, page size,
    step budget). A pair whose context + continuation does not fit the engine's context (one token is
    sampled after it) gets None. ``ValueError`` for a pair without continuation tokens."""
    requests: list[Request] = []
    for i, p in enumerate(pairs):
        if not p.continuation or not p.context:
            raise ValueError(f"pair {i}: both the context and the continuation need at least one token")
        ids = np.asarray(p.context + p.continuation, dtype=np.int32)
        requests.append(Request(str(i), "score", i, _ONE_TOKEN, prompt_token_ids=ids, token_ids=ids))
    engine, eos = make_engine(cfg, lm, model_max_len(cfg, lm.config))
    plan = plan_requests(requests, "batchllm", engine.cfg.max_model_len, cfg.page_size)
    starts = [len(p.context) for p in pairs]
    # a sequence scores from its context's last token: the logits there give the continuation's first
    engine.runner.prompt_logprobs = collector = PromptLogprobs(lambda s: starts[s.request_index] - 1)
    results: list[ScoreResult | None] = [None] * len(pairs)
    computed_prompt = 0

    def finished(index: int, req: Request, seq: EngineSequence, row: dict[str, Any]) -> None:
        nonlocal computed_prompt
        lp, greedy = collector.score(seq, starts[index])
        results[index] = ScoreResult(lp, seq.prompt_len - starts[index], greedy)
        collector.release(seq)
        computed_prompt += seq.prompt_len

    def too_long(req: Request, err: RowError) -> None:
        pass  # its result stays None

    try:
        run = run_plan(engine, eos, requests, plan, seed=cfg.seed, page_size=cfg.page_size, preview=0,
                       callbacks=EngineCallbacks(too_long, finished, lambda stats: None, lambda: False))
    finally:
        engine.runner.prompt_logprobs = None
    return ScoreRun(results, computed_prompt, run.prompt_tokens_computed, plan.saving())


def read_items(path: str, tok, max_length: int) -> Iterator[ScoreItem | RowError]:
    """The rows of a JSONL scoring file as ``ScoreItem``s (one per continuation, one per rolling text),
    or ``RowError``s for rows that are not one of the two shapes."""
    prefix = None
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("a row must be a JSON object")
                rid = str(row.get("id", row.get("custom_id", i)))
                if "text" in row:
                    if not isinstance(row["text"], str):
                        raise ValueError("text must be a string")
                    if prefix is None:
                        prefix = prefix_token_id(tok)
                    yield ScoreItem(rid, i, 0, "rolling", rolling_windows(_encode(tok, row["text"]), prefix, max_length))
                    continue
                context = row.get("context")
                conts = row.get("continuations", [row["continuation"]] if "continuation" in row else None)
                if not isinstance(context, str) or not isinstance(conts, list) or not conts \
                        or not all(isinstance(c, str) and c for c in conts):
                    raise ValueError('a row needs "text", or "context" with "continuation" / "continuations" '
                                     "(non-empty strings)")
                for k, c in enumerate(conts):
                    yield ScoreItem(rid, i, k, "loglikelihood", [encode_pair(tok, context, c)])
            except (ValueError, KeyError, json.JSONDecodeError) as e:
                yield RowError(path, i, "invalid_request", str(e))


def score_file(cfg: JobConfig, path: str, output: str, lm: LoadedModel | None = None,
               max_length: int | None = None) -> tuple[int, int, ScoreRun]:
    """``batchllm score``: score ``path``'s rows with ``cfg``'s model and write one row per continuation /
    text to ``output`` (JSONL, or Parquet for ``.parquet``). ``max_length``: rolling windows' input length
    (default: what the engine's context allows). Returns (rows written, error rows, the run)."""
    lm = lm or load_model(cfg)
    limit = model_max_len(cfg, lm.config) - 2  # a window's prompt is max_length + 1 tokens, then one sampled
    items = list(read_items(path, lm.tokenizer, min(max_length or limit, limit)))
    work = [it for it in items if isinstance(it, ScoreItem)]
    pairs = [p for it in work for p in it.pairs]
    run = score_pairs(lm, cfg, pairs)
    rows: list[dict[str, Any]] = []
    pos = 0
    for it in items:
        if isinstance(it, RowError):
            rows.append({"id": None, "input_index": it.input_index, "continuation_index": None, "kind": None,
                         "logprob": None, "num_tokens": None, "is_greedy": None, "error": it.error_message})
            continue
        parts = run.results[pos : pos + len(it.pairs)]
        pos += len(it.pairs)
        row = {"id": it.row_id, "input_index": it.input_index, "continuation_index": it.continuation_index,
               "kind": it.kind, "logprob": None, "num_tokens": None, "is_greedy": None, "error": None}
        if any(r is None for r in parts):
            row["error"] = "prompt_too_long: context + continuation do not fit the model's context"
        else:
            row.update(logprob=sum(r.logprob for r in parts), num_tokens=sum(r.num_tokens for r in parts),
                       is_greedy=all(r.is_greedy for r in parts))
        rows.append(row)
    _write_rows(rows, output)
    return len(rows), sum(1 for r in rows if r["error"] is not None), run


def _write_rows(rows: list[dict[str, Any]], output: str) -> None:
    """Write ``rows`` to ``output`` atomically (a temporary file beside it, then a rename)."""
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".score-", suffix=".tmp")
    try:
        if output.endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            os.close(fd)
            pq.write_table(pa.Table.from_pylist(rows), tmp)
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
