"""Helpers for engine tests: random small models in HF naming, and running the engine on token prompts."""

from __future__ import annotations

import numpy as np
import torch

from batchllm.engine.attention import get_backend
from batchllm.engine.engine import LLMEngine
from batchllm.engine.kv_cache import KVCache
from batchllm.engine.scheduler import SchedulerConfig
from batchllm.engine.sequence import Sequence, SharedPrefix
from batchllm.models.config import ModelConfig
from batchllm.models.llama import build_model
from batchllm.sampling_params import SamplingParams


def tiny_config(model_type: str = "llama", **kw) -> ModelConfig:
    base = dict(
        model_type=model_type, vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=512, tie_word_embeddings=False,
        attention_bias=model_type == "qwen2", qk_norm=model_type == "qwen3", eos_token_ids=(),
    )
    base.update(kw)
    return ModelConfig(**base)


def random_state_dict(cfg: ModelConfig, seed: int = 0, std: float = 0.15) -> dict[str, torch.Tensor]:
    """HF-named random weights; std large enough that greedy argmax is not a coin toss."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=std):
        return torch.randn(*shape, generator=g) * s

    q, kv, h, i = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    sd = {"model.embed_tokens.weight": rnd(cfg.vocab_size, h, s=1.0), "model.norm.weight": 1 + rnd(h, s=0.1)}
    for L in range(cfg.num_layers):
        p = f"model.layers.{L}."
        sd[p + "self_attn.q_proj.weight"] = rnd(q, h)
        sd[p + "self_attn.k_proj.weight"] = rnd(kv, h)
        sd[p + "self_attn.v_proj.weight"] = rnd(kv, h)
        sd[p + "self_attn.o_proj.weight"] = rnd(h, q)
        if cfg.attention_bias:
            sd[p + "self_attn.q_proj.bias"] = rnd(q)
            sd[p + "self_attn.k_proj.bias"] = rnd(kv)
            sd[p + "self_attn.v_proj.bias"] = rnd(kv)
        if cfg.qk_norm:
            sd[p + "self_attn.q_norm.weight"] = 1 + rnd(cfg.head_dim, s=0.1)
            sd[p + "self_attn.k_norm.weight"] = 1 + rnd(cfg.head_dim, s=0.1)
        sd[p + "mlp.gate_proj.weight"] = rnd(i, h)
        sd[p + "mlp.up_proj.weight"] = rnd(i, h)
        sd[p + "mlp.down_proj.weight"] = rnd(h, i)
        sd[p + "input_layernorm.weight"] = 1 + rnd(h, s=0.1)
        sd[p + "post_attention_layernorm.weight"] = 1 + rnd(h, s=0.1)
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = rnd(cfg.vocab_size, h)
    return sd


class FakeTokenizer:
    """Decodes ids as space-separated numbers; enough for engine tests that compare token ids."""

    def batch_decode(self, id_lists, skip_special_tokens=True):
        return [" ".join(map(str, ids)) for ids in id_lists]

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return " ".join(map(str, ids))


def run_engine(
    model,
    cfg: ModelConfig,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    *,
    page_size: int = 4,
    num_pages: int = 256,
    budget: int = 32,
    max_num_seqs: int | None = None,
    prefix_lens: list[int] | None = None,
    tokenizer=None,
    eos: frozenset[int] = frozenset(),
    seeds: list[int] | None = None,
    prefix_caching: bool = False,
    growth_reserve: float = 1.0,
) -> tuple[dict[int, list[Sequence]], LLMEngine]:
    """Run prompts through a fresh engine; returns finished sequences by prompt index, and the engine.

    ``prefix_lens`` (optional) groups consecutive prompts that share that many leading tokens.
    """
    kv = KVCache(cfg, num_pages, page_size, torch.float32, "cpu")
    sched = SchedulerConfig(page_size=page_size, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, max_model_len=cfg.max_position_embeddings,
        growth_reserve=growth_reserve,
    )
    engine = LLMEngine(
        model, tokenizer or FakeTokenizer(), kv, get_backend("torch"), sched, torch.device("cpu"), cfg.vocab_size, prefix_caching=prefix_caching
    )
    plist = params if isinstance(params, list) else [params] * len(prompts)

    def source():
        sid = 0
        i = 0
        while i < len(prompts):
            plen = prefix_lens[i] if prefix_lens else 0
            j = i + 1
            while plen and j < len(prompts) and prefix_lens[j] == plen and prompts[j][:plen] == prompts[i][:plen]:
                j += 1
            prefix = None
            members = sum(plist[k].n for k in range(i, j))
            if plen:
                prefix = SharedPrefix(i, np.asarray(prompts[i][:plen], dtype=np.int32), unfinished=members)
                yield prefix
            for k in range(i, j):
                for s in range(plist[k].n):
                    seed = seeds[k] if seeds else 1000 + k
                    yield Sequence(sid, k, s, np.asarray(prompts[k], dtype=np.int32), plist[k], seed * 7 + s, eos, prefix=prefix)
                    sid += 1
            i = j

    done: dict[int, list[Sequence]] = {}
    engine.run(source(), lambda s: done.setdefault(s.request_index, []).append(s))
    for v in done.values():
        v.sort(key=lambda s: s.sample_index)
    return done, engine


def build(cfg: ModelConfig, sd: dict[str, torch.Tensor], dtype=torch.float32):
    return build_model(cfg, iter(sd.items()), dtype, "cpu")
