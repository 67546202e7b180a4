"""Unit tests of the durable-job building blocks: completed set, shard writer, manifest fingerprint,
status.json and signals (no model involved)."""

from __future__ import annotations

import errno
import os
import signal

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchllm.errors import BatchLLMError
from batchllm.io import writer as w
from batchllm.io.writer import CommitError, ShardWriter, committed_totals, read_results
from batchllm.jobs.completed import CompletedSet, decode_indices, encode_indices
from batchllm.jobs.manifest import build_fingerprint, check_same_job, fingerprint_changes, input_identity, read_manifest
from batchllm.jobs.signals import JobInterrupted, stop_on_signals
from batchllm.jobs.status import StatusFile, read_status


def row(i: int, sample: int = 0, file: str = "in.jsonl", error: str | None = None) -> dict:
    if error:
        return {"custom_id": str(i), "input_file": file, "input_index": i, "error_code": error, "error_message": "bad"}
    return {"custom_id": str(i), "input_file": file, "input_index": i, "sample_index": sample, "text": f"t{i}.{sample}",
            "finish_reason": "length", "prompt_tokens": 5, "completion_tokens": 3, "cached_tokens": 1, "token_ids": [1, 2, 3]}


# ------------------------------------------------------------------------------------------ completed


@given(st.lists(st.integers(0, 2**32 - 1), max_size=300))
@settings(max_examples=60, deadline=None)
def test_indices_roundtrip(idx):
    assert decode_indices(encode_indices(idx)).tolist() == sorted(set(idx))


def test_indices_are_compact():
    rng = np.random.default_rng(0)
    scattered = rng.choice(1_000_000, 10_000, replace=False)
    assert len(encode_indices(scattered)) < 2.5 * 10_000  # a couple of bytes per row
    assert len(encode_indices(range(100_000))) < 400  # contiguous runs cost next to nothing


def test_completed_set_lookup():
    s = CompletedSet()
    s.add(0, [1, 5, 5, 9])
    s.add(0, [5, 100])
    s.add(2, [0])
    assert len(s) == 5
    assert s.contains(0, 100) and not s.contains(0, 2) and not s.contains(1, 0) and not s.contains(0, 10**9)
    assert s.mask(0, np.array([0, 1, 5, 101, -1])).tolist() == [False, True, True, False, False]
    assert s.done_indices(0).tolist() == [1, 5, 9, 100]


# -------------------------------------------------------------------------------------------- writer


def test_writer_commits_whole_requests_and_records_done(tmp_path):
    out = str(tmp_path / "job")
    wr = ShardWriter(out, 4, job_spec={"inputs": ["in.jsonl"]})
    wr.add(row(0, error="malformed_json"))
    for i in range(1, 4):
        wr.add_request([row(i, s) for s in range(3)])  # n=3: never split across shards
    wr.close(summary={"x": 1})
    m = read_manifest(out)
    assert [s["rows"] for s in m["shards"]] == [4, 6]
    assert m["input_files"] == ["in.jsonl"] and m["summary"] == {"x": 1}
    done = CompletedSet.from_shards(m["shards"])
    assert done.done_indices(0).tolist() == [0, 1, 2, 3]
    t = committed_totals(m)
    assert (t["completed"], t["failed"], t["samples"], t["errors_by_code"]) == (3, 1, 9, {"malformed_json": 1})
    assert t["prompt_tokens"] == 45 and t["cached_tokens"] == 9
    res = read_results(out, verify=True)
    assert res.num_rows == 10 and res.column_names == w.OUTPUT_SCHEMA.names
    for s in m["shards"]:
        assert pq.read_table(os.path.join(out, s["file"])).num_rows == s["rows"]


