"""Durable jobs in process (``run_job`` with a preloaded dummy:tiny): row errors, resume, fingerprint
refusal, seeds independent of order and sharding, disk full mid-run, status.json."""

from __future__ import annotations

import errno
import json
import os
import random

import pytest
from tests.job_utils import SigintAt

from batchllm.config import JobConfig
from batchllm.errors import BatchLLMError
from batchllm.io import storage
from batchllm.io.writer import CommitError, read_results
from batchllm.jobs.manifest import read_manifest
from batchllm.jobs.status import read_status
from batchllm.pipeline import run_job

BASE = dict(model="dummy:tiny", device="cpu", dtype="float32", max_tokens=6, temperature=0.9, preview=0)


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def prompt_rows(k: int, n_every: int = 5) -> list[dict]:
    rows = []
    for i in range(k):
        r = {"custom_id": f"q{i}", "prompt_token_ids": [1, 100 + i % 7, 200 + i, 300, 400 + i % 3]}
        if i % n_every == 0:
            r["n"] = 2
        rows.append(r)
    return rows


def run(tiny, inputs, out, **kw) -> tuple:
    overwrite = kw.pop("overwrite", False)
    cfg = JobConfig(inputs=list(inputs), output=str(out), **{**BASE, **kw})
    summary = run_job(cfg, loaded=tiny, overwrite=overwrite)
    return summary, read_results(str(out), verify=True).to_pylist()


def texts(rows) -> dict:
    return {(r["custom_id"], r["sample_index"]): r["text"] for r in rows if r["error_code"] is None}


