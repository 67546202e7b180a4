"""The tokenizer of ``dummy:`` presets: built in code, so a dummy model needs no file and no network.

Dummy models exist for benchmarks and tests, which work on token ids; text only has to round-trip. The
tokenizer is byte-level (GPT-2's byte-to-character map, no merges): every UTF-8 byte of a prompt is one
token, so distinct prompts get distinct ids and shared text prefixes give shared token prefixes. Its
vocabulary has exactly the preset's ``vocab_size`` ids, so every id the model can sample decodes:

    the preset's bos id -> "<|bos|>", its eos ids -> "<|eos|>", "<|eos_1|>", ... (special tokens)
    the first 256 other ids -> the bytes 0..255 in order
    the next ones -> the chat template's markers (``CHAT_MARKERS``, special tokens)
    every remaining id i -> the text "<|i|>"

A raw prompt gets the bos token in front (as Llama 3 does); a small chat template renders messages as
``<|role|>`` blocks, one token per marker, as real chat tokenizers do. The same preset always builds the same tokenizer (its hash is part of a job's
fingerprint).
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from batchllm.models.config import ModelConfig
from batchllm.models.tokenizer import byte_chars

BOS = "<|bos|>"
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerFast:
    """The byte-level tokenizer of a dummy preset (see the module docstring)."""
    return _build(cfg.vocab_size, cfg.bos_token_id, tuple(cfg.eos_token_ids))


@functools.lru_cache(maxsize=8)
def _build(vocab_size: int, bos_id: int | None, eos_ids: tuple[int, ...]) -> PreTrainedTokenizerFast:
    specials = {i: "<|eos|>" if k == 0 else f"<|eos_{k}|>" for k, i in enumerate(eos_ids)}
    if bos_id is not None:
        specials[bos_id] = BOS
    if any(not 0 <= i < vocab_size for i in specials) or vocab_size < 256 + len(CHAT_MARKERS) + len(specials):
        raise ValueError(f"dummy preset's special ids {sorted(specials)} do not fit a byte-level vocabulary "
                         f"of {vocab_size}")
    ordinary = iter([*byte_chars(), *CHAT_MARKERS])
    vocab: dict[str, int] = {}
    for i in range(vocab_size):
        vocab[specials[i] if i in specials else next(ordinary, None) or f"<|{i}|>"] = i
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    if bos_id is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    eos = specials[eos_ids[0]] if eos_ids else None
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS if bos_id is not None else None,
                                  eos_token=eos, chat_template=CHAT_TEMPLATE)
    extra = [s for s in specials.values() if s not in (BOS, eos)] + list(CHAT_MARKERS)
    tok.add_special_tokens({"additional_special_tokens": extra})
    return tok
