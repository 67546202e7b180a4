"""The Llama-family decoder: Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2, in plain torch.

Written for a paged, token-flat engine (as nano-vllm and vLLM do): the forward pass takes every token of
the step in one flat (T,) tensor, with positions and an ``AttentionMetadata`` saying which sequence each
token belongs to; K/V go into the paged cache through the attention backend. There is no padding and no
per-sequence batch dimension. Q/K/V and gate/up projections are fused into one matmul each; the loader
streams HF-named tensors into the fused slices (``load_weights``).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from batchllm.engine.attention_backend import AttentionBackend, AttentionMetadata
from batchllm.engine.kv_cache import kv_scales
from batchllm.models.config import ModelConfig
from batchllm.models.layers import Linear, RMSNorm, RotaryEmbedding, make_linear, silu_and_mul


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = make_linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.attention_bias, cfg.quant)
        self.o_proj = make_linear(self.q_size, cfg.hidden_size, False, cfg.quant)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim**-0.5
        # FP8 KV scales (kv_cache.kv_scales' layout): 1.0 unless the checkpoint has calibrated ones
        # (set_kv_scales). A buffer, so graphed steps read the layer's own on the device; not in the
        # state dict: checkpoints name them k_scale / v_scale (batchllm.models.kv_scales).
        # all ones: k_scale, v_scale and their reciprocals at 1.0 (built directly: a model on the meta
        # device has no values for kv_scales' checks to read)
        self.register_buffer("kv_scales", torch.ones(4, cfg.num_kv_heads, dtype=torch.float32), persistent=False)

    def set_kv_scales(self, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
        """This layer's FP8 KV scales: one value or one per KV head each, on any device (``kv_cache.kv_scales``),
        copied in place (a captured graph keeps reading the same buffer)."""
        self.kv_scales.copy_(kv_scales(k_scale, v_scale, self.num_kv_heads))

    def forward(self, x, cos, sin, kv_cache, meta: AttentionMetadata, backend: AttentionBackend):
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = RotaryEmbedding.apply(q, cos, sin)
        k = RotaryEmbedding.apply(k, cos, sin)
        backend.store_kv(k, v, kv_cache, meta, self.kv_scales)
        o = backend.forward(q, kv_cache, meta, self.scale, self.kv_scales)
        return self.o_proj(o.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = make_linear(cfg.hidden_size, 2 * cfg.intermediate_size, False, cfg.quant)
        self.down_proj = make_linear(cfg.intermediate_size, cfg.hidden_size, False, cfg.quant)

    def forward(self, x):
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, cos, sin, kv_cache, meta, backend):
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, kv_cache, meta, backend)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Decoder plus LM head. ``forward`` returns final hidden states; ``compute_logits`` the fp32 logits."""

    # HF parameter name fragment -> (fused parameter, shard index) for the packed projections.
    packed_modules = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)

    @torch.inference_mode()
    def forward(self, input_ids, positions, kv_caches: list[torch.Tensor], meta: AttentionMetadata, backend: AttentionBackend):
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, cos, sin, kv_cache, meta, backend)
        x, _ = self.norm(x, residual)
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return torch.nn.functional.linear(hidden, weight).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into this model's (fused) parameters; raises ValueError on a gap or mismatch.

        Quantized projections take their checkpoint tensors in ``quant.to_model_layout``'s layout (every
        tensor of a fused projection is sliced along the output dimension, as its weight is); a per-tensor
        FP8 scale fills its shard's rows; ``weight_shape`` entries were checked by the loader and are skipped.
        """
        cfg = self.config
        params = dict(self.named_parameters())
        shard_sizes = {
            "qkv_proj": [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim],
            "gate_up_proj": [cfg.intermediate_size, cfg.intermediate_size],
        }
        filled: set[str] = set()
        for name, tensor in weights:
            target = name.removeprefix("model.")
            if target == "lm_head.weight" and self.lm_head is None:
                continue  # tied: some checkpoints store the copy anyway
            shard = None
            for frag, (fused, idx) in self.packed_modules.items():
                if f".{frag}." in target:
                    target = target.replace(f".{frag}.", f".{fused}.")
                    shard = (fused, idx)
                    break
            if target.endswith("rotary_emb.inv_freq") or target.endswith(".weight_shape"):
                continue
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in a {cfg.model_type} model")
            param = params[target]
            if shard is not None:
                sizes = shard_sizes[shard[0]]
                start = sum(sizes[: shard[1]])
                dest = param.data.narrow(0, start, sizes[shard[1]])
                key = f"{target}#{shard[1]}"
            else:
                dest, key = param.data, target
            if target.endswith(".weight_scale") and tensor.shape == (1, 1) and dest.shape[-1] == 1:
                tensor = tensor.expand_as(dest)  # a per-tensor FP8 scale, kept per row
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ValueError(f"shape mismatch for {name!r}: checkpoint {tuple(tensor.shape)}, model {tuple(dest.shape)}")
            dest.copy_(tensor)
            filled.add(key)
        expected = set()
        for pname, _ in params.items():
            fused = next((f for f in shard_sizes if f".{f}." in pname), None)
            if fused:
                expected.update(f"{pname}#{i}" for i in range(len(shard_sizes[fused])))
            else:
                expected.add(pname)
        missing = sorted(expected - filled)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")


def build_model(cfg: ModelConfig, weights: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype, device: torch.device | str) -> LlamaForCausalLM:
    """Allocate the model directly on ``device`` in ``dtype`` (no init pass), then stream in the weights."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in dtype: no fp32 copy of an 8B model first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.rotary.inv_freq = model.rotary.inv_freq.float()  # rope frequencies stay fp32, as in transformers
    model.load_weights(weights)
    return model.eval()
