"""Structured output: grammar-constrained decoding with llguidance (the grammar engine of vLLM's ``guidance``
backend and of llama.cpp's), independent of the engine's step.

Why llguidance (measured on this project's 2-core CPU, shared and loaded, with SmolLM2's 49,152-token GGUF
tokenizer and the dummy presets' byte-level ones, 64 random JSON schemas, a batch of 64 sequences each with
its own schema; all figures in the issue 17 report): compiling a schema costs 0.45 ms median, 1.3 ms mean
(xgrammar 0.2.9: 5-7 ms median, 12 ms mean, 30 ms p90), as llguidance builds its lexer lazily instead of
precomputing a token-mask cache per grammar. xgrammar fills masks faster (0.3-0.4 ms per 64 rows against
1.1-1.4 ms), but when every request has its own schema the compile is paid per request: compile plus the
masks of a 100-token request come to ~7 ms with llguidance against ~13 ms with xgrammar. llguidance also
has no torch / transformers pin (xgrammar requires both), takes GBNF and Lark grammars, and drops the GIL
while it computes a mask, so the fill overlaps the model's forward.

Contracts (what the engine's wiring relies on):

- ``GrammarCompiler``: one per job, and one per Ray replica (it does not pickle; the ``StructuredOutput``
  specs travel): the tokenizer's llguidance view (built once: 0.1-0.4 s on an idle CPU, up to 2 s under
  load) and the compiled grammars, cached by content (``StructuredOutput`` hashes by its text), so each
  distinct spec compiles once. ``compile`` returns a ``Grammar`` or a ``CompileError`` whose ``message`` is
  the grammar engine's, one line, for an ``invalid_structured_output`` error row; the job goes on.
- ``GrammarMatcher``: one per sequence (each of a request's ``n`` samples has its own), created from a
  ``Grammar`` (a cheap copy of the compiled one). It tracks the tokens it accepted, so ``restore(output)``
  puts it back in the state of any output the sequence holds: preemption by recomputation keeps a
  sequence's output, so the matcher stays valid, and ``restore`` covers any path that drops or replays
  output tokens (``rollback`` / ``reset`` are its pieces).
- Masks: ``allocate_bitmask(rows)`` gives an int32 ``(rows, ceil(vocab / 32))`` tensor (bit ``t % 32`` of
  word ``t // 32`` set = token ``t`` allowed). ``GrammarCompiler.fill_bitmask`` fills one row per matcher
  (a loop, or llguidance's thread pool), ``fill_bitmask_async`` does it off the calling thread (start it before the
  model's forward, wait for it before sampling). ``apply_bitmask`` sets the forbidden logits of the
  constrained rows only to -inf, in place, before the sampler (penalties, temperature, top-k/p and
  logprobs then see the constrained distribution, as in vLLM).
- EOS: a matcher is ``terminated`` once its grammar admits nothing more; its mask then allows the EOS ids
  only, and it accepts further EOS tokens (not passed to llguidance). Where the grammar may end or go on
  (a number's digits), its mask allows EOS and the continuations. ``min_tokens``: the sampler's EOS ban
  must skip a terminated constrained row (the grammar leaves nothing else; an empty distribution would be
  the alternative), so a constrained output may end before ``min_tokens``; a non-terminated row keeps the
  ban (the grammar's other tokens remain). ``ignore_eos``: generation goes on to ``max_tokens`` with the
  forced EOS tokens, which the detokenizer skips as special tokens, so the text stays the grammar's
  complete output (a benchmark can force equal lengths this way).
- A stop string or ``max_tokens`` may end an output before its grammar does (``finish_reason`` "stop" /
  "length"), as in vLLM: such an output need not parse; only one ended by EOS under its grammar does.
- A token outside the mask (``accept`` returns False) means the mask was not applied to that row: the
  matcher is then in an error state until ``restore`` / ``reset``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import sys
from typing import Any, Iterable, NamedTuple, Sequence

import llguidance
import llguidance.hf
import numpy as np
import torch

from batchllm.sampling_params import StructuredOutput

if sys.byteorder != "little":  # apply_bitmask reads the int32 words as bytes, lowest bit first
    raise ImportError("batchllm.engine.structured needs a little-endian machine")

_MAX_ERROR_CHARS = 400
# What apply_bitmask adds to a logit whose bit is 0 (forbidden) or 1 (allowed).
_ADDEND = np.array([-np.inf, 0.0], dtype=np.float32)


class CompileError(NamedTuple):
    """A spec the grammar engine refuses; ``message``: its reason, one line (an error row's message)."""

    message: str


@dataclasses.dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled spec: llguidance's matcher in its initial state, copied for each sequence."""

    spec: StructuredOutput
    template: Any  # llguidance.LLMatcher, never advanced


class GrammarCompiler:
    """The job's grammar engine: the tokenizer's view and the compiled specs (see the module docstring).

    ``vocab_size``: the width of the model's logits (may exceed the tokenizer's ids: padded vocabularies);
    ``eos_token_ids``: every id that ends a sequence. ``max_cached``: compiled grammars kept (least recently
    used dropped first; a matcher keeps its own grammar alive). ``threads``: 1 fills the masks one matcher
    after the other on the calling thread; more hand a batch to llguidance's pool of that many threads.
    Measured on this project's 2-core CPU (64 rows, SmolLM2's vocabulary): the pool took 2.4 ms idle and
    7-15 ms under load against 0.9-1.5 ms for the loop, so 1 is the default; a host with cores to spare
    (a GPU server) may pass more.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int], *, threads: int = 1,
                 max_cached: int = 4096) -> None:
        eos = sorted(set(eos_token_ids))
        if not eos:
            raise ValueError("structured output needs the model's EOS token ids")
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos)
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self._executor = llguidance.LLExecutor(num_threads=threads) if threads > 1 else None
        self._cache: collections.OrderedDict[StructuredOutput, Grammar | CompileError] = collections.OrderedDict()
        self._max_cached = max_cached
        self._filler: concurrent.futures.ThreadPoolExecutor | None = None
        self.compiled = 0  # specs compiled so far (cache misses)

    def compile(self, spec: StructuredOutput) -> Grammar | CompileError:
        """The compiled grammar of ``spec``, from the cache when an equal spec was compiled before."""
        hit = self._cache.get(spec)
        if hit is not None:
            self._cache.move_to_end(spec)
            return hit
        result = self._compile(spec)
        self.compiled += 1
        self._cache[spec] = result
        if len(self._cache) > self._max_cached:
            self._cache.popitem(last=False)
        return result

    def matcher(self, spec: StructuredOutput) -> GrammarMatcher | CompileError:
        """A fresh matcher for one sequence constrained by ``spec``."""
        grammar = self.compile(spec)
        return grammar if isinstance(grammar, CompileError) else GrammarMatcher(grammar, self.eos_token_ids)

    def allocate_bitmask(self, rows: int, *, pin_memory: bool = False) -> torch.Tensor:
        """An int32 bitmask for ``rows`` constrained rows, every token allowed; ``pin_memory``: in page-locked
        memory, so that ``apply_bitmask`` uploads it to a GPU without blocking."""
        mask = torch.empty((rows, (self.vocab_size + 31) // 32), dtype=torch.int32, pin_memory=pin_memory)
        return mask.fill_(-1)

    def fill_bitmask(self, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor) -> None:
        """Row ``i`` of ``bitmask`` := the tokens ``matchers[i]`` allows next (llguidance drops the GIL while
        it computes). ``bitmask``: contiguous, on the CPU (pinned, for an asynchronous upload)."""
        if bitmask.dtype != torch.int32 or not bitmask.is_contiguous() or bitmask.device.type != "cpu":
            raise ValueError("the bitmask must be a contiguous int32 CPU tensor (allocate_bitmask)")
        if len(matchers) > bitmask.shape[0] or bitmask.shape[1] * 32 < self.vocab_size:
            raise ValueError(f"bitmask of shape {tuple(bitmask.shape)} cannot hold {len(matchers)} rows of "
                             f"{self.vocab_size} tokens")
        if self._executor is None:
            for i, m in enumerate(matchers):
                m.fill_bitmask(bitmask, i)
        elif matchers:
            self._executor.unsafe_compute_mask_ptr([(m._matcher, i) for i, m in enumerate(matchers)],
                                                   bitmask.data_ptr(), bitmask.shape[1] * 4, len(matchers))

    def fill_bitmask_async(self, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor) -> concurrent.futures.Future:
        """``fill_bitmask`` on a background thread; ``.result()`` before reading ``bitmask``. The matchers
        must not accept tokens until then."""
        if self._filler is None:
            self._filler = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchllm-mask")
        return self._filler.submit(self.fill_bitmask, list(matchers), bitmask)

    def close(self) -> None:
        """Stops the background filling thread (started by ``fill_bitmask_async``)."""
        if self._filler is not None:
            self._filler.shutdown(wait=True)
            self._filler = None

    def _compile(self, spec: StructuredOutput) -> Grammar | CompileError:
        try:
            if spec.kind == "json":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    spec.spec, defaults={"whitespace_flexible": spec.any_whitespace})
            elif spec.kind == "regex":
                grammar = llguidance.LLMatcher.grammar_from_regex(spec.spec)
            elif spec.kind == "choice":
                grammar = llguidance.LLMatcher.grammar_from_lark(
                    "start: " + " | ".join(json.dumps(c) for c in json.loads(spec.spec)))
            else:  # GBNF or Lark, told apart by llguidance (as vLLM's guidance backend does)
                grammar = llguidance.grammar_from("grammar", spec.spec)
        except ValueError as e:
            return CompileError(_one_line(str(e)))
        template = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if template.is_error():
            return CompileError(_one_line(template.get_error()))
        return Grammar(spec, template)


class GrammarMatcher:
    """One sequence's position in its grammar (see the module docstring for the contracts)."""

    def __init__(self, grammar: Grammar, eos_token_ids: frozenset[int]) -> None:
        self.grammar = grammar
        self._eos = eos_token_ids
        self._matcher = grammar.template.deep_copy()
        self._tokens: list[int] = []  # every token accepted, forced EOS tokens after termination included
        self._consumed = 0  # of which llguidance consumed (the rest: EOS tokens after termination)

    @property
    def terminated(self) -> bool:
        """The grammar admits nothing more: the mask allows EOS only."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    @property
    def error(self) -> str | None:
        """Why the matcher refused a token (one line), None when it has not."""
        return _one_line(self._matcher.get_error()) if self._matcher.is_error() else None

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Row ``row`` of ``bitmask`` := the tokens allowed next (``GrammarCompiler.fill_bitmask``: a batch)."""
        view = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(view.data_ptr(), view.numel() * view.element_size())

    def accept(self, token: int) -> bool:
        """Advance by the sampled ``token``; False (and an error state) when the grammar forbids it."""
        if self.terminated:
            if token not in self._eos:
                return False
            self._tokens.append(token)
            return True
        if not self._matcher.consume_token(token):
            return False
        self._tokens.append(token)
        self._consumed += 1
        return True

    def rollback(self, num_tokens: int) -> None:
        """Forget the last ``num_tokens`` accepted tokens."""
        if not 0 <= num_tokens <= len(self._tokens):
            raise ValueError(f"cannot roll back {num_tokens} of {len(self._tokens)} tokens")
        if self._matcher.is_error():
            self.restore(self._tokens[:len(self._tokens) - num_tokens])
            return
        forced = len(self._tokens) - self._consumed
        grammar_tokens = max(0, num_tokens - forced)
        if grammar_tokens and not self._matcher.rollback(grammar_tokens):
            raise RuntimeError(f"llguidance could not roll back {grammar_tokens} tokens")
        self._consumed -= grammar_tokens
        del self._tokens[len(self._tokens) - num_tokens:]

    def reset(self) -> None:
        """Back to the grammar's start (also out of an error state)."""
        self._matcher = self.grammar.template.deep_copy()
        self._tokens.clear()
        self._consumed = 0

    def restore(self, output_token_ids: Sequence[int]) -> bool:
        """Put the matcher in the state of a sequence whose output is ``output_token_ids``: roll back what
        it accepted beyond their common prefix and accept the rest. False when the grammar refuses them."""
        output = list(output_token_ids)
        if self._matcher.is_error():
            self.reset()
        common = 0
        for a, b in zip(self._tokens, output):
            if a != b:
                break
            common += 1
        self.rollback(len(self._tokens) - common)
        return all(self.accept(t) for t in output[common:])


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int] | None = None) -> None:
    """In place: ``logits[rows[i], t] = -inf`` for every token ``t`` that row ``i`` of ``bitmask`` forbids;
    other rows are not touched. ``rows`` None: bitmask row ``i`` is logits row ``i`` for all rows.
    ``bitmask`` may be on the CPU (it is copied to the logits' device) and wider than the logits (its
    words round the vocabulary up to 32).

    float32 logits on the CPU take a numpy path: bits unpacked by ``np.unpackbits``, then each row adds 0
    or -inf (branch-free). Measured on this project's 2-core CPU for 64 x 49,152 logits, under load:
    4-12 ms against 40-60 ms for torch's ``masked_fill_`` (whose per-element branch on a scattered mask
    mispredicts). Elsewhere (a GPU, other dtypes) the bits unpack with torch shifts on the device.
    """
    n, vocab = (logits.shape[0] if rows is None else len(rows)), logits.shape[1]
    if n == 0:
        return
    if bitmask.shape[0] < n or bitmask.shape[1] * 32 < vocab:
        raise ValueError(f"bitmask of shape {tuple(bitmask.shape)} does not cover {n} rows of {vocab} logits")
    targets = range(n) if rows is None else rows
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.stride(-1) == 1:
        words = bitmask[:n].contiguous().numpy().view(np.uint8)
        allowed = np.unpackbits(words, axis=1, count=vocab, bitorder="little")
        view = logits.numpy()
        for i, row in enumerate(targets):
            view[row] += _ADDEND.take(allowed[i])
        return
    words = bitmask[:n].to(logits.device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    forbidden = ((words.unsqueeze(-1) >> shifts) & 1).view(n, -1)[:, :vocab] == 0
    if rows is None:
        logits.masked_fill_(forbidden, float("-inf"))
    else:
        index = torch.as_tensor(rows, dtype=torch.long, device=logits.device)
        logits[index] = logits[index].masked_fill(forbidden, float("-inf"))


def _one_line(message: str) -> str:
    """llguidance's message without its state dump, on one line, bounded."""
    text = " ".join(message.split("<state>")[0].split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS - 3] + "..."
