"""Limits checked before work (issue 13): prompt length from characters before tokenizing, bounded template
format specs, n / max_tokens bounds, the CPU KV pool from the process's memory limits, signals at start-up,
and the reader's surprises (0-row Parquet, UTF-16 JSONL, null ids)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.job_utils import run_main

from batchllm import build, pipeline
from batchllm.config import JobConfig
from batchllm.errors import BatchLLMError
from batchllm.io import requests as rq
from batchllm.io import tokenize as tokenization
from batchllm.io.readers import ColumnMapping, read_requests
from batchllm.io.requests import Request, RowError
from batchllm.jobs.signals import StoppedOutsideJob, raise_on_signals, stop_on_signals
from batchllm.models import dummy, dummy_tokenizer
from batchllm.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tok():
    return dummy_tokenizer.build_tokenizer(dummy.preset_config("tiny"))


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


class _Spy:
    """A tokenizer wrapper recording the longest text it was asked to encode."""

    is_fast = False  # so that batch_encode calls __call__, not the wrapped tokenizer's Rust backend

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def __call__(self, texts, **kw):
        for t in [texts] if isinstance(texts, str) else texts:
            self.longest = max(self.longest, len(t))
        return self.tok(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


# ------------------------------------------------------------------------------ prompt length before tokenizing


def test_max_token_chars_is_the_dummy_vocabularys_longest_entry(tok):
    longest = max(len(t) for t in tok.get_vocab())
    assert tokenization.max_token_chars(tok) == longest == len("<|assistant|>")
    assert tokenization.max_prompt_chars(tok, 100) == longest * 99


def test_30mb_prompt_is_prompt_too_long_without_being_tokenized(tok):
    # issue 13: a 30 MB prompt was tokenized in full before the length check (4.7 GB RSS)
    spy = _Spy(tok)
    big = Request("big", "f", 0, SamplingParams(), prompt="word " * 6_000_000)
    ok = Request("ok", "f", 1, SamplingParams(), prompt="hello")
    chat = Request("chat", "f", 2, SamplingParams(), messages=[{"role": "user", "content": "x" * 2_000_000}])
    ids = Request("ids", "f", 3, SamplingParams(), prompt_token_ids=[5] * 5000)
    kept, errors = tokenization.tokenize([big, ok, chat, ids], spy, max_model_len=4096, vocab_size=tok.vocab_size)
    assert [r.custom_id for r in kept] == ["ok"]
    assert {e.custom_id: e.error_code for e in errors} == {"big": rq.PROMPT_TOO_LONG, "chat": rq.PROMPT_TOO_LONG,
                                                           "ids": rq.PROMPT_TOO_LONG}
    assert spy.longest < 100  # neither huge text reached the tokenizer
    assert "30,000,000 characters" in next(e.error_message for e in errors if e.custom_id == "big")


def test_prompt_just_under_the_character_bound_is_still_tokenized(tok):
    # the bound only refuses prompts that cannot fit: a long prompt within it goes on to the token check
    limit = tokenization.max_prompt_chars(tok, 64)
    r = Request("r", "f", 0, SamplingParams(), prompt="a" * limit)
    kept, errors = tokenization.tokenize([r], tok, max_model_len=64, vocab_size=tok.vocab_size)
    assert not kept and errors[0].error_code == rq.PROMPT_TOO_LONG and "tokens" in errors[0].error_message
    short = Request("s", "f", 0, SamplingParams(), prompt="a" * 10)
    assert tokenization.tokenize([short], tok, max_model_len=64, vocab_size=tok.vocab_size)[0] == [short]


def test_reader_refuses_prompts_over_max_prompt_chars(tmp_path):
    path = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x" * 101}, {"prompt": "x" * 100}])
    long, ok = read_requests([path], max_prompt_chars=100)
    assert isinstance(long, RowError) and long.error_code == rq.PROMPT_TOO_LONG
    assert isinstance(ok, Request)


# ------------------------------------------------------------------------------------ template format specs


@pytest.mark.parametrize("template", ["S: {article:{w}}", "S: {article:>1000000000}", "{article:.999999f}",
                                      "{article:x<101}"])
def test_template_format_spec_that_can_build_a_huge_prompt_is_refused(tmp_path, template):
    # issue 13: '{article:{w}}' with w = ">100000000", or a static '{article:>1000000000}', built a 100 MB+
    # prompt per row and the tokenizer aborted the job (rc 134)
    path = _write_jsonl(tmp_path / "in.jsonl", [{"article": "a", "w": ">100000000"}])
    with pytest.raises(BatchLLMError, match="template"):
        read_requests([path], mapping=ColumnMapping(prompt_template=template))


def test_template_repeating_a_long_field_is_prompt_too_long_before_it_is_built(tmp_path):
    path = _write_jsonl(tmp_path / "in.jsonl", [{"a": "x" * 1000}, {"a": "y"}])
    long, short = read_requests([path], mapping=ColumnMapping(prompt_template="{a}" * 50 + "{a!r:>5}"),
                                max_prompt_chars=20_000)
    assert long.error_code == rq.PROMPT_TOO_LONG and short.prompt == "y" * 50 + "  'y'"


def test_cli_template_format_spec_refused_with_one_line(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "in.jsonl", [{"article": "a"}])
    code, err = run_main(["run", path, "-o", str(tmp_path / "o"), "--model", "dummy:tiny", "-q",
                          "--prompt-template", "S: {article:>1000000000}"], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error:") and "format spec" in lines[0]


# --------------------------------------------------------------------------------------- n and max_tokens


def test_n_1e7_and_max_tokens_1e30_rows_are_error_rows(tmp_path):
    path = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a", "n": 10**7}, {"prompt": "a", "max_tokens": 1e30},
                                                {"prompt": "a", "n": 2}])
    n, mt, ok = read_requests([path])
    assert n.error_code == mt.error_code == rq.INVALID_PARAMETER
    assert "n must be at most" in n.error_message and "max_tokens must be at most" in mt.error_message
    assert ok.sampling.n == 2


# ----------------------------------------------------------------------------------------- KV pool sizing


def test_cpu_kv_pool_under_ulimit_v_is_sized_from_the_rlimit(monkeypatch):
    # issue 13: under `ulimit -v 5000000` the pool was sized from MemAvailable and numpy's allocation failed
    mcfg = dummy.preset_config("tiny")
    cfg = JobConfig(inputs=["a"], output="o", page_size=16)
    monkeypatch.setattr(build, "_meminfo_available", lambda: 64 << 30)
    monkeypatch.setattr(build, "_cgroup_headroom", lambda: [])
    monkeypatch.setattr(build, "_rlimit_headroom", lambda: [])
    free = build.kv_pool_pages(cfg, mcfg, build.torch.device("cpu"), build.torch.float32, 256)
    monkeypatch.setattr(build, "_rlimit_headroom", lambda: [400 << 20])
    limited = build.kv_pool_pages(cfg, mcfg, build.torch.device("cpu"), build.torch.float32, 256)
    monkeypatch.setattr(build, "_cgroup_headroom", lambda: [200 << 20, 1 << 40])
    cgroup = build.kv_pool_pages(cfg, mcfg, build.torch.device("cpu"), build.torch.float32, 256)
    page = build.KVCache.bytes_per_page(mcfg, 16, build.torch.float32)
    assert free == (4 << 30) // page  # the 4 GiB cap
    assert limited == int(0.25 * (400 << 20) // page) and cgroup == int(0.25 * (200 << 20) // page)


def test_cgroup_v2_and_rlimit_headroom_read_from_the_system():
    # whatever this machine has, each source is either absent or a number, and the minimum is used
    for h in (*build._cgroup_headroom(), *build._rlimit_headroom()):
        assert isinstance(h, int)
    assert build._available_ram() <= (build._meminfo_available() or 1 << 62)


def test_cgroup_v2_headroom_walks_up_the_hierarchy(tmp_path, monkeypatch):
    root = tmp_path / "cg"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "memory.max").write_text(str(300 << 20))
    (root / "a" / "memory.current").write_text(str(100 << 20))
    (root / "a" / "b" / "memory.max").write_text("max\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/a/b\n")
    real_open = open

    def fake_open(path, *a, **kw):
        path = str(path)
        if path == "/proc/self/cgroup":
            return real_open(proc, *a, **kw)
        if path.startswith("/sys/fs/cgroup"):
            return real_open(str(root) + path[len("/sys/fs/cgroup"):], *a, **kw)
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", fake_open)
    assert build._cgroup_headroom() == [200 << 20]


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS semantics")
def test_run_under_ulimit_v_5gb_finishes_without_array_memory_error(tmp_path):
    path = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"hi {i}", "max_tokens": 2} for i in range(3)])

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (5_000_000 * 1024, resource.RLIM_INFINITY))

    r = subprocess.run([sys.executable, "-m", "batchllm", "run", path, "-o", str(tmp_path / "o"), "--model", "dummy:tiny",
                        "-q"], capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert r.returncode == 0 and "Traceback" not in r.stderr and "MemoryError" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------- signals


def test_sigterm_in_the_first_seconds_raises_one_line_stop_not_the_default_action():
    # issue 13: signals before the job's handlers (imports, Ray, tokenizer, folder) got the default action
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        raise_on_signals()
        with pytest.raises(StoppedOutsideJob) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the handler runs between bytecodes
                pass
        assert e.value.exit_code == 128 + signal.SIGTERM and "SIGTERM" in str(e.value) and "\n" not in str(e.value)
        raise_on_signals()
        with stop_on_signals() as stop:  # a running job's handlers take over, then give the start-up ones back
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.name == "SIGINT"
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_cli_sigterm_during_start_up_is_one_line_and_exit_143(tmp_path, capsys, monkeypatch):
    def killed(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):
            pass
        raise AssertionError("the signal did not stop the run")

    monkeypatch.setattr(pipeline, "run_job", killed)
    path = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    code, err = run_main(["run", path, "-o", str(tmp_path / "o"), "--model", "dummy:tiny", "-q"], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 143 and len(lines) == 1 and "stopped by SIGTERM" in lines[0], err


# ------------------------------------------------------------------------------------------------ reader


def test_zero_row_parquet_is_an_error_like_an_empty_jsonl(tmp_path):
    # issue 13: a 0-row Parquet exited 0 while an empty JSONL was an error
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    with pytest.raises(BatchLLMError, match="no rows"):
        read_requests([str(path)])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(BatchLLMError, match="empty"):
        read_requests([str(tmp_path / "empty.jsonl")])


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_utf16_jsonl_is_refused_not_half_read(tmp_path, encoding):
    # issue 13: a UTF-16 JSONL ran 1 of 2 rows plus a phantom error row
    path = tmp_path / "in.jsonl"
    path.write_bytes('{"prompt": "a"}\n{"prompt": "b"}\n'.encode(encoding))
    with pytest.raises(BatchLLMError, match="UTF-8"):
        read_requests([str(path)])


def test_utf8_bom_jsonl_still_reads(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n{"prompt": "b"}\n')
    assert [r.prompt for r in read_requests([str(path)])] == ["a", "b"]


def test_null_custom_id_is_an_error_row_not_the_row_index(tmp_path):
    # issue 13: a null id defaulted to the row index and could collide with an explicit id
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"custom_id": ["1", None, "x"], "prompt": ["a", "b", "c"]}), path)
    one, null, x = read_requests([str(path)])
    assert one.custom_id == "1" and x.custom_id == "x"
    assert isinstance(null, RowError) and null.error_code == rq.INVALID_PARAMETER and null.custom_id is None
    assert "null" in null.error_message
    jsonl = _write_jsonl(tmp_path / "in.jsonl", [{"custom_id": None, "prompt": "a"}, {"prompt": "b"}])
    null, default = read_requests([jsonl])
    assert null.error_code == rq.INVALID_PARAMETER and default.custom_id == "1"


def test_default_id_colliding_with_an_explicit_id_says_why(tmp_path):
    path = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"custom_id": "0", "prompt": "b"},
                                                {"custom_id": "3", "prompt": "c"}, {"prompt": "d"},
                                                {"custom_id": "3", "prompt": "e"}])
    a, b, c, d, e = read_requests([path])
    assert a.custom_id == "0" and c.custom_id == "3"
    assert b.error_code == d.error_code == e.error_code == rq.DUPLICATE_CUSTOM_ID
    assert "default id" in b.error_message and "no custom_id" in d.error_message
    assert e.error_message == "custom_id '3' appeared earlier in the job"
