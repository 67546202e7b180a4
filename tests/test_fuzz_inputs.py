"""Fuzzing the input half (issue 13): generated bad rows, bad job files, truncated or corrupted model and
Parquet files thrown at the reader, the loaders and the command line.

Whatever comes in: no traceback (only ``BatchLLMError`` may leave the reader, the loaders and the config
code, and only as one line), exit status 0 with error records or 1 with one ``error:`` line, and nothing
outside the output folder is touched. Examples are bounded (hypothesis, no deadline) so the default run
stays well under a minute on two cores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from batchllm.config import SCHEMA, load_job_file, merge
from batchllm.errors import BatchLLMError
from batchllm.io import tokenize as tokenization
from batchllm.io.readers import ColumnMapping, read_requests
from batchllm.io.requests import Request, RowError
from batchllm.models import dummy, dummy_tokenizer, hf_folder, loader
from batchllm.models.config import ModelConfig
from tests.job_utils import run_main

def fast(n: int) -> settings:
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------- strategies

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
_json = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                     max_leaves=12)
_ROW_KEYS = ["custom_id", "prompt", "messages", "prompt_token_ids", "sampling_params", "max_tokens", "n", "temperature",
             "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "logprobs", "ignore_eos", "min_tokens",
             "presence_penalty", "repetition_penalty", "max_new_tokens", "method", "url", "body", "role", "content"]
_message = st.fixed_dictionaries({}, optional={"role": st.one_of(st.sampled_from(["user", "system", "assistant", "x"]), _scalars),
                                               "content": st.one_of(st.text(max_size=20), _json)})
_row_value = st.one_of(_json, st.lists(_message, max_size=3), st.lists(st.integers(-5, 60000), max_size=6))
_row = st.dictionaries(st.sampled_from(_ROW_KEYS), _row_value, max_size=6)
_line = st.one_of(
    _row.map(lambda r: json.dumps(r, allow_nan=True).encode()),
    _json.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b),
    st.just(b""),
)


def _tree(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file under ``root`` (but ``skip``) -> sha256, to prove nothing outside the output folder changed."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p.relative_to(root))] = "dir"
    return out


@pytest.fixture(scope="module")
def tok():
    return dummy_tokenizer.build_tokenizer(dummy.preset_config("tiny"))


# ------------------------------------------------------------------------------------------------ reader


@fast(120)
@given(lines=st.lists(_line, min_size=1, max_size=12), template=st.sampled_from([None, "Q: {prompt}", "{prompt!r:>5}"]))
def test_fuzz_jsonl_rows_reader_and_tokenizer(tmp_path, tok, lines, template):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    try:
        records = list(read_requests([str(path)], mapping=ColumnMapping(prompt_template=template), max_prompt_chars=5000))
    except BatchLLMError as e:
        assert "\n" not in str(e)
        return
    assert len(records) == sum(1 for ln in lines if ln.strip())  # one record per non-blank row
    assert all(isinstance(r, (Request, RowError)) for r in records)
    for r in records:
        if isinstance(r, RowError):
            assert r.error_code and r.error_message and isinstance(r.input_index, int)
    reqs = [r for r in records if isinstance(r, Request)]
    kept, errors = tokenization.tokenize(reqs, tok, max_model_len=64, vocab_size=tok.vocab_size)
    assert len(kept) + len(errors) == len(reqs)
    assert all(len(r.token_ids) < 64 for r in kept)


def _good_parquet(path: Path, rows: int = 20) -> None:
    pq.write_table(pa.table({"custom_id": [f"r{i}" for i in range(rows)], "prompt": [f"p {i}" * 3 for i in range(rows)],
                             "max_tokens": list(range(1, rows + 1))}), path, row_group_size=5)


@fast(60)
@given(cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=4))
def test_fuzz_truncated_or_corrupted_parquet(tmp_path, cut, flips):
    path = tmp_path / "in.parquet"
    _good_parquet(path)
    data = bytearray(path.read_bytes())
    for where, xor in flips:
        data[int(where * (len(data) - 1))] ^= xor
    data = data[: max(1, int(cut * len(data)))] if cut < 0.95 else data
    path.write_bytes(bytes(data))
    try:
        records = list(read_requests([str(path)]))
    except BatchLLMError as e:
        assert "\n" not in str(e)
        return
    assert all(isinstance(r, (Request, RowError)) for r in records)


# --------------------------------------------------------------------------------------------- job files


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


_toml_scalar = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=10))
_toml_any = st.one_of(_toml_scalar, st.lists(_toml_scalar, max_size=3), st.dictionaries(st.text(max_size=5), _toml_scalar, max_size=2))
_job_values = st.dictionaries(st.sampled_from(sorted(SCHEMA) + ["input", "sampling", "bogus"]), _toml_any, max_size=5)


@fast(100)
@given(values=_job_values, garbage=st.one_of(st.none(), st.binary(max_size=30)))
def test_fuzz_job_files(tmp_path, values, garbage):
    path = tmp_path / "job.toml"
    if garbage is not None:
        path.write_bytes(garbage)
    else:
        path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()), encoding="utf-8")
    try:
        cfg = merge(load_job_file(str(path)), {"inputs": ["in.jsonl"], "output": "out"})
        cfg.validate()
    except BatchLLMError as e:
        assert "\n" not in str(e).strip() or "TOML" in str(e)  # tomllib's own message may span lines
        return
    for key, rule in SCHEMA.items():  # whatever passed fits the schema
        assert rule.ok(getattr(cfg, key)), key


# -------------------------------------------------------------------------------------------- model files


_TINY = ModelConfig(model_type="llama", vocab_size=300, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> bytes:
    gguf = pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(_TINY.num_layers)
    w.add_context_length(_TINY.max_position_embeddings)
    w.add_embedding_length(_TINY.hidden_size)
    w.add_feed_forward_length(_TINY.intermediate_size)
    w.add_head_count(_TINY.num_heads)
    w.add_head_count_kv(_TINY.num_kv_heads)
    w.add_key_length(_TINY.head_dim)
    w.add_layer_norm_rms_eps(_TINY.rms_norm_eps)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(_TINY.vocab_size)])
    w.add_token_types([1] * _TINY.vocab_size)
    w.add_token_merges([])
    g = torch.Generator().manual_seed(0)
    for name, shape in hf_folder.weight_shapes(_TINY).items():
        w.add_tensor(_gguf_name(name), torch.randn(shape, generator=g).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _gguf_name(hf: str) -> str:
    from batchllm.models.gguf_file import _GLOBAL_NAMES, _LAYER_NAMES

    inverse = {v: k for k, v in _GLOBAL_NAMES.items()}
    if hf in inverse:
        return inverse[hf]
    parts = hf.split(".")  # model.layers.N.<module>.<sub>.weight
    layer, rest = parts[2], ".".join(parts[3:-1])
    return f"blk.{layer}.{next(k for k, v in _LAYER_NAMES.items() if v == rest)}.{parts[-1]}"


def _load_everything(spec: str) -> None:
    src = loader.resolve_model(spec)
    cfg = loader.load_config(src)
    for _ in loader.iter_weights(src, cfg, torch.float32, "cpu"):
        pass
    loader.load_tokenizer(src)


def test_intact_tiny_gguf_loads(tmp_path, tiny_gguf, monkeypatch):
    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(tiny_gguf)
    src = loader.resolve_model(str(tmp_path / "m.gguf"))
    assert loader.load_config(src) == dataclasses.replace(_TINY, rms_norm_eps=float(np.float32(_TINY.rms_norm_eps)))
    assert len(dict(loader.iter_weights(src, _TINY, torch.float32, "cpu"))) == len(hf_folder.weight_names(_TINY))


@fast(60)
@given(cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 0.3), st.integers(1, 255)), max_size=3),
       header_int=st.one_of(st.none(), st.tuples(st.integers(8, 200), st.sampled_from([0, 1, 2**31, 2**63, 2**64 - 1]))))
def test_fuzz_truncated_or_corrupted_gguf(tmp_path, tiny_gguf, monkeypatch, cut, flips, header_int):
    # issue 13: 7 of 24 crafted GGUF files gave struct.error / TypeError tracebacks
    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(tmp_path / "cache"))
    data = bytearray(tiny_gguf)
    for where, xor in flips:  # the metadata lives in the first part of the file
        data[int(where * (len(data) - 1))] ^= xor
    if header_int is not None:  # a crafted count or length field
        at, value = header_int
        data[at:at + 8] = struct.pack("<Q", value)
    if cut < 0.9:
        data = data[: int(cut * len(data))]
    path = tmp_path / "m.gguf"
    path.write_bytes(bytes(data))
    try:
        _load_everything(str(path))
    except BatchLLMError as e:
        assert "\n" not in str(e)


@pytest.mark.parametrize("config", [[], "x", {"model_type": "llama", "hidden_size": "big"},
                                    {"model_type": "llama", "hidden_size": 16, "num_attention_heads": 0},
                                    {"model_type": ["llama"]}, {"model_type": "llama", "vocab_size": None}])
def test_crafted_config_json_is_one_line_error(tmp_path, config):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(BatchLLMError):
        _load_everything(str(folder))


@fast(25)
@given(cut=st.floats(0, 1), flip=st.one_of(st.none(), st.tuples(st.floats(0, 1), st.integers(1, 255))))
def test_fuzz_truncated_safetensors_and_index(tmp_path, cut, flip):
    from safetensors.torch import save_file

    folder = tmp_path / "m"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 300, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128, "tie_word_embeddings": True}))
    g = torch.Generator().manual_seed(0)
    save_file({n: torch.randn(s, generator=g) for n, s in hf_folder.weight_shapes(_TINY).items()}, str(folder / "model.safetensors"))
    data = bytearray((folder / "model.safetensors").read_bytes())
    if flip is not None:
        data[int(flip[0] * (len(data) - 1))] ^= flip[1]
    if cut < 0.9:
        data = data[: int(cut * len(data))]
    (folder / "model.safetensors").write_bytes(bytes(data))
    try:
        src = loader.resolve_model(str(folder))
        cfg = loader.load_config(src)
        for _ in loader.iter_weights(src, cfg, torch.float32, "cpu"):
            pass
    except BatchLLMError as e:
        assert "\n" not in str(e)


# -------------------------------------------------------------------------------------------------- CLI


_flags = st.fixed_dictionaries({}, optional={
    "--max-tokens": st.sampled_from(["0", "2", "-1", "99999999999"]),
    "--temperature": st.sampled_from(["0", "nan", "-1", "0.5"]),
    "--prompt-template": st.sampled_from(["{prompt}", "{prompt:{n}}", "{prompt:>999999}", "{x.y}", "{", "P {prompt!r}"]),
    "--shard-rows": st.sampled_from(["0", "2"]),
    "--page-size": st.sampled_from(["0", "4"]),
    "--max-model-len": st.sampled_from(["1", "16", "0"]),
    "--kv-cache-tokens": st.sampled_from(["1", "64", "0"]),
    "--id-column": st.sampled_from(["custom_id", "nope"]),
})


@fast(16)
@given(lines=st.lists(_line, min_size=1, max_size=6), flags=_flags, as_parquet=st.booleans(), job=st.one_of(st.none(), _job_values))
def test_fuzz_cli_run_exit_status_and_no_file_outside_output_touched(tmp_path_factory, capsys, lines, flags, as_parquet, job):
    root = tmp_path_factory.mktemp("cli")
    out = root / "out"
    inp = root / "in.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    if as_parquet:  # the same rows as Parquet when they form a table arrow can type; else the corrupted bytes
        rows = [r for r in (_try_json(ln) for ln in lines) if isinstance(r, dict)]
        try:
            pq.write_table(pa.Table.from_pylist(rows), root / "in.parquet")
        except Exception:  # noqa: BLE001
            (root / "in.parquet").write_bytes(b"PAR1" + b"".join(lines)[:64])
        inp = root / "in.parquet"
    args = ["run", str(inp), "-o", str(out), "--model", "dummy:tiny", "-q", "--max-tokens", "2"]
    for k, v in flags.items():
        args += [k, v]
    if job is not None:
        (root / "job.toml").write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in job.items() if k not in
                                               ("inputs", "input", "output", "model")), encoding="utf-8")
        args += ["--job", str(root / "job.toml")]
    before = _tree(root, skip=out)
    code, err = run_main(args, capsys)
    event(f"exit {code}")
    assert "Traceback" not in err
    lines_out = [ln for ln in err.splitlines() if ln.strip()]
    if code == 0:
        assert (out / ".manifest.json").is_file()
    elif code == 1:
        assert len(lines_out) == 1 and lines_out[0].startswith("error:"), err
    else:
        assert code == 2, (code, err)  # a flag typer cannot parse: its usage message
    assert _tree(root, skip=out) == before


def _try_json(line: bytes):
    try:
        return json.loads(line)
    except ValueError:
        return None


@pytest.mark.parametrize("case", ["utf16", "empty_parquet", "null_ids", "huge_template", "n_1e7", "dir_input"])
def test_cli_bad_inputs_one_line_or_error_records(tmp_path, capsys, case):
    out = tmp_path / "out"
    inp = tmp_path / "in.jsonl"
    extra: list[str] = []
    if case == "utf16":
        inp.write_bytes('{"prompt": "a"}\n{"prompt": "b"}\n'.encode("utf-16"))
    elif case == "empty_parquet":
        inp = tmp_path / "in.parquet"
        pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), inp)
    elif case == "null_ids":
        inp = tmp_path / "in.parquet"
        pq.write_table(pa.table({"custom_id": ["1", None], "prompt": ["a", "b"]}), inp)
    elif case == "huge_template":
        inp.write_text(json.dumps({"article": "a", "w": ">100000000"}) + "\n")
        extra = ["--prompt-template", "S: {article:{w}}"]
    elif case == "n_1e7":
        inp.write_text(json.dumps({"prompt": "a", "n": 1e7}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    else:
        inp = tmp_path / "folder"
        inp.mkdir()
    before = _tree(tmp_path, skip=out)
    code, err = run_main(["run", str(inp), "-o", str(out), "--model", "dummy:tiny", "-q", "--max-tokens", "2", *extra], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if case in ("null_ids", "n_1e7"):
        from batchllm.io.writer import read_results

        assert code == 0, err
        errors = [r for r in read_results(str(out)).to_pylist() if r["error_code"]]
        assert [r["error_code"] for r in errors] == ["invalid_parameter"]
    else:
        assert code == 1 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert _tree(tmp_path, skip=out) == before
