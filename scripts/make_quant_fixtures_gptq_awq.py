"""Make the GPTQ and AWQ test checkpoints under tests/data/quant/ with the formats' own writers.

Run in a virtual environment of its own (the writers pin old transformers), never in batchllm's::

    python -m venv /tmp/qvenv && /tmp/qvenv/bin/pip install torch==2.13.0 'numpy<2' safetensors \
        transformers==4.51.3 'huggingface-hub<1.0' accelerate 'datasets<4' zstandard peft==0.15.2 rouge \
        gekko sentencepiece
    /tmp/qvenv/bin/pip install --no-deps auto-gptq==0.7.1 autoawq==0.2.9
    /tmp/qvenv/bin/python scripts/make_quant_fixtures_gptq_awq.py tests/data/quant

Data-free: the integer weights, scales and zero points are chosen here (seeded) and stored as the ground
truth (``ground_truth.safetensors``; ``q`` two to a byte, input ``2j`` in the low nibble of byte ``j``,
scales float16, zero points uint8); every projection of a small random Llama (the shape of
tests/test_quant.py's TINY) is set to ``(q - zero) * scale`` and handed to the writer's own packer
(auto-gptq's ``QuantLinear.pack``, AutoAWQ's ``WQLinear_GEMM.from_linear``), which recovers exactly
those integers because every value is exact in float16 (``scale = k / 2048``, k in 1..15). The reference
next to each checkpoint (``reference.json``) is transformers' Llama in float32 greedy-decoding the test
prompts with each projection's weight taken from the writer's own forward (its CPU dequantize-and-matmul
applied to the identity), checked equal to the ground truth first.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

# tests/test_quant.py's TINY
CONFIG = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, max_position_embeddings=512,
              bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, torch_dtype="float16")
PROMPTS = [[1, 5, 9, 33, 100], [1, 7, 7, 7, 2, 40], [1, 200, 3, 4, 5, 6, 7, 8, 9], [1, 64, 128, 192, 250]]
NEW_TOKENS = 10
PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
# name -> (writer, group size (-1: per channel), symmetric)
FIXTURES = {"gptq-g128-sym": ("gptq", 128, True), "gptq-channel-asym": ("gptq", -1, False),
            "awq-g128": ("awq", 128, False)}


def ground_truth(model) -> dict[str, torch.Tensor]:
    """Seeded integers per projection: q (out, in) in 0..15, and for group 128 and per channel a float16
    scale (k / 2048) and an asymmetric zero point in 1..15 (auto-gptq's v1 zeros cannot hold 0)."""
    gen = torch.Generator().manual_seed(0)
    truth = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or name == "lm_head":
            continue
        out_f, in_f = mod.weight.shape
        truth[f"{name}.q"] = torch.randint(0, 16, (out_f, in_f), generator=gen, dtype=torch.uint8)
        for tag, groups in (("g128", in_f // 128), ("channel", 1)):
            truth[f"{name}.scale_{tag}"] = (torch.randint(1, 16, (out_f, groups), generator=gen) / 2048).half()
            truth[f"{name}.zero_{tag}"] = torch.randint(1, 16, (out_f, groups), generator=gen, dtype=torch.uint8)
    return truth


def dequantize(truth, name: str, group: int, sym: bool) -> torch.Tensor:
    """float16 (out, in) weight ``(q - zero) * scale`` of projection ``name`` (exact in float16)."""
    tag = "g128" if group == 128 else "channel"
    q, scale = truth[f"{name}.q"].float(), truth[f"{name}.scale_{tag}"].float()
    zero = torch.full_like(scale, 8.0) if sym else truth[f"{name}.zero_{tag}"].float()
    per = q.shape[1] // scale.shape[1]
    w = (q - zero.repeat_interleave(per, 1)) * scale.repeat_interleave(per, 1)
    assert torch.equal(w.half().float(), w)
    return w.half()


def pack_model(model, truth, writer: str, group: int, sym: bool) -> dict[str, nn.Module]:
    """The writer's quantized module for every projection, packed from the ground truth."""
    from auto_gptq.nn_modules.qlinear.qlinear_cuda_old import QuantLinear
    from awq.modules.linear.gemm import WQLinear_GEMM

    tag = "g128" if group == 128 else "channel"
    packed = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or name == "lm_head":
            continue
        out_f, in_f = mod.weight.shape
        linear = nn.Linear(in_f, out_f, bias=False, dtype=torch.float16)
        linear.weight.data = dequantize(truth, name, group, sym)
        scale = truth[f"{name}.scale_{tag}"]
        zero = torch.full_like(scale, 8) if sym else truth[f"{name}.zero_{tag}"].half()
        if writer == "gptq":
            ql = QuantLinear(4, group, in_f, out_f, bias=False)
            g_idx = torch.tensor([i // ql.group_size for i in range(in_f)], dtype=torch.int32)
            ql.pack(linear, scale.clone(), zero.clone(), g_idx)  # (out, groups), as auto-gptq's quantizer hands them
        else:
            ql = WQLinear_GEMM.from_linear(linear, 4, group, scales=scale.t().contiguous(), zeros=zero.t().contiguous())
        packed[name] = ql
    return packed


def writer_weight(ql: nn.Module, in_f: int) -> torch.Tensor:
    """The writer's own dequantization: its forward applied to the identity, transposed to (out, in)."""
    with torch.no_grad():
        return ql(torch.eye(in_f, dtype=torch.float16)).t().float()


def greedy(model) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = list(p)
            for _ in range(NEW_TOKENS):
                logits = model(torch.tensor([ids])).logits[0, -1]
                ids.append(int(logits.argmax()))
            out.append(ids[len(p):])
    return out


def main(root: Path) -> None:
    import auto_gptq
    import awq
    import transformers
    from auto_gptq import BaseQuantizeConfig
    from awq.models._config import AwqConfig
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**CONFIG, initializer_range=0.08)).eval().half()
    truth = ground_truth(base)
    root.mkdir(parents=True, exist_ok=True)
    stored = {k: (v[:, 0::2] | v[:, 1::2] << 4) if k.endswith(".q") else v for k, v in truth.items()}
    save_file({k: v.contiguous() for k, v in stored.items()}, str(root / "ground_truth.safetensors"))
    plain = {k: v for k, v in base.state_dict().items() if "_proj." not in k or k.startswith("lm_head")}
    versions = {"auto-gptq": auto_gptq.__version__, "autoawq": awq.__version__, "torch": torch.__version__,
                "transformers": transformers.__version__}
    for fixture, (writer, group, sym) in FIXTURES.items():
        packed = pack_model(base, truth, writer, group, sym)
        ref = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
        ref.load_state_dict({k: v.float() for k, v in base.state_dict().items()})
        for name, ql in packed.items():
            w = writer_weight(ql, ref.get_submodule(name).in_features)
            assert torch.equal(w, dequantize(truth, name, group, sym).float()), (fixture, name)
            ref.get_submodule(name).weight.data = w
        tensors = dict(plain)
        for name, ql in packed.items():
            tensors.update({f"{name}.{k}": v for k, v in ql.state_dict().items()})
        if writer == "gptq":
            qcfg = BaseQuantizeConfig(bits=4, group_size=group, desc_act=False, sym=sym).to_dict()
        else:
            qcfg = AwqConfig(zero_point=True, q_group_size=group, w_bit=4, version="GEMM").to_transformers_dict()
        out = root / fixture
        out.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        hf_config = LlamaConfig(**CONFIG)
        hf_config.quantization_config = qcfg
        hf_config.save_pretrained(out)
        (out / "reference.json").write_text(json.dumps(
            {"prompts": PROMPTS, "greedy": greedy(ref), "group_size": group, "sym": sym, "writer": versions},
            ) + "\n")
        print(fixture, {k: tuple(v.shape) for k, v in packed["model.layers.0.mlp.down_proj"].state_dict().items()})


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/quant"))
