"""Incremental detokenization and stop strings, following vLLM v1's detokenizer.

A generated sequence is turned into text one token at a time, so stop strings can end it as soon as
they appear. Fast (Rust-backed) tokenizers use ``tokenizers.decoders.DecodeStream``, primed with the
tail of the prompt so the first output token decodes in context (a leading space is kept, as vLLM
keeps it). Other tokenizers use vLLM's prefix/read-offset scheme over ``convert_ids_to_tokens``. Text
is only emitted once it is final: a token that ends inside a multi-byte UTF-8 character yields ""
until the character completes. Text is never cleaned up (``clean_up_tokenization_spaces`` off, as in
vLLM). Stop strings are not included in the output (vLLM's default); ``find_stop`` locates them.
"""

from __future__ import annotations

from collections.abc import Sequence

try:  # tokenizers >= 0.21
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover
    DecodeStream = None

__all__ = ["IncrementalDetokenizer", "decode_all", "find_stop"]

_REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence
_PROMPT_TAIL = (4, 24)  # shortest, longest prompt suffix tried as decoding context (vLLM's range)
_INVALID_PREFIX = "Invalid prefix encountered"


def _rust_tokenizer(tokenizer):
    """The ``tokenizers.Tokenizer`` behind ``tokenizer`` (a transformers fast tokenizer or the Rust
    tokenizer itself), or None."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover
        return None
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else None


class IncrementalDetokenizer:
    """Decode one sequence's output tokens as they are generated.

    Contract (tested): ``"".join(append(t) for t in ids) + flush() == decode_all(tokenizer, ids,
    skip_special_tokens, prompt_ids=prompt_ids)``. Decoding is in the context of the prompt's tail, so
    with a decoder that strips a leading space (SentencePiece's Metaspace) the space after the
    prompt is kept, as in vLLM; for byte-level tokenizers the text equals a plain ``decode(ids)``.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self._decode = _decoder(tokenizer, skip_special_tokens)
        context = _prompt_context(self._decode, prompt_ids)
        rust = _rust_tokenizer(tokenizer) if DecodeStream is not None else None
        if rust is not None:
            self._impl = _StreamDecoder(rust, context, skip_special_tokens)
        else:
            self._impl = _OffsetDecoder(tokenizer, context, skip_special_tokens)
        self._ids = list(context)  # the decoding context, then every appended id (for flush)
        self._pending = 0  # how many trailing ids have not produced text yet
        self._parts: list[str] = []

    def append(self, token_id: int) -> str:
        """Add one generated token; return the text it finalises ("" while a character is incomplete)."""
        token_id = int(token_id)
        self._ids.append(token_id)
        new = self._impl.step(token_id)
        if new:
            self._parts.append(new)
            self._pending = 0
        else:
            self._pending += 1
        return new

    def flush(self) -> str:
        """Finalise what is still pending at the end of generation: the ids appended since the last
        emitted text, decoded as they stand (an incomplete character becomes U+FFFD, as ``decode``
        renders it). Returns "" when nothing is pending; call it once, when the sequence ends."""
        if not self._pending:
            return ""
        k = len(self._ids) - self._pending
        new = _decode_after(self._decode, self._ids[max(0, k - 6) : k], self._ids[k:])
        self._pending = 0
        if new:
            self._parts.append(new)
        return new

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._parts) > 1:  # join lazily: appending to one string per token is quadratic
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""


def _decoder(tokenizer, skip_special_tokens: bool):
    """ids -> text, without clean-up of tokenization spaces (as vLLM)."""
    rust = _rust_tokenizer(tokenizer)
    if rust is not None:
        return lambda ids: rust.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


def _decode_after(decode, context: list[int], ids: list[int]) -> str:
    """The text ``ids`` add after ``context``: decoded together, so a leading space survives."""
    if not context:
        return decode(ids)
    prefix, full = decode(context), decode(context + ids)
    return full[len(prefix) :] if full.startswith(prefix) else decode(ids)


