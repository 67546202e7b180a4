"""Tokenization helpers, on the SmolLM2 tokenizer; the dummy presets' built-in byte-level tokenizer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchllm.models import default_model, dummy, loader
from batchllm.models.dummy_tokenizer import build_tokenizer
from batchllm.models.tokenizer import (
    batch_encode,
    encode_chat,
    encode_prompt,
    eos_token_ids,
    render_chat,
)


@pytest.fixture(scope="module")
def tok(smollm2_gguf_path, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BATCHLLM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield loader.load_tokenizer(loader.resolve_model("default"))


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}]


def test_default_tokenizer(tok):
    assert len(tok) == 49152 and tok.eos_token_id == 2


def test_encode_prompt_and_batch(tok):
    texts = ["Hello world", "", "Ünïcode and emoji 🙂 and <|im_end|>", "  leading spaces"]
    singles = [encode_prompt(tok, t) for t in texts]
    batch = batch_encode(tok, texts, add_special_tokens=True)
    assert all(ids.dtype == np.int32 for ids in batch)
    assert [ids.tolist() for ids in batch] == singles
    assert batch_encode(tok, [], add_special_tokens=True) == []
    assert tok.decode(singles[0]) == "Hello world"
    assert 2 in singles[2]  # special tokens in raw text are recognised, as vLLM does
    assert all(isinstance(i, int) for ids in singles for i in ids)


def test_batch_encode_follows_split_special_tokens(tok):
    # the backend is called directly only when set as __call__ would set it: here special tokens split
    split = copy.deepcopy(tok)
    split.split_special_tokens = True
    text = "a <|im_end|> b"
    got = batch_encode(split, [text], add_special_tokens=True)[0].tolist()  # before __call__ sets the backend
    want = split(text, add_special_tokens=True)["input_ids"]
    assert 2 not in want and got == want  # the marker spelt out in ordinary tokens
    assert 2 in batch_encode(tok, [text], add_special_tokens=True)[0].tolist()


def test_chat_template_round_trip(tok):
    text = render_chat(tok, MESSAGES)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nName a prime.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = encode_chat(tok, MESSAGES)
    assert tok.decode(ids) == text
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # no extra BOS added on top of the template
    assert ids == tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]


def test_chat_without_template_is_clear_error(tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        encode_chat(bare, MESSAGES)


def test_eos_token_ids(tok):
    cfg = loader.load_config(loader.resolve_model("dummy:llama-3-8b"))
    assert eos_token_ids(tok, cfg) == {2, 128001, 128008, 128009}
    assert eos_token_ids(tok, loader.load_config(loader.resolve_model("dummy:tiny"))) == {2}


# ------------------------------------------------------------------------------ dummy presets' tokenizer


def test_dummy_tokenizer_needs_no_file_and_no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a dummy model's tokenizer must not look for the default model")

    for name in ("locate_default_gguf", "cache_dir", "_fetch_into_cache", "_installed_package_gguf"):
        monkeypatch.setattr(default_model, name, refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = loader.load_tokenizer(loader.resolve_model("dummy:llama-3-8b"))
    assert len(tok) == 128256


@pytest.mark.parametrize("preset", sorted(dummy.PRESETS))
def test_dummy_tokenizer_fits_the_preset(preset):
    cfg = dummy.PRESETS[preset]
    tok = build_tokenizer(cfg)
    assert len(tok) == cfg.vocab_size
    assert tok.bos_token_id == cfg.bos_token_id and tok.eos_token_id == cfg.eos_token_ids[0]
    assert eos_token_ids(tok, cfg) == set(cfg.eos_token_ids)
    ids = encode_prompt(tok, "ab")
    assert ids[0] == cfg.bos_token_id and len(ids) == 3  # bos + one token per byte
    # every id the model can sample decodes to text; special ids are skipped on request
    top = cfg.vocab_size - 1
    assert tok.decode([top]) == f"<|{top}|>" or top in tok.all_special_ids
    assert tok.decode(list(cfg.eos_token_ids), skip_special_tokens=True) == ""
    assert build_tokenizer(cfg) is tok  # built once per process


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40).filter(lambda t: "<|" not in t))
def test_dummy_tokenizer_round_trips_any_text(text):
    tok = build_tokenizer(dummy.PRESETS["tiny"])
    ids = encode_prompt(tok, text)
    assert len(ids) == 1 + len(text.encode("utf-8"))
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_dummy_tokenizer_shared_text_prefix_is_a_shared_token_prefix():
    tok = build_tokenizer(dummy.PRESETS["tiny"])
    a, b = encode_prompt(tok, "System: be brief. Q1"), encode_prompt(tok, "System: be brief. Q2")
    assert a[:-1] == b[:-1] and a[-1] != b[-1]


def test_dummy_tokenizer_chat_template():
    tok = build_tokenizer(dummy.PRESETS["tiny"])
    text = "<|system|>\nYou are terse.<|end|>\n<|user|>\nName a prime.<|end|>\n<|assistant|>\n"
    assert render_chat(tok, MESSAGES) == text
    ids = encode_chat(tok, [{"role": "user", "content": "Hi"}])
    assert len(ids) == 8 and tok.decode(ids) == "<|user|>\nHi<|end|>\n<|assistant|>\n"  # one token per marker
    assert tok.decode(ids, skip_special_tokens=True) == "\nHi\n\n"
