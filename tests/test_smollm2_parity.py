"""The real model end to end: batchllm's greedy output equals transformers' generate on the same GGUF.

20 varied prompts (chat and raw) run together as one batchllm job (paged KV, chunked prefill mixed
with decodes, shared chat-template prefix); transformers loads the same GGUF with its own dequantizer
and generates one prompt at a time. Every token must match.
"""

from __future__ import annotations

import json

import pytest
import torch

from batchllm.build import load_model
from batchllm.config import JobConfig
from batchllm.io.writer import read_results
from batchllm.models.tokenizer import encode_chat, encode_prompt
from batchllm.pipeline import run_job

pytestmark = pytest.mark.slow

CHAT = [
    "What is the capital of Japan?",
    "Give me a synonym for 'happy'.",
    "How many legs does a spider have?",
    "Write one sentence about autumn leaves.",
    "What is 12 times 7?",
    "Name a famous painting by Leonardo da Vinci.",
    "Why do we need sleep?",
    "Suggest a name for a pet goldfish.",
    "What colour do you get by mixing blue and yellow?",
    "Describe the taste of a lemon in a few words.",
]
RAW = [
    "The three primary colours are",
    "def fibonacci(n):\n    ",
    "In 1969, the first humans",
    "The recipe calls for two cups of flour, one egg, and",
    "Q: What is the largest ocean on Earth?\nA:",
    "Photosynthesis is the process by which",
    "Dear hiring manager, I am writing to",
    "The quick brown fox",
    "Water boils at 100 degrees Celsius, but at high altitude",
    "1, 2, 3, 5, 8, 13,",
]
MAX_TOKENS = 32


def test_greedy_matches_transformers_on_smollm2(tmp_path, smollm2_gguf_path):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    inp = tmp_path / "prompts.jsonl"
    with open(inp, "w") as f:
        for i, q in enumerate(CHAT):
            f.write(json.dumps({"custom_id": f"chat{i}", "messages": [{"role": "user", "content": q}]}) + "\n")
        for i, p in enumerate(RAW):
            f.write(json.dumps({"custom_id": f"raw{i}", "prompt": p}) + "\n")
    cfg = JobConfig(
        inputs=[str(inp)], output=str(tmp_path / "out"), model=smollm2_gguf_path, device="cpu", dtype="float32",
        temperature=0.0, max_tokens=MAX_TOKENS, preview=0, max_num_batched_tokens=256,
    )
    lm = load_model(cfg)
    summary = run_job(cfg, loaded=lm)
    assert summary.samples == 20 and summary.errors == 0
    rows = {r["custom_id"]: r for r in read_results(cfg.output).to_pylist()}

    import os

    ref = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf_path), gguf_file=os.path.basename(smollm2_gguf_path), dtype=torch.float32
    ).eval()
    mismatches = []
    for cid, ids in [(f"chat{i}", encode_chat(lm.tokenizer, [{"role": "user", "content": q}])) for i, q in enumerate(CHAT)] + [
        (f"raw{i}", encode_prompt(lm.tokenizer, p)) for i, p in enumerate(RAW)
    ]:
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=2)
        expected = out[0, len(ids):].tolist()
        if rows[cid]["token_ids"] != expected:
            mismatches.append((cid, rows[cid]["token_ids"], expected))
        assert rows[cid]["prompt_tokens"] == len(ids)
    assert not mismatches, mismatches
    # the chat rows share the template's system prompt: the plan computed it once
    assert sum(rows[f"chat{i}"]["cached_tokens"] for i in range(10)) > 0
