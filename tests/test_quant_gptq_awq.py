"""GPTQ and AWQ 4-bit checkpoints on the int4 layer: converted at load, exact against the integers they were
packed from, greedy tokens equal to the writer's reference, and what they cannot express refused in one line.

The checkpoints in tests/data/quant/ were packed by auto-gptq's and AutoAWQ's own code (see the README
there and scripts/make_quant_fixtures_gptq_awq.py), never by a packer written here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from batchllm.errors import BatchLLMError
from batchllm.models import hf_folder, loader, quant
from batchllm.models.layers import Int4Linear
from batchllm.models.llama import build_model
from batchllm.sampling_params import SamplingParams
from tests.engine_utils import run_engine

DATA = Path(__file__).parent / "data" / "quant"
FIXTURES = ("gptq-g128-sym", "gptq-channel-asym", "awq-g128")


def _ground_truth(folder: Path, zero_offset: int = 0) -> dict[str, torch.Tensor]:
    """Projection name -> float32 (out, in) weight ``(q - zero) * scale`` from the stored integers."""
    from safetensors.torch import load_file

    ref = json.loads((folder / "reference.json").read_text())
    tag = "g128" if ref["group_size"] == 128 else "channel"
    truth = load_file(str(DATA / "ground_truth.safetensors"))
    out = {}
    for key in truth:
        if not key.endswith(".q"):
            continue
        name = key[: -len(".q")]
        packed = truth[key].to(torch.int64)
        q = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).float()  # byte j: inputs 2j, 2j+1
        scale = truth[f"{name}.scale_{tag}"].float()
        zero = torch.full_like(scale, 8.0) if ref["sym"] else truth[f"{name}.zero_{tag}"].float()
        per = q.shape[1] // scale.shape[1]
        out[name] = (q - (zero + zero_offset).repeat_interleave(per, 1)) * scale.repeat_interleave(per, 1)
    return out


def _loaded_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Projection name -> float32 (out, in) weight dequantized from what the loader yields."""
    src = loader.resolve_model(str(folder))
    cfg = loader.load_config(src)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in loader.iter_weights(src, cfg, torch.float32, "cpu"):
        prefix, _, leaf = name.rpartition(".")
        if leaf.startswith("weight_"):
            parts.setdefault(prefix, {})[leaf] = tensor
    return {p: quant.dequantize_int4(t["weight_packed"], t["weight_scale"], t.get("weight_zero_point"))
            for p, t in parts.items()}


def _copy(folder: Path, tmp_path: Path, edit_config=None, edit_tensors=None) -> Path:
    """A copy of a fixture with its quantization_config and/or tensors edited (to make refusals)."""
    from safetensors.torch import load_file, save_file

    dest = tmp_path / folder.name
    shutil.copytree(folder, dest)
    if edit_config is not None:
        raw = json.loads((dest / "config.json").read_text())
        edit_config(raw["quantization_config"])
        (dest / "config.json").write_text(json.dumps(raw))
    if edit_tensors is not None:
        sd = load_file(str(dest / "model.safetensors"))
        edit_tensors(sd)
        save_file(sd, str(dest / "model.safetensors"))
    return dest


# ------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("fixture", FIXTURES)
def test_dequantized_weights_equal_the_ground_truth_exactly(fixture):
    got, want = _loaded_weights(DATA / fixture), _ground_truth(DATA / fixture)
    assert sorted(got) == sorted(want) and len(want) == 2 * 7
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("fixture, q", [
    ("gptq-g128-sym", quant.QuantConfig("int4", "group", 128, symmetric=True, layout="gptq")),
    ("gptq-channel-asym", quant.QuantConfig("int4", "channel", None, symmetric=False, layout="gptq")),
    ("awq-g128", quant.QuantConfig("int4", "group", 128, symmetric=False, layout="awq")),
])
def test_config_parses_and_the_model_keeps_int4_layers(fixture, q):
    src = loader.resolve_model(str(DATA / fixture))
    cfg = loader.load_config(src)
    assert cfg.quant == q
    model = build_model(cfg, loader.iter_weights(src, cfg, torch.float32, "cpu"), torch.float32, "cpu")
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 2 * 4  # qkv, o, gate_up, down per layer
    assert all((m.weight_zero_point is None) == q.symmetric for m in layers)  # sym GPTQ zeros (all 8) dropped


