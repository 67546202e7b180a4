"""The command line: a job end to end on dummy:tiny, one-line errors, job files, stats."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tests.job_utils import run_main

from batchllm.config import JobConfig, load_job_file, merge
from batchllm.errors import BatchLLMError
from batchllm.io.writer import read_results


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "batchllm", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture()
def prompts(tmp_path):
    p = tmp_path / "in.jsonl"
    rows = [{"custom_id": f"r{i}", "prompt_token_ids": [5 + i, 6, 7, 8, 9 + i], "max_tokens": 4} for i in range(5)]
    rows.append({"custom_id": "chat", "messages": [{"role": "user", "content": "hi"}], "n": 2, "temperature": 0.7})
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, "{not json")
    p.write_text("\n".join(lines) + "\n")
    return p


def test_run_end_to_end_on_dummy_model(tmp_path, prompts):
    out = tmp_path / "out"
    r = cli("run", str(prompts), "-o", str(out), "--model", "dummy:tiny", "--max-tokens", "3", "--seed", "1", "-q")
    assert r.returncode == 0, r.stderr
    rows = read_results(str(out)).to_pylist()
    ok = [x for x in rows if x["error_code"] is None]
    bad = [x for x in rows if x["error_code"] is not None]
    assert len(ok) == 5 + 2  # n=2 for the chat row
    assert [x["completion_tokens"] for x in ok if x["custom_id"].startswith("r")] == [4] * 5  # row overrides flag
    assert sorted(x["sample_index"] for x in ok if x["custom_id"] == "chat") == [0, 1]
    assert len(bad) == 1 and bad[0]["error_code"] == "malformed_json" and bad[0]["input_index"] == 2
    manifest = json.loads((out / ".manifest.json").read_text())
    assert manifest["summary"]["samples"] == 7 and manifest["summary"]["errors"] == 1
    assert "requests" in r.stderr and "prefill saving" in r.stderr


def test_unknown_model_is_one_clear_line(tmp_path, prompts):
    r = cli("run", str(prompts), "-o", str(tmp_path / "o"), "--model", str(tmp_path / "nope"))
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr


def test_missing_input_and_bad_flag(tmp_path):
    r = cli("run", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o"), "--model", "dummy:tiny")
    assert r.returncode == 1 and "error:" in r.stderr and "Traceback" not in r.stderr
    r = cli("run", "x.jsonl", "-o", str(tmp_path / "o"), "--dtype", "float8")
    assert r.returncode == 1 and "dtype" in r.stderr and "Traceback" not in r.stderr
    r = cli("run", "x.jsonl", "-o", str(tmp_path / "o"), "--max-tokens", "many")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_job_file_paths_relative_to_file_and_flags_override(tmp_path):
    (tmp_path / "jobs").mkdir()
    job = tmp_path / "jobs" / "j.toml"
    job.write_text('inputs = ["../data/in.jsonl"]\noutput = "../out"\nmodel = "dummy:tiny"\n[sampling]\nmax_tokens = 9\ntemperature = 0.5\n')
    values = load_job_file(str(job))
    assert values["inputs"] == [str(tmp_path / "data" / "in.jsonl")]
    assert values["model"] == "dummy:tiny"
    cfg = merge(values, {"max_tokens": 3, "temperature": None, "inputs": None})
    assert cfg.max_tokens == 3 and cfg.temperature == 0.5 and cfg.inputs == values["inputs"]
    job.write_text("max_tokenz = 3\n")
    with pytest.raises(BatchLLMError, match="max_tokenz"):
        load_job_file(str(job))


def test_config_validation():
    with pytest.raises(BatchLLMError, match="temperature"):
        JobConfig(inputs=["a"], output="o", temperature=-1).validate()
    with pytest.raises(BatchLLMError, match="policy"):
        JobConfig(inputs=["a"], output="o", policy="lifo").validate()


def test_stats_takes_chat_like_run(tmp_path, capsys):
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps({"article": f"text {i}"}) + "\n" for i in range(3)))
    args = ["stats", str(p), "--model", "dummy:tiny", "--prompt-template", "Summarise: {article}",
            "--system-prompt", "Be brief.", "--json"]
    code, err = run_main(args, capsys)
    assert code == 1 and "--chat" in err  # a system prompt a template cannot carry: refused, not dropped
    code, err = run_main([*args, "--chat"], capsys)
    assert code == 0, err


def test_stats_json_and_plot(tmp_path):
    p = tmp_path / "in.jsonl"
    head = list(range(100, 140))
    with open(p, "w") as f:
        for i in range(6):
            f.write(json.dumps({"prompt_token_ids": head + [200 + i, 300 + i], "max_tokens": 8}) + "\n")
    r = cli("stats", str(p), "--model", "dummy:tiny", "--json", "--plot", str(tmp_path / "s.png"))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["requests"] == 6 and d["logical_prompt_tokens"] == 6 * 42
    assert d["planned_prompt_tokens"] == 40 + 6 * 2  # the 40-token head once, two own tokens each
    assert d["unique_prompt_tokens"] == 40 + 6 * 2
    assert d["peak_kv_gb"] > 0
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_prompt_longer_than_the_kv_pool_is_a_row_error(tmp_path):
    p = tmp_path / "in.jsonl"
    rows = [{"custom_id": "long", "prompt_token_ids": list(range(1, 101))}]
    rows += [{"custom_id": f"s{i}", "prompt_token_ids": [5 + i, 6, 7], "n": 2, "temperature": 0.5} for i in range(3)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    r = cli("run", str(p), "-o", str(out), "--model", "dummy:tiny", "--max-tokens", "8", "--kv-cache-tokens", "64", "--page-size", "4", "-q")
    assert r.returncode == 0, r.stderr
    got = read_results(str(out)).to_pylist()
    errors = [x for x in got if x["error_code"]]
    assert [(x["custom_id"], x["error_code"]) for x in errors] == [("long", "prompt_too_long")]
    assert len([x for x in got if not x["error_code"]]) == 6
    # a pool too small for anything is one clear line, not a hang
    r = cli("run", str(p), "-o", str(tmp_path / "o2"), "--model", "dummy:tiny", "--kv-cache-tokens", "1", "--page-size", "4")
    assert r.returncode == 1 and "too small" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------- CLI polish


def main_output(args, capsys) -> tuple[int, str]:
    """``batchllm.cli.main`` in-process: exit status and stdout + stderr (signal handlers restored)."""
    return run_main(args, capsys, stdout=True)


def test_help_renders_brackets_and_shows_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.setenv("TERMINAL_WIDTH", "300")
    code, text = main_output(["run", "--help"], capsys)
    assert code == 0
    assert "batchllm[ray]" in text  # rich markup used to eat [ray]
    assert "[default: 256]" in text and "[default: 10000]" not in text  # max-tokens; shard-rows says it already
    assert "half" in text and "float16" in text  # --dtype's spellings


def test_unknown_flag_and_bad_value_are_one_error_line_exit_2(capsys):
    code, text = main_output(["run", "x.jsonl", "--tensor-parallel-size", "2"], capsys)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, text
    assert lines[0].startswith("error:") and "--tensor-parallel-size" in lines[0] and "batchllm run --help" in lines[0]
    assert "Did you mean" not in text and "╭" not in text
    code, text = main_output(["run", "x.jsonl", "--max-tokens", "many"], capsys)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "--max-tokens" in lines[0] and "batchllm run --help" in lines[0], text
    code, text = main_output(["nosuchcommand"], capsys)
    assert code == 2 and text.strip().startswith("error:") and "batchllm --help" in text


def test_vllm_dtype_spellings():
    import torch

    from batchllm.build import resolve_dtype

    cpu = torch.device("cpu")
    for spelling, dtype in (("half", torch.float16), ("float16", torch.float16), ("bfloat16", torch.bfloat16),
                            ("float", torch.float32), ("float32", torch.float32), ("auto", torch.float32)):
        JobConfig(inputs=["a"], output="o", dtype=spelling).validate()
        assert resolve_dtype(spelling, cpu) == dtype
    with pytest.raises(BatchLLMError, match="dtype"):
        JobConfig(inputs=["a"], output="o", dtype="float8").validate()


def test_progress_lines_when_stderr_is_not_a_terminal(prompts, tmp_path, capsys):
    out = tmp_path / "out"
    code, text = main_output(["run", str(prompts), "-o", str(out), "--model", "dummy:tiny", "--device", "cpu",
                              "--dtype", "float32", "--max-tokens", "6", "--preview", "0"], capsys)
    assert code == 0, text
    lines = [ln for ln in text.splitlines() if ln.startswith("batchllm: generating:")]
    assert lines and "7/7 samples done (100.0%)" in lines[-1] and "tok/s" in lines[-1] and "eta" in lines[-1], text
    assert "\x1b[" not in text  # plain lines, no colour codes in a log


def test_progress_moves_while_every_request_runs():
    from batchllm.cli import _ProgressView

    view = _ProgressView(interval=3600)
    view.hook("planned", {"requests": 4, "samples": 4, "token_budget": 40})
    for _ in range(5):  # four sequences decoding, none finished
        view.hook("step", {"finished": 0, "new_tokens": 4, "prompt_tokens": 0, "released": 0})
    assert view.fraction() == pytest.approx(0.5)
    assert "0/4 samples done (50.0%)" in view.line() and "20 output tokens" in view.line()
    view.hook("step", {"finished": 4, "new_tokens": 4, "prompt_tokens": 0, "released": 16})  # EOS: the rest released
    assert view.fraction() == 1.0
    view.close()
