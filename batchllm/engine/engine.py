"""The engine loop: schedule a step, run it, sample, and retire finished sequences.

``LLMEngine.step()`` reads as the whole loop (nano-vllm's shape). The engine knows nothing about files:
it consumes ``Sequence`` / ``SharedPrefix`` objects in plan order from an iterator and hands each
finished sequence to a callback, so the pipeline can stream millions of requests through it.

Structured output (``params.structured``; ``batchllm.engine.structured``): a constrained sequence gets a
grammar matcher at its first sampling step; each step starts filling the constrained rows' token bitmask
on the grammar's thread before the model's forward and waits for it after, sets the forbidden logits of
those rows only to -inf before ``sample`` (log-probs then reflect the mask, as in vLLM v1), and advances
each matcher by its sampled token before the stop rules. The grammar engine (llguidance) is imported and
its tokenizer view built only when a job constrains something (``grammar_compiler``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import torch

from batchllm.engine.cuda_graphs import DEFAULT_MAX_GRAPH_BATCH
from batchllm.engine.detokenizer import IncrementalDetokenizer, decode_all, find_stop
from batchllm.engine.kv_cache import KVCache
from batchllm.engine.kv_manager import KVManager
from batchllm.engine.model_runner import ModelRunner
from batchllm.engine.prefix_cache import PrefixCachingKVManager
from batchllm.engine.sampler import SamplingBatch, SamplingRow, sample
from batchllm.engine.scheduler import Scheduler, SchedulerConfig
from batchllm.engine.sequence import Sequence, SharedPrefix


def derive_seed(job_seed: int, custom_id: str, sample_index: int, row_seed: int | None = None) -> int:
    """The 63-bit seed of one sample: from the row's own seed if it has one, else from the job seed and
    custom_id. Independent of order, batching, sharding and resume point by construction."""
    key = f"row\0{row_seed}\0{sample_index}" if row_seed is not None else f"job\0{job_seed}\0{custom_id}\0{sample_index}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


class _StepMasks(NamedTuple):
    """The bitmask of a step's constrained sampling rows, being filled while the forward runs."""

    rows: list[int]  # their rows among the step's sampling rows (the logits' rows)
    bitmask: torch.Tensor  # row i: what rows[i] may sample (engine.structured's layout)
    filled: Any  # concurrent.futures.Future of the fill


@dataclasses.dataclass
class StepStats:
    """What one step did, for progress bars and the run's batch-size statistics."""

    num_seqs: int
    num_decodes: int
    num_tokens: int
    num_finished: int
    new_output_tokens: int
    seconds: float


class LLMEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        kv: KVCache,
        backend,
        sched_cfg: SchedulerConfig,
        device: torch.device,
        vocab_size: int,
        prefix_caching: bool = False,
        graphs: str = "auto",
        max_graph_batch: int = DEFAULT_MAX_GRAPH_BATCH,
        sampler_backend: str = "auto",
    ):
        """``graphs``: CUDA graphs for decode-only steps (``ModelRunner``): "auto" (on CUDA devices), "off"
        (``--enforce-eager``), "cuda", or "static" (the padded graph path run eagerly, for CPU tests).
        Graphs are captured here, before the first run, for decode steps of up to ``max_graph_batch`` rows.
        ``sampler_backend``: ``sample``'s backend ("auto", "torch" or "triton"; ``sampler.SAMPLER_BACKENDS``)."""
        self.model, self.tokenizer, self.kv = model, tokenizer, kv
        self.cfg = sched_cfg
        self.device = device
        self.vocab_size = vocab_size
        self.prefix_caching = prefix_caching
        self.sampler_backend = sampler_backend
        self.kv_manager = self._new_kv_manager()
        self.pool = self.kv_manager.pool  # the run's page pool: its counters, for callers and tests
        self.runner = ModelRunner(model, kv, backend, device, graphs=graphs,
                                  max_model_len=sched_cfg.max_model_len, max_graph_batch=max_graph_batch)
        self.scheduler: Scheduler | None = None
        self.step_stats: list[StepStats] = []
        self._grammar = None  # engine.structured.GrammarCompiler, built by grammar_compiler on first need
        self._bitmask: torch.Tensor | None = None  # reused across steps, grown to the most constrained rows

    def grammar_compiler(self, eos_token_ids: Iterable[int]):
        """The engine's structured-output ``GrammarCompiler`` (over its tokenizer and logits width), built on
        the first call (0.1-2 s: the tokenizer's view) and kept, so each distinct spec compiles once per
        engine. ``eos_token_ids``: the model's EOS ids (the first call's are kept). ImportError where the
        grammar engine (llguidance) is not installed."""
        if self._grammar is None:
            # imported here: only jobs that constrain need llguidance (the GPU image has none)
            from batchllm.engine.structured import GrammarCompiler

            self._grammar = GrammarCompiler(self.tokenizer, self.vocab_size, eos_token_ids)
        return self._grammar

    def run(
        self,
        source: Iterator[Sequence | SharedPrefix],
        on_finish: Callable[[Sequence], None],
        on_step: Callable[[StepStats], None] | None = None,
    ) -> None:
        """Run every sequence from ``source`` to completion; ``on_finish`` gets each finished sequence.

        Each run starts from a fresh page pool, so a run that was interrupted (an exception out of a
        callback) leaves nothing behind for the next one on the same engine."""
        self.kv_manager = self._new_kv_manager()
        self.pool = self.kv_manager.pool
        self.scheduler = Scheduler(self.kv_manager, self.cfg, source)
        while self.scheduler.has_work():
            stats = self.step(on_finish)
            self.step_stats.append(stats)
            if on_step is not None:
                on_step(stats)
        self.scheduler.check_idle_integrity()

    def _new_kv_manager(self) -> KVManager:
        # the streaming baseline caches pages by content hash (vLLM's APC); the BatchLLM plan needs no cache
        return PrefixCachingKVManager(self.kv) if self.prefix_caching else KVManager(self.kv)

    def step(self, on_finish: Callable[[Sequence], None]) -> StepStats:
        t0 = time.perf_counter()
        sched = self.scheduler
        step = sched.schedule()
        if step is None:
            raise RuntimeError("no step could be scheduled: a sequence does not fit in the KV pool")
        masks = self._start_masks(step)
        logits, samplers = self.runner.run(step)
        sched.advance(step)
        finished = 0
        if samplers:
            finished = self._sample_and_append(logits, samplers, on_finish, masks)
        return StepStats(
            num_seqs=sum(1 for it in step.items if it.generates),
            num_decodes=step.num_decodes,
            num_tokens=step.total_tokens,
            num_finished=finished,
            new_output_tokens=len(samplers),
            seconds=time.perf_counter() - t0,
        )

    def _start_masks(self, step) -> _StepMasks | None:
        """Start filling the bitmask of the step's constrained sampling rows (in the runner's order of
        sampling rows: the sequences whose step reaches their last token) on the grammar's thread; None
        when no row is constrained. A constrained sequence gets its matcher here, at its first sampling."""
        rows: list[int] = []
        matchers = []
        i = 0
        for item, q in zip(step.items, step.num_tokens):
            if item.generates and item.num_computed + q == item.total_len:
                if item.params.structured is not None:
                    if item.matcher is None:
                        item.matcher = self._new_matcher(item)
                    rows.append(i)
                    matchers.append(item.matcher)
                i += 1
        if not rows:
            return None
        grammar = self._grammar
        if self._bitmask is None or self._bitmask.shape[0] < len(rows):
            self._bitmask = grammar.allocate_bitmask(len(rows), pin_memory=self.device.type == "cuda")
        bitmask = self._bitmask[: len(rows)]
        return _StepMasks(rows, bitmask, grammar.fill_bitmask_async(matchers, bitmask))

    def _new_matcher(self, s: Sequence):
        """The grammar matcher of a constrained sequence, in the state of the output it holds."""
        from batchllm.engine.structured import CompileError  # loaded by grammar_compiler

        matcher = self.grammar_compiler(s.eos_ids).matcher(s.params.structured)
        if isinstance(matcher, CompileError):  # execute.run_plan makes those error rows before the run
            raise ValueError(f"structured output of sequence {s.seq_id} does not compile: {matcher.message}")
        if s.output_ids and not matcher.restore(s.output_ids):
            raise ValueError(f"the output of sequence {s.seq_id} is outside its grammar: {matcher.error}")
        return matcher

    def _sample_and_append(self, logits: torch.Tensor, seqs: list[Sequence], on_finish, masks: _StepMasks | None) -> int:
        if masks is not None:
            from batchllm.engine.structured import apply_bitmask  # loaded by grammar_compiler already

            masks.filled.result()
            apply_bitmask(logits, masks.bitmask, masks.rows)
        rows = [
            SamplingRow(
                params=s.params,
                seed=s.seed,
                step=len(s.output_ids),
                prompt_ids=s.prompt_ids,
                output_ids=s.output_ids,
                eos_ids=s.eos_ids,
                grammar_ended=s.matcher is not None and s.matcher.terminated,
            )
            for s in seqs
        ]
        out = sample(logits, SamplingBatch.build(rows, self.vocab_size, logits.device), backend=self.sampler_backend)
        token_ids = out.token_ids.tolist()  # the step's one host synchronisation
        lps = out.logprobs.tolist() if out.logprobs is not None else None
        tops = None
        if out.top_logprobs is not None:
            tops = (out.top_logprobs[0].tolist(), out.top_logprobs[1].tolist())
        done: list[Sequence] = []
        for i, (s, tok) in enumerate(zip(seqs, token_ids)):
            s.output_ids.append(tok)
            if s.matcher is not None and not s.matcher.accept(tok):  # the mask allowed it: a bug, never data
                raise RuntimeError(f"sequence {s.seq_id} sampled token {tok} outside its grammar: {s.matcher.error}")
            if s.params.logprobs is not None and lps is not None:
                if s.logprobs is None:
                    s.logprobs, s.top_logprobs = [], []
                s.logprobs.append(lps[i])
                k = s.params.logprobs
                s.top_logprobs.append(list(zip(tops[0][i][:k], tops[1][i][:k])) if tops is not None and k else [])
            if self._check_stop(s, tok):
                done.append(s)
        self._finalize_text([s for s in done if s.text is None])
        for s in done:
            self.scheduler.finish(s)
            on_finish(s)
        return len(done)

    def _check_stop(self, s: Sequence, tok: int) -> bool:
        """Apply vLLM's stop rules after appending ``tok``; sets finish_reason, and text when it is known.
        A grammar that admits nothing more ends its sequence at EOS even short of ``min_tokens`` (the
        sampler lets it sample EOS there: nothing else is allowed)."""
        p = s.params
        new_text = self._detokenize(s, tok) if p.stop else ""
        if len(s.output_ids) >= p.min_tokens or (s.matcher is not None and tok in s.eos_ids and s.matcher.terminated):
            if (not p.ignore_eos and tok in s.eos_ids) or tok in p.stop_token_ids:
                s.finish_reason = "stop"
                s.exclude_last_token = True  # the stopping token is counted but not part of the text
                if s.detokenizer is not None:
                    full = s.detokenizer.text  # the stopping token's text (new_text) is dropped
                    s.text = full[: len(full) - len(new_text)]
                return True
            if p.stop:
                cut = find_stop(s.detokenizer.text, p.stop, len(new_text))
                if cut >= 0:
                    s.finish_reason = "stop"
                    s.text = s.detokenizer.text[:cut]
                    return True
        if len(s.output_ids) >= p.max_tokens or s.total_len >= self.cfg.max_model_len:
            s.finish_reason = "length"
            if s.detokenizer is not None:
                s.detokenizer.flush()  # bytes of an incomplete character still pending
                s.text = s.detokenizer.text
            return True
        return False

    def _detokenize(self, s: Sequence, tok: int) -> str:
        """Feed ``tok`` to the sequence's incremental detokenizer (created on first use); returns new text."""
        if s.detokenizer is None:
            s.detokenizer = IncrementalDetokenizer(self.tokenizer, s.prompt_ids)
            for t in s.output_ids[:-1]:  # after a preemption the tokens so far are replayed
                s.detokenizer.append(t)
        return s.detokenizer.append(tok)

    def _finalize_text(self, seqs: list[Sequence]) -> None:
        """Decode, once, the outputs of sequences that needed no incremental detokenizer (no stop strings).

        Decoded in the context of the prompt's tail, so the text equals what the incremental path gives.
        """
        for s in seqs:
            ids = s.output_ids[:-1] if s.exclude_last_token else s.output_ids
            s.text = decode_all(self.tokenizer, ids, prompt_ids=s.prompt_ids)


