"""ModelConfig: the shape of a Llama-family decoder, independent of where its weights come from.

One config type covers Llama 2/3.x, Mistral, Qwen2/2.5 (bias on q/k/v), Qwen3 (RMSNorm on q and k),
and SmolLM2 (a Llama). Loaders (HF folder, GGUF, dummy presets) all produce one of these.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from batchllm.models.quant import QuantConfig, check_shape, parse_quantization_config

# HF `architectures` / `model_type` values this decoder implements.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str  # llama | mistral | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or HF's rope scaling dict; "llama3" is implemented, "linear" too.
    rope_scaling: Mapping[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q_proj/k_proj/v_proj
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # None: unquantized. Otherwise how the decoder's projections are stored (config.json's quantization_config)
    quant: QuantConfig | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.quant is not None:
            for name, (out_features, in_features) in self.projection_shapes().items():
                check_shape(self.quant, out_features, in_features, name)

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each HF projection of a decoder layer, e.g. ``"q_proj": (q, h)``."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    @property
    def num_parameters(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, i, L = self.hidden_size, self.intermediate_size, self.num_layers
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
        if self.attention_bias:
            per_layer += q + 2 * kv
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        emb = self.vocab_size * h
        return L * per_layer + emb * (1 if self.tie_word_embeddings else 2) + h

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of KV cache one token occupies across all layers (K and V)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """From a Hugging Face ``config.json`` dict; raises ValueError (one line) for an unsupported architecture
        or quantization (``quantization_config``, or ``compression_config`` in older compressed-tensors
        checkpoints: a quantized checkpoint is never loaded as if it were not)."""
        archs = cfg.get("architectures") or []
        model_type = None
        for a in archs:
            if a in SUPPORTED_ARCHITECTURES:
                model_type = SUPPORTED_ARCHITECTURES[a]
                break
        if model_type is None and cfg.get("model_type") in SUPPORTED_ARCHITECTURES.values():
            model_type = cfg["model_type"]
        if model_type is None:
            raise ValueError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; batchllm runs "
                + ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            )
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // num_heads
        # transformers >= 5 stores rope settings in `rope_parameters`; older configs in rope_theta/rope_scaling.
        rope_params = cfg.get("rope_parameters") or {}
        rope_theta = float(rope_params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_scaling = cfg.get("rope_scaling") or None
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = dict(rope_params)
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rtype = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rtype == "default":
                rope_scaling = None
            elif rtype not in ("llama3", "linear"):
                raise ValueError(f"unsupported rope scaling type {rtype!r} (supported: llama3, linear)")
        quant_raw = cfg.get("quantization_config", cfg.get("compression_config"))
        quant = None if quant_raw is None else parse_quantization_config(quant_raw, int(cfg["num_hidden_layers"]))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            quant=quant,
        )

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict for this shape (used to build reference models in tests)."""
        arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.model_type]
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
        }
        if self.rope_scaling is not None:
            out["rope_scaling"] = dict(self.rope_scaling)
        if self.model_type == "qwen2":
            out["attention_bias"] = self.attention_bias
        elif self.attention_bias:
            out["attention_bias"] = True
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            out["eos_token_id"] = list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0]
        return out
