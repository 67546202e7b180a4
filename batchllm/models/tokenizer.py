"""Thin tokenization helpers the pipeline uses, matching vLLM's conventions.

Raw prompts are encoded with the tokenizer's special tokens (e.g. BOS where the model's tokenizer adds
one); chat messages are rendered with the chat template to text, which already contains every special
token, and that text is encoded without adding more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from batchllm.models.config import ModelConfig


def encode_prompt(tok, text: str) -> list[int]:
    """Token ids of a raw prompt (add_special_tokens=True)."""
    return list(tok(text, add_special_tokens=True)["input_ids"])


def batch_encode_prompts(tok, texts: Sequence[str]) -> list[list[int]]:
    """``encode_prompt`` for many prompts in one call (fast tokenizers parallelise it in Rust)."""
    if not texts:
        return []
    return [list(ids) for ids in tok(list(texts), add_special_tokens=True)["input_ids"]]


def render_chat(tok, messages: Sequence[Mapping[str, Any]]) -> str:
    """The chat template applied to ``messages`` with the assistant generation prompt, as text.

    Raises ValueError if the tokenizer has no chat template.
    """
    if not getattr(tok, "chat_template", None):
        raise ValueError(
            "this model's tokenizer has no chat template, so chat messages cannot be formatted; "
            "send plain prompts instead, or use a model that ships a chat template"
        )
    return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def encode_chat(tok, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Token ids of chat ``messages`` (rendered by ``render_chat``, encoded with add_special_tokens=False)."""
    return list(tok(render_chat(tok, messages), add_special_tokens=False)["input_ids"])


def eos_token_ids(tok, cfg: ModelConfig) -> set[int]:
    """Ids that end a generation: the config's eos ids plus the tokenizer's eos token."""
    ids = set(cfg.eos_token_ids)
    if getattr(tok, "eos_token_id", None) is not None:
        ids.add(int(tok.eos_token_id))
    return ids
