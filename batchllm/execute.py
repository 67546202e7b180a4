"""ENGINE stage: a plan's requests through an engine, written once for one process and the Ray replicas.

``run_plan`` is what the single-process job (``batchllm.pipeline``) and each Ray replica
(``batchllm.distributed.replica.Replica.run_unit``, on its ``Plan.subset``) call between planning and
writing. It owns what both need alike:

- prompts this engine's KV pool cannot hold (``engine.cfg.max_model_len``, lowered to the pool by
  ``build.fit_to_pool``) become ``prompt_too_long`` rows and leave the plan (``Plan.without``): they never
  reach the engine, which could not schedule them;
- structured output (``SamplingParams.structured``): each distinct spec of the plan is compiled once, by the
  engine's grammar compiler (``LLMEngine.grammar_compiler``, built only when the plan constrains something),
  before the run; a spec the grammar engine refuses makes its requests ``invalid_structured_output`` rows
  with the engine's message, and where the grammar engine is not installed the constrained requests are
  ``unsupported_parameter`` rows: either way they leave the plan and the job goes on;
- prompt log-probabilities (``SamplingParams.prompt_logprobs``, vLLM's semantics): when a request of the
  plan asks, the runner gets a ``PromptLogprobs`` collector for the run (the top-k the largest asked), which
  scores the prompt positions of the requests that ask and of every shared prefix (a prefix is scored once
  for all its members, as it is computed once); each asking request's rows carry its entries. The
  fcfs-lru baseline's prefix cache reuses prompt positions without computing their logits, so there such
  requests are ``unsupported_parameter`` rows;
- the engine's work is exactly the plan (``engine.sources.build_sources``);
- every finished sample becomes its output row (``jobs.results.completion_row``; log-probability entries
  spelled by one ``TokenSpeller`` of the engine's tokenizer per run), handed to the caller
  with the sample; the first ``preview`` of them are kept for the run's preview;
- a stop request (``callbacks.stop``, checked after every engine step) ends the run after that step:
  nothing more is admitted, and the caller commits the requests that completed;
- the run's statistics: steps, prompt tokens computed, preemptions, seconds.

What happens to the rows (a recorder and the job's writer, or a replica's shard) is the caller's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from batchllm.engine.engine import LLMEngine, StepStats
from batchllm.engine.prompt_logprobs import PromptLogprobs
from batchllm.engine.sequence import Sequence
from batchllm.engine.sources import build_sources
from batchllm.io import requests as rq
from batchllm.io.requests import Request, RowError
from batchllm.jobs.results import TokenSpeller, completion_row, prompt_preview
from batchllm.plan.plan import Plan


@dataclass(frozen=True)
class EngineCallbacks:
    """What ``run_plan`` tells its caller, and asks it.

    ``rejected(request, error)``: a request that leaves the plan as an error row (a prompt the KV pool cannot
    hold, a structured output that does not compile), with its error record.
    ``finished(request_index, request, sequence, row)``: a sample finished; ``row`` is its output row.
    ``step(stats)``: an engine step ended (after ``finished`` for the samples it finished).
    ``stop()``: True to end the run after the current step.
    """

    rejected: Callable[[Request, RowError], None]
    finished: Callable[[int, Request, Sequence, dict[str, Any]], None]
    step: Callable[[StepStats], None]
    stop: Callable[[], bool]


class EngineRun(NamedTuple):
    """What one ``run_plan`` did."""

    stopped: bool  # ended by ``callbacks.stop`` (complete requests were handed on, the rest were not run out)
    seconds: float  # wall time inside the engine
    steps: list[StepStats]  # this run's engine steps
    prompt_tokens_computed: int  # prefill work actually done (shared prefixes once, recomputation included)
    num_preemptions: int
    preview: list[dict[str, str]]  # the first finished samples: custom_id, prompt, text


class _Stopped(Exception):
    """Internal: ``callbacks.stop()`` said so; raised from the engine's step callback to leave its loop."""


def too_long_error(r: Request, fits: int) -> RowError:
    """The ``prompt_too_long`` row of a request whose prompt a KV pool of ``fits`` tokens per sequence
    cannot hold."""
    return RowError(r.input_file, r.input_index, rq.PROMPT_TOO_LONG,
                    f"prompt has {len(r.token_ids)} tokens; the KV cache holds at most {fits} tokens per sequence "
                    "(raise --kv-cache-tokens or lower --max-model-len)", r.custom_id, kept=r.kept)


def structured_errors(engine: LLMEngine, eos: frozenset[int], requests: Mapping[int, Request],
                      plan: Plan) -> dict[int, RowError]:
    """The error rows of the plan's requests whose structured output cannot run, by request index: each
    distinct spec is compiled once (the engine's compiler caches it for the run's matchers)."""
    constrained = [int(i) for g in plan.groups for i in g.members if requests[int(i)].sampling.structured is not None]
    if not constrained:
        return {}
    try:
        compiler = engine.grammar_compiler(eos)
    except ImportError as e:
        return {i: _row_error(requests[i], rq.UNSUPPORTED_PARAMETER,
                              f"structured output needs the llguidance package, which this installation lacks ({e})")
                for i in constrained}
    from batchllm.engine.structured import CompileError  # loaded by grammar_compiler

    errors = {}
    for i in constrained:
        grammar = compiler.compile(requests[i].sampling.structured)
        if isinstance(grammar, CompileError):
            errors[i] = _row_error(requests[i], rq.INVALID_STRUCTURED_OUTPUT, grammar.message)
    return errors