def test_every_row_error_class(tiny, tmp_path):
    rows = [
        {"custom_id": "ok1", "prompt": "Hello"},
        "{this is not json",
        {"custom_id": "noprompt", "max_tokens": 3},
        {"custom_id": "both", "prompt": "a", "messages": [{"role": "user", "content": "b"}]},
        {"custom_id": "negmax", "prompt": "a", "max_tokens": -1},
        {"custom_id": "temp", "prompt": "a", "temperature": "hot"},
        {"custom_id": "role", "messages": [{"role": "wizard", "content": "b"}]},
        {"custom_id": "ok1", "prompt": "duplicate"},
        {"custom_id": "long", "prompt_token_ids": list(range(1, 40))},
        {"custom_id": "ok2", "messages": [{"role": "user", "content": "Hi"}]},
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    summary, out = run(tiny, [inp], tmp_path / "out", max_model_len=32)
    errors = {r["input_index"]: r for r in out if r["error_code"] is not None}
    expect = {1: ("malformed_json", None), 2: ("missing_prompt", "noprompt"), 3: ("ambiguous_prompt", "both"),
              4: ("invalid_parameter", "negmax"), 5: ("invalid_parameter", "temp"), 6: ("invalid_messages", "role"),
              7: ("duplicate_custom_id", "ok1"), 8: ("prompt_too_long", "long")}
    assert {i: (e["error_code"], e["custom_id"]) for i, e in errors.items()} == expect
    for e in errors.values():
        assert e["input_file"] == inp and e["error_message"] and e["text"] is None
    assert "max_tokens" in errors[4]["error_message"] and "temperature" in errors[5]["error_message"]
    assert "wizard" in errors[6]["error_message"] and "32" in errors[8]["error_message"]
    ok = [r for r in out if r["error_code"] is None]
    assert sorted(r["custom_id"] for r in ok) == ["ok1", "ok2"] and {r["input_index"] for r in ok} == {0, 9}
    assert {r["custom_id"]: r["request_type"] for r in ok} == {"ok1": "completion", "ok2": "chat"}
    assert summary.errors == 8 and summary.errors_by_code["invalid_parameter"] == 2
    st = read_status(str(tmp_path / "out"))
    assert st["status"] == "completed" and st["request_counts"] == {"total": 10, "completed": 2, "failed": 8}


def test_seeds_independent_of_order_and_shard_rows(tiny, tmp_path):
    rows = prompt_rows(16)
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    b = write_jsonl(tmp_path / "b.jsonl", shuffled)
    _, small = run(tiny, [a], tmp_path / "o8", shard_rows=8)
    _, big = run(tiny, [a], tmp_path / "o1000", shard_rows=1000)
    _, other = run(tiny, [b], tmp_path / "ob", shard_rows=3, max_num_seqs=6)
    assert len(texts(small)) == 20 and texts(small) == texts(big) == texts(other)
    assert len(set(texts(small).values())) > 16  # sampled, and the two samples of a request differ
    assert len(read_manifest(str(tmp_path / "o8"))["shards"]) == 3


def test_rerun_resumes_and_mismatch_is_refused(tiny, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", prompt_rows(12) + ["{bad"])
    out = tmp_path / "out"
    _, ref = run(tiny, [inp], tmp_path / "ref")
    s1, first = run(tiny, [inp], out, shard_rows=4)
    s2, again = run(tiny, [inp], out, shard_rows=4)  # identical rerun: nothing left to do
    assert s2.samples == 0 and len(again) == len(first) == len(ref)
    assert texts(again) == texts(ref)
    with pytest.raises(BatchLLMError, match=r"seed \(0 -> 7\)"):
        run(tiny, [inp], out, seed=7)
    with pytest.raises(BatchLLMError, match=r"sampling defaults \(temperature 0.9 -> 0.5\)"):
        run(tiny, [inp], out, temperature=0.5)
    with pytest.raises(BatchLLMError, match="model weights"):
        run(tiny, [inp], out, model="dummy:tiny@3")
    s3, fresh = run(tiny, [inp], out, seed=7, overwrite=True)
    assert s3.samples == 15 and texts(fresh) != texts(ref)


def test_disk_full_mid_run_then_resume(tiny, tmp_path, monkeypatch):
    inp = write_jsonl(tmp_path / "in.jsonl", prompt_rows(20))
    _, ref = run(tiny, [inp], tmp_path / "ref")
    out = tmp_path / "out"
    calls = {"n": 0}

    def full_open(path, *a, **k):  # the third shard write finds the disk full
        if ".shard-" in os.fspath(path):
            calls["n"] += 1
            if calls["n"] >= 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return open(path, *a, **k)

    real_open_local = storage.open_local
    monkeypatch.setattr(storage, "open_local", full_open)
    with pytest.raises(CommitError, match="No space left on device.*resume with: batchllm resume"):
        run(tiny, [inp], out, shard_rows=3)
    monkeypatch.setattr(storage, "open_local", real_open_local)
    partial = read_results(str(out), verify=True).to_pylist()
    assert 0 < len(partial) < len(ref) and len(read_manifest(str(out))["shards"]) == 2
    assert read_status(str(out))["status"] == "failed"
    _, done = run(tiny, [inp], out, shard_rows=3)
    keys = [(r["custom_id"], r["sample_index"]) for r in done]
    assert len(keys) == len(set(keys)) == len(ref) and texts(done) == texts(ref)


def test_resume_skips_finished_rows_unread(tiny, tmp_path, monkeypatch):
    """After the read phase finished once, a resume does not parse finished rows at all."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompt_rows(10) + ["{bad"])
    out = tmp_path / "out"
    run(tiny, [inp], out)
    m = read_manifest(str(out))
    assert m["read_complete"] is True
    import types

    import batchllm.io.readers as readers

    parsed = []
    spy = types.SimpleNamespace(loads=lambda s: parsed.append(s) or json.loads(s))
    monkeypatch.setattr(readers, "json", spy)
    s, rows = run(tiny, [inp], out)
    first_line = open(inp, "rb").readline()
    assert set(parsed) <= {first_line}  # only format sniffing looks at a line; rows are not parsed
    assert s.samples == 0 and s.done_before == 11 and s.requests == 11 and len(rows) == 13


def test_sigint_stops_after_the_step_and_resume_completes(tiny, tmp_path):

    from batchllm.jobs.signals import JobInterrupted

    rows = prompt_rows(12)
    for i, r in enumerate(rows):
        r["max_tokens"] = 2 if i % 2 else 6  # short requests finish before the signal, long ones do not
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    _, ref = run(tiny, [inp], tmp_path / "ref")
    out = tmp_path / "out"
    progress = SigintAt("step", 3)

    cfg = JobConfig(inputs=[inp], output=str(out), shard_rows=2, **BASE)
    with pytest.raises(JobInterrupted) as e:
        run_job(cfg, progress=progress, loaded=tiny)
    assert e.value.exit_code == 130 and f"resume with: batchllm resume {out}" in str(e.value)
    assert progress.seen == 3  # no step ran after the signal
    partial = read_results(str(out), verify=True).to_pylist()
    assert 0 < len(partial) < len(ref)
    assert len({(r["custom_id"], r["sample_index"]) for r in partial}) == len(partial)
    per_request = {}
    for r in partial:
        per_request[r["custom_id"]] = per_request.get(r["custom_id"], 0) + 1
    assert all(c == (2 if int(cid[1:]) % 5 == 0 else 1) for cid, c in per_request.items())  # whole requests only
    assert read_status(str(out))["status"] == "cancelled"
    s, done = run(tiny, [inp], out)
    assert s.done_before == len(per_request) and texts(done) == texts(ref) and len(done) == len(ref)
    assert read_status(str(out))["status"] == "completed"


def test_resume_after_input_moved_keeps_original_names(tiny, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", prompt_rows(8))
    out = tmp_path / "out"
    _, ref = run(tiny, [inp], out, shard_rows=3)
    # forget the last shard, as if the job had died before committing it
    m = read_manifest(str(out))
    m["shards"].pop()
    with open(out / ".manifest.json", "w") as f:
        json.dump(m, f)
    moved = str(tmp_path / "moved.jsonl")
    os.rename(inp, moved)
    s, rows = run(tiny, [moved], out, shard_rows=3)
    assert 0 < s.samples < len(ref) and s.done_before > 0
    assert {r["input_file"] for r in rows} == {inp}
    assert len(rows) == len(ref) and texts(rows) == texts(ref)
    with pytest.raises(BatchLLMError, match="given twice"):
        run(tiny, [moved, moved], tmp_path / "o2")


def test_status_and_show_report_tokens_while_requests_run(tiny, tmp_path, monkeypatch):
    """Every request runs at once and none has finished: status.json, ``show`` and the progress events
    still advance (output tokens generated, prompt tokens computed, the token budget's share)."""
    from batchllm.jobs import status as status_mod
    from batchllm.jobs.show import job_state

    monkeypatch.setattr(status_mod, "WRITE_INTERVAL_S", 0.0)
    rows = [{"custom_id": f"x{i}", "prompt_token_ids": [40 + i, 50 + i, 60 + i, 70 + i], "max_tokens": 30, "ignore_eos": True}
            for i in range(6)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = str(tmp_path / "out")
    seen, steps = [], []

    def hook(event, info):
        if event == "planned":
            steps.append(info)
        if event == "step":
            steps.append(info)
            if len(steps) == 6:  # the status file holds the previous steps' figures
                seen.append((read_status(out), job_state(out)))

    run_job(JobConfig(inputs=[inp], output=out, **{**BASE, "max_tokens": 30}), progress=hook, loaded=tiny)
    assert steps[0]["token_budget"] == 6 * 30
    assert all({"new_tokens", "prompt_tokens", "released", "finished"} <= set(s) for s in steps[1:])
    assert sum(s["new_tokens"] + s["released"] for s in steps[1:]) == 6 * 30  # the budget is used up exactly
    st, state = seen[0]
    b = st["batchllm"]
    assert st["request_counts"]["completed"] == 0 and state["committed"]["completion_tokens"] == 0
    generated = sum(s["new_tokens"] for s in steps[1:5])  # what the status file saw: four steps
    assert b["generated_tokens"] == generated > 0 and b["prompt_tokens_computed"] == sum(s["prompt_tokens"] for s in steps[1:5]) > 0
    assert b["progress"] == pytest.approx(generated / 180, abs=1e-3) and b["throughput"]["output_tok_s"] > 0
    assert b["eta_seconds"] is not None  # from the token budget: no request has finished to rate
    assert state["tokens_so_far"]["completion"] == generated
    final = read_status(out)["batchllm"]
    assert final["generated_tokens"] == final["tokens"]["completion"] == 6 * 30