@pytest.mark.parametrize("fixture", FIXTURES)
def test_greedy_tokens_equal_the_writer_reference(fixture):
    ref = json.loads((DATA / fixture / "reference.json").read_text())
    src = loader.resolve_model(str(DATA / fixture))
    cfg = loader.load_config(src)
    model = build_model(cfg, loader.iter_weights(src, cfg, torch.float32, "cpu"), torch.float32, "cpu")
    params = SamplingParams(max_tokens=len(ref["greedy"][0]), temperature=0.0, ignore_eos=True)
    done, _ = run_engine(model, cfg, ref["prompts"], params)
    assert [list(done[i][0].output_ids) for i in range(len(ref["prompts"]))] == ref["greedy"]


def test_gptq_v2_reads_zeros_without_the_v1_offset(tmp_path):
    # the same words read as gptq_v2: every zero is one less than v1's, so w = (q - (zero - 1)) * scale
    folder = _copy(DATA / "gptq-channel-asym", tmp_path, edit_config=lambda q: q.update(checkpoint_format="gptq_v2"))
    got, want = _loaded_weights(folder), _ground_truth(DATA / "gptq-channel-asym", zero_offset=-1)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_gptqmodel_format_key_is_read():
    raw = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": False, "desc_act": False, "format": "gptq_v2"}
    assert quant.parse_quantization_config(raw, 2) == quant.QuantConfig("int4", "group", 128, False, layout="gptq_v2")


# ---------------------------------------------------------------------------------------------- refusal


def _refusal(folder: Path) -> str:
    with pytest.raises(BatchLLMError) as e:
        src = loader.resolve_model(str(folder))
        cfg = loader.load_config(src)
        list(hf_folder.iter_weights(Path(src.path), cfg, torch.float32, "cpu"))
    msg = str(e.value)
    assert "\n" not in msg and "GPTQ 4-bit (checkpoint_format gptq or gptq_v2" in msg and "AWQ 4-bit GEMM" in msg
    return msg


@pytest.mark.parametrize("fixture, edit, why", [
    ("gptq-g128-sym", lambda q: q.update(bits=8), "'gptq' with 8-bit weights"),
    ("gptq-g128-sym", lambda q: q.update(bits=3), "'gptq' with 3-bit weights"),
    ("gptq-g128-sym", lambda q: q.update(is_marlin_format=True), "the Marlin layout (is_marlin_format)"),
    ("gptq-g128-sym", lambda q: q.update(checkpoint_format="marlin"), "checkpoint_format 'marlin'"),
    ("gptq-g128-sym", lambda q: q.update(group_size=100), "group_size 100"),
    ("gptq-g128-sym", lambda q: q.update(lm_head=True), "a quantized lm_head"),
    ("awq-g128", lambda q: q.update(version="gemv"), "'awq' with version 'gemv'"),
    ("awq-g128", lambda q: q.update(zero_point=False), "zero_point false"),
    ("awq-g128", lambda q: q.update(group_size=-1), "group_size -1"),
    ("awq-g128", lambda q: q.update(modules_to_not_convert=["model.layers.0.mlp.down_proj"]), "per-module exceptions"),
])
def test_what_the_layer_cannot_run_is_refused_in_one_line(tmp_path, fixture, edit, why):
    assert why in _refusal(_copy(DATA / fixture, tmp_path, edit_config=edit))


def test_activation_order_g_idx_is_refused(tmp_path):
    name = "model.layers.1.self_attn.o_proj.g_idx"

    def permute(sd):
        sd[name] = sd[name][torch.randperm(256, generator=torch.Generator().manual_seed(0))].contiguous()

    folder = _copy(DATA / "gptq-g128-sym", tmp_path, edit_config=lambda q: q.update(desc_act=True),
                   edit_tensors=permute)
    assert f"{name} is an activation-order permutation (desc_act)" in _refusal(folder)


def test_desc_act_with_a_trivial_g_idx_loads(tmp_path):
    folder = _copy(DATA / "gptq-g128-sym", tmp_path, edit_config=lambda q: q.update(desc_act=True))
    want = _ground_truth(DATA / "gptq-g128-sym")
    got = _loaded_weights(folder)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_symmetric_config_over_asymmetric_zeros_is_refused(tmp_path):
    folder = _copy(DATA / "gptq-channel-asym", tmp_path, edit_config=lambda q: q.update(sym=True))
    assert "a symmetric (sym) checkpoint with zero points other than 8" in _refusal(folder)
