"""Tokenization helpers, on the SmolLM2 tokenizer (which dummy models also use)."""

from __future__ import annotations

import copy

import pytest

from batchllm.models import loader
from batchllm.models.tokenizer import (
    batch_encode_prompts,
    encode_chat,
    encode_prompt,
    eos_token_ids,
    render_chat,
)


@pytest.fixture(scope="module")
def tok(smollm2_gguf_path, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BATCHLLM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        # A dummy model gets the default model's tokenizer.
        yield loader.load_tokenizer(loader.resolve_model("dummy:tiny"))


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}]


def test_dummy_gets_default_tokenizer(tok):
    assert len(tok) == 49152 and tok.eos_token_id == 2


def test_encode_prompt_and_batch(tok):
    texts = ["Hello world", "", "Ünïcode and emoji 🙂 and <|im_end|>", "  leading spaces"]
    singles = [encode_prompt(tok, t) for t in texts]
    assert batch_encode_prompts(tok, texts) == singles
    assert batch_encode_prompts(tok, []) == []
    assert tok.decode(singles[0]) == "Hello world"
    assert 2 in singles[2]  # special tokens in raw text are recognised, as vLLM does
    assert all(isinstance(i, int) for ids in singles for i in ids)


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