def test_writer_resumes_numbering_and_removes_orphans(tmp_path):
    out = str(tmp_path)
    wr = ShardWriter(out, 2)
    wr.add_request([row(0)])
    wr.add_request([row(1)])
    wr.close()
    # what a SIGKILL leaves behind: a renamed shard the manifest does not list, and a temporary
    (tmp_path / "shard-00001.parquet").write_bytes(b"partial")
    (tmp_path / ".shard-00002.parquet.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("user file")
    wr2 = ShardWriter(out, 2, manifest=read_manifest(out))
    assert sorted(os.listdir(out)) == sorted([".batchllm-job", ".batchllm.lock", ".manifest.json", "notes.txt", "shard-00000.parquet"])
    wr2.add_request([row(2)])
    wr2.close()
    m = read_manifest(out)
    assert [s["file"] for s in m["shards"]] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert len(m["runs"]) == 2
    assert read_results(out, verify=True)["input_index"].to_pylist() == [0, 1, 2]


def test_writer_lock_refuses_second_writer(tmp_path):
    wr = ShardWriter(str(tmp_path), 2)
    with pytest.raises(BatchLLMError, match="another batchllm process"):
        ShardWriter(str(tmp_path), 2)
    wr.close()
    ShardWriter(str(tmp_path), 2, manifest=read_manifest(str(tmp_path))).close()


def test_writer_disk_full_keeps_committed_shards(tmp_path, monkeypatch):
    out = str(tmp_path)
    wr = ShardWriter(out, 1)
    wr.add(row(0))
    real_fsync = os.fsync
    calls = {"n": 0}

    def full(fd):
        calls["n"] += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(w.os, "fsync", full)
    with pytest.raises(CommitError, match="No space left on device.*1 shards committed before stay valid"):
        wr.add(row(1))
    monkeypatch.setattr(w.os, "fsync", real_fsync)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert read_results(out, verify=True)["input_index"].to_pylist() == [0]


def test_writer_lost_folder(tmp_path):
    import shutil

    out = str(tmp_path / "job")
    wr = ShardWriter(out, 1)
    shutil.rmtree(out)
    with pytest.raises(CommitError, match="No such file or directory"):
        wr.add(row(0))


def test_writer_unwritable_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(BatchLLMError, match="cannot write to output folder"):
        ShardWriter(str(f / "sub"), 1)


def test_commit_phases_reach_the_callback_in_order(tmp_path):
    phases = []
    wr = ShardWriter(str(tmp_path / "job"), 1, on_commit_phase=phases.append)
    wr.add(row(0))
    assert phases == ["shard-written", "manifest-written", "shard-renamed"]
    assert (tmp_path / "job" / "shard-00000.parquet").exists()


# ------------------------------------------------------------------------------------------ manifest


class _Tok:
    chat_template = "{{ messages }}"

    def get_vocab(self):
        return {"a": 0, "b": 1}


def _fp(tmp_path, **over):
    inp = tmp_path / "in.jsonl"
    if not inp.exists():
        inp.write_text('{"prompt": "x"}\n')
    args = dict(weights="w1", model_name="dummy:tiny", tokenizer=_Tok(), sampling={"temperature": 1.0, "max_tokens": 8},
                seed=0, columns={"id_column": None}, max_model_len=None, dtype="float32", inputs=[str(inp)])
    args.update(over)
    return build_fingerprint(**args)


def test_fingerprint_names_what_changed(tmp_path):
    a = _fp(tmp_path)
    assert fingerprint_changes(a, _fp(tmp_path)) == []
    b = _fp(tmp_path, seed=1, sampling={"temperature": 0.5, "max_tokens": 8}, weights="w2", model_name="other")
    changes = fingerprint_changes(a, b)
    assert "seed (0 -> 1)" in changes
    assert "sampling defaults (temperature 1.0 -> 0.5)" in changes
    assert "model weights (dummy:tiny -> other)" in changes
    with pytest.raises(BatchLLMError, match="seed \\(0 -> 1\\).*--overwrite"):
        check_same_job({"fingerprint": a}, b, "out")
    (tmp_path / "in.jsonl").write_text('{"prompt": "y"}\n')
    assert fingerprint_changes(a, _fp(tmp_path)) == ["input files (content of input 1 differs)"]


def test_input_identity_large_file(tmp_path):
    p = tmp_path / "big.jsonl"
    p.write_bytes(b"a" * (3 << 20))
    before = input_identity(str(p))
    with open(p, "r+b") as f:
        f.seek((3 << 20) - 10)
        f.write(b"b")
    assert input_identity(str(p)) != before


def test_read_manifest_errors(tmp_path):
    assert read_manifest(str(tmp_path)) is None
    (tmp_path / ".manifest.json").write_text("{nope")
    with pytest.raises(BatchLLMError, match="--overwrite"):
        read_manifest(str(tmp_path))


# -------------------------------------------------------------------------------------------- status


def test_status_file_shape_and_eta(tmp_path):
    st_ = StatusFile(str(tmp_path), "abc", 1000.0, ["in.jsonl"], "dummy:tiny", interval=3600)
    st_.set_counts(total=10, completed=2, failed=1)
    st_.generation_started(done_before=3)
    st_.update(stage="generating")  # throttled: the first write is due immediately
    s = read_status(str(tmp_path))
    assert s["object"] == "batch" and s["id"] == "batch_abc" and s["status"] == "in_progress"
    assert s["request_counts"] == {"total": 10, "completed": 2, "failed": 1} and s["created_at"] == 1000
    st_.set_counts(completed=5)
    st_._gen_start -= 10  # pretend 10 s went by
    st_.update(tokens={"completion": 100})
    assert read_status(str(tmp_path))["request_counts"]["completed"] == 2  # throttled
    st_.update(force=True)
    b = read_status(str(tmp_path))["batchllm"]
    assert b["eta_seconds"] == pytest.approx(4 / 0.3, rel=0.05) and b["throughput"]["output_tok_s"] == pytest.approx(10, rel=0.05)
    st_.set_counts(completed=9)
    st_.finish("completed")
    s = read_status(str(tmp_path))
    assert s["status"] == "completed" and s["completed_at"] and s["batchllm"]["eta_seconds"] == 0
    st_.finish("failed", "disk full")
    s = read_status(str(tmp_path))
    assert s["failed_at"] and s["errors"]["data"][0]["message"] == "disk full"


def test_status_write_failure_is_not_fatal(tmp_path):
    st_ = StatusFile(str(tmp_path / "missing"), "abc", 0.0, [], "m")
    st_.update(force=True)  # folder does not exist: ignored
    assert read_status(str(tmp_path / "missing")) is None


# ------------------------------------------------------------------------------------------- signals


def test_stop_on_signals_sets_flag_and_restores():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as flag:
        assert not flag
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag and flag.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
    e = JobInterrupted(signal.SIGTERM, "out", 12)
    assert e.exit_code == 143 and str(e).endswith("resume with: batchllm resume out")


def test_recorder_forwards_live_tokens_to_status_and_show(tmp_path):
    from batchllm.jobs.recorder import ResultRecorder
    from batchllm.jobs.show import job_state

    out = str(tmp_path / "job")
    wr = ShardWriter(out, 100)
    st_ = StatusFile(out, wr.manifest["job_id"], 0.0, ["in.jsonl"], "dummy:tiny", interval=0)
    rec = ResultRecorder(wr, st_)
    st_.set_counts(total=2)
    st_.generation_started(0)
    rec.engine_step(8, 20, 0.25)  # both requests running, none finished
    rec.update_status()
    b = read_status(out)["batchllm"]
    assert (b["generated_tokens"], b["prompt_tokens_computed"], b["progress"]) == (8, 20, 0.25)
    assert b["tokens"]["completion"] == 0 and b["eta_seconds"] is not None
    state = job_state(out)
    assert state["tokens_so_far"] == {"prompt": 0, "completion": 8, "prompt_computed": 20}
    wr.close()
