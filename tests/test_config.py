"""Job files and options: one schema (type and range of every key), one-line errors (issue 13, item 8)."""

from __future__ import annotations

import pytest
from tests.job_utils import run_main

from batchllm.config import SCHEMA, JobConfig, load_job_file, merge
from batchllm.errors import BatchLLMError


def _job(tmp_path, body: str) -> str:
    p = tmp_path / "job.toml"
    p.write_text('inputs = ["in.jsonl"]\noutput = "out"\nmodel = "dummy:tiny"\n' + body)
    return str(p)


def _config(path: str) -> JobConfig:
    cfg = merge(load_job_file(path), {})
    cfg.validate()
    return cfg


# The 20 job files of the fault audit: 13 tracebacks at load, 2 crashes mid-run, 4 silently accepted, plus the
# type of every remaining key. Each must be refused up front, naming the key and the value.
BAD_VALUES = [
    ("inputs", "5"), ("output", "5"), ("model", "5"), ("max_tokens", '"4"'), ("temperature", '"hot"'),
    ("page_size", '"16"'), ("replicas", '"1"'), ("kv_cache_tokens", '"1000"'), ("max_num_seqs", '"8"'),
    ("prompt_template", "5"), ("top_k", "2.5"), ("preview", '"3"'), ("max_tokens", "true"), ("seed", '"abc"'),
    ("shard_rows", "2.5"), ("id_column", "5"), ("max_tokens", "1e30"), ("max_tokens", "0"), ("top_p", "0"),
    ("min_p", "1.5"), ("gpu_memory_utilization", "2"), ("enforce_eager", '"yes"'), ("policy", '"lifo"'),
    ("dtype", '"float8"'), ("attention", "1"), ("device", "[1]"), ("preview", "-1"), ("max_model_len", "0"),
    ("max_num_batched_tokens", "1.5"), ("ray_address", "1"), ("system_prompt", "[]"), ("messages_column", "{a = 1}"),
    ("prompt_column", "false"), ("temperature", "nan"), ("temperature", "inf"), ("seed", "1.5"),
    ("replica_start_timeout", "0"), ("replica_start_timeout", '"1h"'),
]


@pytest.mark.parametrize("key,value", BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_job_file_value_of_wrong_type_or_range_is_one_line_error(tmp_path, key, value):
    body = f"{key} = {value}\n"
    if key in ("inputs", "output", "model"):  # replace the default line
        path = tmp_path / "job.toml"
        lines = {"inputs": 'inputs = ["in.jsonl"]', "output": 'output = "out"', "model": 'model = "dummy:tiny"'}
        lines[key] = body.strip()
        path.write_text("\n".join(lines.values()) + "\n")
        path = str(path)
    else:
        path = _job(tmp_path, body)
    with pytest.raises(BatchLLMError) as e:
        _config(path)
    msg = str(e.value)
    assert "\n" not in msg and key in msg and ("expected" in msg or "must be" in msg), msg


def test_every_job_key_has_a_schema_rule():
    import dataclasses

    assert set(SCHEMA) == {f.name for f in dataclasses.fields(JobConfig)}
    JobConfig(inputs=["a"], output="o").validate()  # the defaults pass their own schema


def test_job_file_good_values_still_load(tmp_path):
    cfg = _config(_job(tmp_path, "temperature = 0\ntop_p = 1\nseed = -3\nmax_model_len = 64\nenforce_eager = true\n"
                                  "[engine]\npage_size = 8\n"))
    assert (cfg.temperature, cfg.seed, cfg.page_size, cfg.enforce_eager) == (0, -3, 8, True)


def test_job_file_input_and_inputs_both_given(tmp_path):
    with pytest.raises(BatchLLMError, match="input or inputs"):
        _config(_job(tmp_path, 'input = "b.jsonl"\n'))


def test_manifest_job_spec_of_wrong_type_is_one_line_error():
    # batchllm resume validates the stored job spec with the same schema
    cfg = JobConfig.from_spec({"inputs": ["a"], "output": "o", "preview": "3"})
    with pytest.raises(BatchLLMError, match=r"preview = '3' \(a string\): expected an integer"):
        cfg.validate()


@pytest.mark.parametrize("key,value", [("max_tokens", '"4"'), ("inputs", "5"), ("top_k", "2.5")])
def test_cli_job_file_bad_type_exit_1_one_error_line(tmp_path, capsys, key, value):
    path = tmp_path / "job.toml"
    path.write_text('output = "out"\nmodel = "dummy:tiny"\n' + ("" if key == "inputs" else 'inputs = ["in.jsonl"]\n')
                    + f"{key} = {value}\n")
    code, err = run_main(["run", "--job", str(path), "-q"], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error:") and key in lines[0], err
    assert not (tmp_path / "out").exists()


def test_job_file_not_utf8_or_a_folder_is_one_line_error(tmp_path):
    # found by tests/test_fuzz_inputs.py: a job file starting with byte 0x80 gave a UnicodeDecodeError traceback
    path = tmp_path / "job.toml"
    path.write_bytes(b"\x80 = 1\n")
    with pytest.raises(BatchLLMError, match="not UTF-8"):
        load_job_file(str(path))
    path.write_bytes('max_tokens = 3\n'.encode("utf-16"))
    with pytest.raises(BatchLLMError, match="job file"):
        load_job_file(str(path))
    with pytest.raises(BatchLLMError, match="cannot read job file"):
        load_job_file(str(tmp_path))


def test_cli_structured_output_defaults(tmp_path, capsys):
    """``--guided-choice`` / ``--response-format`` / ``--guided-regex`` set the job's default constraint as
    the job-file keys do (a row's own field replaces it); a flag that is not JSON is a one-line error."""
    import json

    from batchllm.io.writer import read_results

    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"custom_id": "d", "prompt": "p"}) + "\n"
                   + json.dumps({"custom_id": "r", "prompt": "p", "guided_regex": "z{2}"}) + "\n")
    base = [str(inp), "-m", "dummy:tiny", "--device", "cpu", "--kv-cache-tokens", "4096", "--max-tokens", "8", "-q"]
    code, err = run_main(["run", *base, "-o", str(tmp_path / "out"), "--guided-choice", '["yes", "no"]'], capsys)
    assert code == 0, err
    rows = {r["custom_id"]: r["text"] for r in read_results(str(tmp_path / "out")).to_pylist()}
    assert rows["d"] in ("yes", "no") and rows["r"] == "zz"
    code, err = run_main(["run", *base, "-o", str(tmp_path / "json"), "--response-format", '{"type": "json_object"}',
                          "--max-tokens", "40"], capsys)
    assert code == 0, err
    cfg_out = {r["custom_id"]: r for r in read_results(str(tmp_path / "json")).to_pylist()}
    assert cfg_out["d"]["text"].lstrip().startswith("{")
    code, err = run_main(["run", *base, "-o", str(tmp_path / "bad"), "--guided-choice", "[yes"], capsys)
    assert code == 1 and "--guided-choice must be JSON" in err and len(err.strip().splitlines()) == 1, err