def prompt_logprobs_errors(engine: LLMEngine, requests: Mapping[int, Request], plan: Plan) -> dict[int, RowError]:
    """The error rows of the plan's requests that ask for prompt log-probabilities an engine with prefix
    caching (the fcfs-lru baseline) cannot give: its cache hits skip the positions' logits."""
    if not engine.prefix_caching:
        return {}
    return {i: _row_error(requests[i], rq.UNSUPPORTED_PARAMETER,
                          "prompt_logprobs needs --policy batchllm: the fcfs-lru baseline's prefix cache reuses "
                          "prompt positions without computing their logits")
            for i in _asking(requests, plan)}


def _asking(requests: Mapping[int, Request], plan: Plan) -> list[int]:
    """The plan's requests that ask for prompt log-probabilities."""
    return [int(i) for g in plan.groups for i in g.members if requests[int(i)].sampling.prompt_logprobs is not None]


def _row_error(r: Request, code: str, message: str) -> RowError:
    return RowError(r.input_file, r.input_index, code, message, r.custom_id, kept=r.kept)


def run_plan(engine: LLMEngine, eos: frozenset[int], requests: Mapping[int, Request], plan: Plan, *, seed: int,
             page_size: int, preview: int, callbacks: EngineCallbacks) -> EngineRun:
    """Run ``plan`` (request indices into ``requests``: the job's list, or a replica's dict of its plan's
    members) through ``engine``; see the module docstring. Exceptions of the engine or of a callback
    propagate (the engine starts its next run from a fresh page pool)."""
    fits = engine.cfg.max_model_len
    rejected = {int(i): too_long_error(requests[int(i)], fits)
                for g in plan.groups for i in g.members if len(requests[int(i)].token_ids) >= fits}
    if rejected:
        plan = plan.without(list(rejected))
    invalid = structured_errors(engine, eos, requests, plan)
    if invalid:
        plan = plan.without(list(invalid))
    no_prompt_logprobs = prompt_logprobs_errors(engine, requests, plan)
    if no_prompt_logprobs:
        plan = plan.without(list(no_prompt_logprobs))
    for i, error in {**rejected, **invalid, **no_prompt_logprobs}.items():
        callbacks.rejected(requests[i], error)
    shown: list[dict[str, str]] = []
    asking = _asking(requests, plan)
    collector = None
    if asking:
        if engine.runner.prompt_logprobs is not None:
            raise ValueError("the engine's runner already collects prompt log-probabilities for another caller")
        collector = PromptLogprobs(
            lambda s: 0 if requests[s.request_index].sampling.prompt_logprobs is not None else s.prompt_len,
            top_k=max(requests[i].sampling.prompt_logprobs for i in asking))

    spells = engine.tokenizer is not None and any(
        requests[int(i)].sampling.logprobs is not None or requests[int(i)].sampling.prompt_logprobs is not None
        for g in plan.groups for i in g.members)
    speller = TokenSpeller(engine.tokenizer) if spells else None  # one per run: each distinct id decoded once

    def on_finish(seq: Sequence) -> None:
        req = requests[seq.request_index]
        if len(shown) < preview:
            shown.append({"custom_id": req.custom_id, "prompt": prompt_preview(req), "text": seq.text})
        entries = None
        if collector is not None:
            if req.sampling.prompt_logprobs is not None:
                entries = collector.entries(seq, req.sampling.prompt_logprobs)
            collector.release(seq)  # this sample's rows, and its prefixes' once no dependent is left
        callbacks.finished(seq.request_index, req, seq, completion_row(req, seq, entries, speller))

    def on_step(stats: StepStats) -> None:
        callbacks.step(stats)
        if callbacks.stop():
            raise _Stopped  # out of engine.run: nothing more is admitted

    if not plan.groups:  # nothing the pool can hold: the engine does not run (its scheduler is a previous run's)
        return EngineRun(False, 0.0, [], 0, 0, shown)
    steps_before = len(engine.step_stats)
    t0 = time.perf_counter()
    stopped = False
    if collector is not None:
        engine.runner.prompt_logprobs = collector
    try:
        engine.run(build_sources(requests, plan, eos, seed, page_size), on_finish, on_step)
    except _Stopped:
        stopped = True
    finally:
        if collector is not None:
            engine.runner.prompt_logprobs = None
    seconds = time.perf_counter() - t0
    sched = engine.scheduler  # this run's
    return EngineRun(stopped, seconds, engine.step_stats[steps_before:], sched.prompt_tokens_computed,
                     sched.num_preemptions, shown)
