"""TOKENIZE: requests -> token ids, with the length checks that keep a huge prompt out of the tokenizer.

Each request's ``token_ids`` is filled from its raw prompt (one batched call), its chat messages (the
chat template, row by row) or its given ``prompt_token_ids``; a row that cannot be tokenized, is empty
or does not fit the context becomes a ``RowError`` of its own.
"""

from __future__ import annotations

import logging
import weakref

import numpy as np

from batchllm.io import requests as rq
from batchllm.io.requests import Request, RowError
from batchllm.models.tokenizer import batch_encode_prompts, render_chat

log = logging.getLogger(__name__)

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
    """Fill ``token_ids`` of every request; rows that cannot be tokenized or are too long become errors.

    Lengths are checked before any encoding: a raw prompt or a rendered chat longer than
    ``max_prompt_chars`` characters, or more token ids than the context, is a ``prompt_too_long`` error
    without being tokenized (a 30 MB prompt would otherwise cost gigabytes in the tokenizer). Raw prompts
    are encoded in one batched call (the Rust tokenizer parallelises it); chat rows are rendered through
    the chat template one by one.
    """
    errors: list[RowError] = []
    limit = max_prompt_chars(tok, max_model_len)

    def too_long(r: Request, what: str, n: int, unit: str) -> None:
        errors.append(RowError(
            r.input_file, r.input_index, rq.PROMPT_TOO_LONG,
            f"{what} has {n:,} {unit}; the model context (max-model-len) is {max_model_len} tokens"
            + (f", at most {limit:,} characters with this tokenizer" if unit == "characters" else ""), r.custom_id, kept=r.kept))
        r.token_ids = None

    raw = []
    for r in requests:
        if r.prompt is None:
            continue
        if len(r.prompt) > limit:
            too_long(r, "prompt", len(r.prompt), "characters")
        else:
            raw.append(r)
    for r, ids in zip(raw, batch_encode_prompts(tok, [r.prompt for r in raw]) if raw else []):
        r.token_ids = np.asarray(ids, dtype=np.int32)
    for r in requests:
        try:
            if r.messages is not None:
                text = render_chat(tok, r.messages)
                if len(text) > limit:
                    too_long(r, "the chat prompt", len(text), "characters")
                    continue
                r.token_ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
            elif r.prompt_token_ids is not None:
                if len(r.prompt_token_ids) >= max_model_len:
                    too_long(r, "prompt", len(r.prompt_token_ids), "tokens")
                    continue
                ids = np.asarray(r.prompt_token_ids, dtype=np.int64)
                if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
                    raise ValueError(f"prompt_token_ids must be in [0, {vocab_size})")
                r.token_ids = ids.astype(np.int32)
        except Exception as e:  # a template or tokenizer failure concerns this row only
            code = rq.TEMPLATE_ERROR if r.messages is not None else rq.INVALID_PARAMETER
            errors.append(RowError(r.input_file, r.input_index, code, f"{type(e).__name__}: {e}", r.custom_id, kept=r.kept))
            r.token_ids = None
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