def _prompt_context(decode, prompt_ids: Sequence[int]) -> list[int]:
    """The prompt suffix to decode the output in context of (as vLLM: 4 to 24 tokens).

    Prefer the shortest suffix that decodes without U+FFFD (one starting mid-character renders a
    stray U+FFFD). Never one that *ends* mid-character: those bytes would be owed to the first output
    token and the prompt's text would leak into the output. A prompt that ends mid-character (ids not
    produced from text) gets no context: the output then decodes as a plain ``decode(ids)``.
    """
    lo, hi = _PROMPT_TAIL
    prompt = [int(t) for t in prompt_ids[-hi:]]
    fallback: list[int] = []
    for n in range(min(lo, len(prompt)), len(prompt) + 1):
        suffix = prompt[len(prompt) - n :]
        text = decode(suffix)
        if _REPLACEMENT not in text:
            return suffix
        if not fallback and not text.endswith(_REPLACEMENT):
            fallback = suffix
    return fallback


class _StreamDecoder:
    """``DecodeStream`` over the Rust tokenizer, as vLLM's ``FastIncrementalDetokenizer``."""

    def __init__(self, tokenizer, context: list[int], skip: bool):
        self._tok, self._skip = tokenizer, skip
        self._stream = self._new_stream(context)

    def _new_stream(self, prefill: list[int]):
        try:
            return DecodeStream(ids=prefill, skip_special_tokens=self._skip)
        except TypeError:  # tokenizers < 0.22: no prefill argument; prime by stepping
            stream = DecodeStream(skip_special_tokens=self._skip)
            for t in prefill:
                stream.step(self._tok, t)
            return stream

    def step(self, token_id: int) -> str:
        try:
            return self._stream.step(self._tok, token_id) or ""
        except Exception as e:
            # Some tokenizers decode non-monotonically (vLLM issue 17448), which breaks the stream's
            # prefix invariant; like vLLM, restart the stream without context and go on.
            if not str(e).startswith(_INVALID_PREFIX):
                raise
            self._stream = self._new_stream([])
            return self._stream.step(self._tok, token_id) or ""


class _OffsetDecoder:
    """vLLM's ``detokenize_incrementally``: decode a short window of tokens before and after the read
    offset, and emit what the new token added once it no longer ends in U+FFFD."""

    def __init__(self, tokenizer, context: list[int], skip: bool):
        self._tok, self._skip = tokenizer, skip
        self._tokens: list[str] = list(tokenizer.convert_ids_to_tokens(context, skip_special_tokens=skip))
        self._prefix_offset = max(len(self._tokens) - 5, 0)
        self._read_offset = len(self._tokens)

    def step(self, token_id: int) -> str:
        self._tokens += self._tok.convert_ids_to_tokens([token_id], skip_special_tokens=self._skip)
        to_string = self._tok.convert_tokens_to_string
        prefix = to_string(self._tokens[self._prefix_offset : self._read_offset])
        full = to_string(self._tokens[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        return full[len(prefix) :]


def find_stop(text: str, stops: Sequence[str], new_text_len: int) -> int:
    """Index in ``text`` where the earliest stop string begins, or -1.

    Only matches that end inside the last ``new_text_len`` characters are looked for: earlier text
    was checked when it arrived. So each stop is searched from ``len(text) - new_text_len -
    len(stop) + 1`` on, within the last ``new_text_len + max(len(stop)) - 1`` characters. The caller
    truncates to ``text[:index]`` (the stop string is not part of the output).
    """
    if new_text_len < 0:
        raise ValueError(f"new_text_len must be >= 0, got {new_text_len}")
    if new_text_len == 0:
        return -1
    best = -1
    for stop in stops:
        if not stop:
            raise ValueError("stop strings must be non-empty")
        i = text.find(stop, max(0, len(text) - new_text_len - len(stop) + 1))
        if i != -1 and (best == -1 or i < best):
            best = i
    return best


def decode_all(tokenizer, ids: Sequence[int], skip_special_tokens: bool = True, *, prompt_ids=None) -> str:
    """Decode a finished sequence in one call (for sequences without stop strings).

    No clean-up of tokenization spaces, as the incremental path. With ``prompt_ids`` the text is
    decoded in the context of the prompt's tail and equals what ``IncrementalDetokenizer`` emits
    (this matters only for decoders that strip a leading space, like SentencePiece's Metaspace).
    """
    decode = _decoder(tokenizer, skip_special_tokens)
    ids = [int(t) for t in ids]
    context = _prompt_context(decode, prompt_ids) if prompt_ids is not None else []
    return _decode_after(decode, context, ids)
