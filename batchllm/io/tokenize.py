"""TOKENIZE: requests -> token ids, with the length checks that keep a huge prompt out of the tokenizer.

Each request's ``token_ids`` (an int32 array) is filled from its raw prompt, its chat messages (the chat
template rendered row by row in Python, then every rendering encoded in one batched call) or its given
``prompt_token_ids``; a row that cannot be tokenized, is empty or does not fit the context becomes a
``RowError`` of its own. ``pipeline.read_and_tokenize`` calls ``tokenize`` batch by batch while a thread
reads the next batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np

from batchllm.io import requests as rq
from batchllm.io.requests import Request, RowError
from batchllm.models.tokenizer import batch_encode, render_chat

log = logging.getLogger(__name__)

T = TypeVar("T")

_TOKEN_CHARS: "weakref.WeakKeyDictionary[object, int]" = weakref.WeakKeyDictionary()


def max_token_chars(tok) -> int:
    """The most characters of text one token of ``tok`` can stand for: its longest vocabulary entry (added
    and special tokens included), at least 1. Cached per tokenizer.

    Vocabulary strings are never shorter than the text they decode to (byte-level BPE spells each byte as
    one character, SentencePiece spells a space as one "▁"), so a prompt of more than
    ``max_token_chars(tok) * (n - 1)`` characters has at least ``n`` tokens: ``max_prompt_chars`` uses
    this to refuse a prompt that cannot fit before it is tokenized.
    """
    try:
        return _TOKEN_CHARS[tok]
    except (KeyError, TypeError):
        pass
    longest = 1
    try:
        vocab = tok.get_vocab()
        longest = max([longest, *map(len, vocab)])
        for t in getattr(tok, "all_special_tokens", []):
            longest = max(longest, len(t))
    except Exception as e:  # noqa: BLE001  (no vocabulary to inspect: no character bound)
        log.debug("no vocabulary for the character bound: %s", e)
        longest = 1 << 20
    try:
        _TOKEN_CHARS[tok] = longest
    except TypeError:  # not weak-referenceable
        pass
    return longest


def max_prompt_chars(tok, max_model_len: int) -> int:
    """Characters beyond which a prompt certainly has ``max_model_len`` tokens or more (too long)."""
    return max_token_chars(tok) * max(0, max_model_len - 1)


def tokenize(requests: list[Request], tok, max_model_len: int, vocab_size: int) -> tuple[list[Request], list[RowError]]:
    """Fill ``token_ids`` of every request with an int32 array; rows that cannot be tokenized or are too
    long become errors. Returns the valid requests (in their order) and the error rows.

    Lengths are checked before any encoding: a raw prompt or a rendered chat longer than
    ``max_prompt_chars`` characters, or more token ids than the context, is a ``prompt_too_long`` error
    without being tokenized (a 30 MB prompt would otherwise cost gigabytes in the tokenizer). Chat rows
    are rendered through the chat template one by one (Jinja, in Python); the raw prompts and the rendered
    chats are then encoded in one batched call each (``batch_encode``: Rust threads on every core, the
    GIL released, so a reader thread can run meanwhile). A ``prompt_token_ids`` row's list is replaced by
    its int32 array (the same object as ``token_ids``), so no Python list of ints outlives this call.
    """
    errors: list[RowError] = []
    limit = max_prompt_chars(tok, max_model_len)

    def too_long(r: Request, what: str, n: int, unit: str) -> None:
        errors.append(RowError(
            r.input_file, r.input_index, rq.PROMPT_TOO_LONG,
            f"{what} has {n:,} {unit}; the model context (max-model-len) is {max_model_len} tokens"
            + (f", at most {limit:,} characters with this tokenizer" if unit == "characters" else ""), r.custom_id, kept=r.kept))
        r.token_ids = None

    def failed(r: Request, e: Exception) -> None:  # a template or tokenizer failure concerns this row only
        code = rq.TEMPLATE_ERROR if r.messages is not None else rq.TOKENIZATION_ERROR if r.prompt is not None else rq.INVALID_PARAMETER
        errors.append(RowError(r.input_file, r.input_index, code, f"{type(e).__name__}: {e}", r.custom_id, kept=r.kept))
        r.token_ids = None

    raw: list[Request] = []
    chats: list[Request] = []
    texts: list[str] = []
    for r in requests:
        r.token_ids = None
        try:
            if r.prompt is not None:
                if len(r.prompt) > limit:
                    too_long(r, "prompt", len(r.prompt), "characters")
                else:
                    raw.append(r)
            elif r.messages is not None:
                text = render_chat(tok, r.messages)
                if len(text) > limit:
                    too_long(r, "the chat prompt", len(text), "characters")
                else:
                    chats.append(r)
                    texts.append(text)
            elif r.prompt_token_ids is not None:
                if len(r.prompt_token_ids) >= max_model_len:
                    too_long(r, "prompt", len(r.prompt_token_ids), "tokens")
                    continue
                ids = np.asarray(r.prompt_token_ids, dtype=np.int64)
                if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
                    raise ValueError(f"prompt_token_ids must be in [0, {vocab_size})")
                r.token_ids = r.prompt_token_ids = ids.astype(np.int32)
        except Exception as e:  # noqa: BLE001
            failed(r, e)
    _encode_rows(tok, raw, [r.prompt for r in raw], True, failed)
    _encode_rows(tok, chats, texts, False, failed)
    ok: list[Request] = []
    for r in requests:
        if r.token_ids is None:
            continue
        n = len(r.token_ids)
        if n == 0:
            errors.append(RowError(r.input_file, r.input_index, rq.MISSING_PROMPT, "the prompt is empty", r.custom_id, kept=r.kept))
        elif n >= max_model_len:
            errors.append(
                RowError(
                    r.input_file, r.input_index, rq.PROMPT_TOO_LONG,
                    f"prompt has {n} tokens; the model context (max-model-len) is {max_model_len}", r.custom_id, kept=r.kept,
                )
            )
        else:
            ok.append(r)
    return ok, errors


def _encode_rows(
    tok, rows: list[Request], texts: list[str], add_special_tokens: bool, failed: Callable[[Request, Exception], None]
) -> None:
    """Set ``token_ids`` of ``rows`` from ``texts`` in one batched call; if the batch fails, encode the
    rows one by one so that only the rows that fail become errors (``failed(row, exception)``)."""
    if not rows:
        return
    try:
        for r, ids in zip(rows, batch_encode(tok, texts, add_special_tokens)):
            r.token_ids = ids
        return
    except Exception as e:  # noqa: BLE001
        log.debug("batched encoding failed (%s); encoding %d rows one by one", e, len(rows))
    for r, text in zip(rows, texts):
        try:
            r.token_ids = batch_encode(tok, [text], add_special_tokens)[0]
        except Exception as e:  # noqa: BLE001
            failed(r, e)


def read_ahead(items: Iterator[T], depth: int) -> Iterator[T]:
    """Yield what ``items`` yields, in order, while a thread computes up to ``depth`` items ahead.

    ``items`` runs entirely on that thread (its ``close`` too); an exception it raises is raised here, at
    the item where it happened. Closing this generator early (a ``break``, an exception in the consumer)
    makes the thread close ``items`` at its next item and waits for it, so no file stays open behind.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    closed = threading.Event()

    def put(entry: tuple) -> bool:
        while not closed.is_set():
            try:
                q.put(entry, timeout=0.05)  # a timeout, so a closed consumer never leaves this thread blocked
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in items:
                if not put((x, None)):
                    return
            put((_END, None))
        except BaseException as e:  # noqa: BLE001  (re-raised on the consumer's thread)
            put((_END, e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="batchllm-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            x, err = q.get()
            if err is not None:
                raise err
            if x is _END:
                return
            yield x
    finally:
        closed.set()
        thread.join()


_END = object()
