"""Dummy models: real architectures' exact shapes with seeded random weights, for benchmarks and tests.

``--model dummy:NAME`` (or ``dummy:NAME@SEED``) runs a preset without downloading weights: throughput
and memory behave like the real model, the text is gibberish. Their tokenizer is built in code for the
preset's vocabulary (``dummy_tokenizer``: byte-level, no file, no download); bos/eos ids are the real
models' ones.

Weights are generated directly on the target device in the target dtype, one tensor at a time. Each
tensor has its own generator seeded from (seed, name), so a tensor does not depend on iteration order; the
values do depend on the device's RNG (CPU and CUDA streams differ), so "same weights" means same preset,
seed, device type and dtype.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch

from batchllm.models.config import ModelConfig
from batchllm.models.hf_folder import weight_shapes

_LLAMA31_SCALING = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}

PRESETS: dict[str, ModelConfig] = {
    # Llama 3.1 8B shapes (llama3 RoPE scaling, 128k context).
    "llama-3-8b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA31_SCALING, "factor": 8.0}, max_position_embeddings=131072,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    ),
    "llama-3.2-1b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA31_SCALING, "factor": 32.0}, max_position_embeddings=131072,
        tie_word_embeddings=True, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    ),
    "qwen2.5-7b": ModelConfig(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, tie_word_embeddings=False, attention_bias=True,
        bos_token_id=151643, eos_token_ids=(151645, 151643),
    ),
    # Small enough for CPU tests (SmolLM2's vocabulary size and bos 1 / eos 2).
    "tiny": ModelConfig(
        model_type="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
    ),
}


def preset_config(name: str) -> ModelConfig:
    """Config of a preset; ValueError naming the known presets for an unknown one."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown dummy preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def iter_weights(
    cfg: ModelConfig, seed: int, dtype: torch.dtype, device: str | torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, random tensor) for every parameter of ``cfg``, created on ``device`` in ``dtype``.

    Matrices (embeddings and lm_head included) ~ N(0, 1/in_features): every projection then maps
    unit-RMS inputs to unit-scale outputs, so attention scores, MLP activations and logits stay O(1)
    through any depth and in fp16/bf16 (no overflow, no all-equal logits). Norm weights are ones;
    biases ~ N(0, 0.02^2).
    """
    device = torch.device(device)
    for name, shape in weight_shapes(cfg).items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=dtype, device=device)
            continue
        g = torch.Generator(device=device).manual_seed(_tensor_seed(seed, name))
        std = 0.02 if len(shape) == 1 else 1.0 / math.sqrt(shape[-1])
        yield name, torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=g)
