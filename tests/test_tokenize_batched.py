"""Batched tokenization (``io.tokenize``) and reading ahead (``pipeline.read_and_tokenize``): the same token
ids as encoding row by row, on SmolLM2's tokenizer, with every error row of the row-by-row path."""

from __future__ import annotations

import copy
import json
import threading

import numpy as np
import pytest

from batchllm import pipeline
from batchllm.config import JobConfig
from batchllm.io import requests as rq
from batchllm.io.requests import Request
from batchllm.io.tokenize import read_ahead, tokenize
from batchllm.models import loader
from batchllm.models.tokenizer import encode_chat, encode_prompt
from batchllm.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tok(smollm2_gguf_path, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BATCHLLM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield loader.load_tokenizer(loader.resolve_model("default"))


@pytest.fixture(scope="module")
def mcfg(tok):
    return loader.load_config(loader.resolve_model("default"))


PROMPTS = ["Hello world", "Ünïcode and emoji 🙂 and <|im_end|>", "  leading spaces", "a" * 3000, "x\ny\n\nz"]
CHATS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}],
    [{"role": "user", "content": "Ünïcode 🙂 <|im_start|> inside"}],
    [{"role": "user", "content": "q " * 500}],
]


def _mixed() -> list[Request]:
    rows = [Request(f"p{i}", "f", i, SamplingParams(), prompt=p) for i, p in enumerate(PROMPTS)]
    rows += [Request(f"c{i}", "f", 100 + i, SamplingParams(), messages=m) for i, m in enumerate(CHATS)]
    rows.append(Request("t", "f", 200, SamplingParams(), prompt_token_ids=[1, 2, 3, 49151]))
    order = np.random.default_rng(0).permutation(len(rows))
    return [rows[i] for i in order]


def test_batched_ids_are_the_row_by_row_ids_as_int32_arrays(tok):
    rows = _mixed()
    ok, errors = tokenize(rows, tok, max_model_len=8192, vocab_size=len(tok))
    assert not errors and ok == rows  # every row, in input order
    for r in ok:
        want = (encode_prompt(tok, r.prompt) if r.prompt is not None else encode_chat(tok, r.messages)
                if r.messages is not None else [1, 2, 3, 49151])
        assert isinstance(r.token_ids, np.ndarray) and r.token_ids.dtype == np.int32
        assert r.token_ids.tolist() == want, r.custom_id
    ids_row = next(r for r in ok if r.custom_id == "t")
    assert ids_row.prompt_token_ids is ids_row.token_ids  # the reader's list of ints is gone


def test_every_error_row_of_the_row_by_row_path(tok):
    templated = copy.deepcopy(tok)
    templated.chat_template = (
        "{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    )
    rows = [
        Request("empty", "f", 0, SamplingParams(), prompt=""),
        Request("huge", "f", 1, SamplingParams(), prompt="word " * 100_000),
        Request("long", "f", 2, SamplingParams(), prompt="word " * 80),
        Request("boom", "f", 3, SamplingParams(), messages=[{"role": "user", "content": "boom"}]),
        Request("chat", "f", 4, SamplingParams(), messages=[{"role": "user", "content": "fine"}]),
        Request("vocab", "f", 5, SamplingParams(), prompt_token_ids=[1, len(tok)]),
        Request("ids_long", "f", 6, SamplingParams(), prompt_token_ids=[1] * 64),
        Request("ok", "f", 7, SamplingParams(), prompt="hello"),
    ]
    ok, errors = tokenize(rows, templated, max_model_len=64, vocab_size=len(tok))
    assert [r.custom_id for r in ok] == ["chat", "ok"]
    assert {e.custom_id: e.error_code for e in errors} == {
        "empty": rq.MISSING_PROMPT, "huge": rq.PROMPT_TOO_LONG, "long": rq.PROMPT_TOO_LONG,
        "boom": rq.TEMPLATE_ERROR, "vocab": rq.INVALID_PARAMETER, "ids_long": rq.PROMPT_TOO_LONG,
    }
    assert "no boom" in next(e.error_message for e in errors if e.custom_id == "boom")


class _Poisoned:
    """A slow-path tokenizer (no Rust backend exposed) whose batched call fails on any text with "poison"."""

    is_fast = False

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __call__(self, texts, **kw):
        self.calls += 1
        if any("poison" in t for t in texts):
            raise ValueError("poisoned text")
        return self.tok(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_a_failing_batch_costs_only_its_failing_rows(tok):
    spy = _Poisoned(tok)
    rows = [Request(f"r{i}", "f", i, SamplingParams(), prompt=p) for i, p in enumerate(["one", "poison", "three"])]
    ok, errors = tokenize(rows, spy, max_model_len=64, vocab_size=len(tok))
    assert [r.custom_id for r in ok] == ["r0", "r2"]
    assert [(e.custom_id, e.error_code) for e in errors] == [("r1", rq.TOKENIZATION_ERROR)]
    assert ok[1].token_ids.tolist() == encode_prompt(tok, "three")
    assert spy.calls == 4  # the batch, then each row


def test_read_ahead_yields_in_order_and_raises_where_the_source_failed():
    def source():
        yield from range(5)
        raise OSError("disk gone")

    seen = []
    with pytest.raises(OSError, match="disk gone"):
        for x in read_ahead(source(), 2):
            seen.append(x)
    assert seen == [0, 1, 2, 3, 4]


def test_read_ahead_closed_early_closes_the_source_on_its_thread():
    closed_on = []

    def source():
        try:
            yield from range(1_000_000)
        finally:
            closed_on.append(threading.current_thread().name)

    it = read_ahead(source(), 2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert closed_on == ["batchllm-read-ahead"]
    assert not any(t.name == "batchllm-read-ahead" for t in threading.enumerate())


def test_read_and_tokenize_across_batches_keeps_order_ids_and_errors(tok, mcfg, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "_TOKENIZE_BATCH", 3)  # many batches from a few rows
    lines = []
    for i in range(20):
        if i % 7 == 3:
            lines.append("{not json")
        elif i % 2:
            lines.append(json.dumps({"custom_id": f"r{i}", "messages": [{"role": "user", "content": f"question {i}"}]}))
        elif i == 12:
            lines.append(json.dumps({"custom_id": f"r{i}", "prompt_token_ids": [1, len(tok)]}))
        else:
            lines.append(json.dumps({"custom_id": f"r{i}", "prompt": f"prompt number {i} " * (i + 1)}))
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    errors = []
    got = pipeline.read_and_tokenize(JobConfig(inputs=[str(path)]), tok, mcfg, 2048, errors.append)
    want_ids = [i for i in range(20) if i % 7 != 3 and i != 12]
    assert [r.custom_id for r in got] == [f"r{i}" for i in want_ids]
    for r in got:
        want = encode_chat(tok, r.messages) if r.messages is not None else encode_prompt(tok, r.prompt)
        assert r.token_ids.dtype == np.int32 and r.token_ids.tolist() == want
    assert sorted((e.input_index, e.error_code) for e in errors) == [
        (3, rq.MALFORMED_JSON), (10, rq.MALFORMED_JSON), (12, rq.INVALID_PARAMETER), (17, rq.MALFORMED_JSON)]
