"""The CLI under signals: SIGKILL at many points (inside shard commits too) then resume gives every
request exactly once with the uninterrupted run's texts; SIGTERM stops cleanly with the resume hint;
show and export on the result; job-level failures exit non-zero with one line."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchllm.io.writer import read_results, read_shard_bytes

JOB = ["--model", "dummy:tiny", "--device", "cpu", "--dtype", "float32", "--max-tokens", "10", "--temperature", "0.9",
       "--seed", "3", "-q"]


def cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "batchllm", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spawn(args, marker, seconds):
    """``batchllm ARGS`` in a subprocess whose shard commits record each phase in ``marker`` and pause
    ``seconds`` there, so a kill can land inside a phase."""
    return subprocess.Popen([sys.executable, "-m", "tests.commit_phase_runner", marker, str(seconds), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)


@pytest.fixture(scope="module")
def job_input(tmp_path_factory):
    d = tmp_path_factory.mktemp("kill")
    p = d / "in.jsonl"
    with open(p, "w") as f:
        for i in range(60):
            row = {"custom_id": f"c{i}", "prompt_token_ids": [1, 50 + i % 4, 60 + i % 4, 900 + i]}
            if i % 9 == 0:
                row["n"] = 2
            f.write(json.dumps(row) + "\n")
            if i == 17:
                f.write("{broken\n")
    return str(p)


@pytest.fixture(scope="module")
def reference(job_input, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    r = cli("run", job_input, "-o", str(out), *JOB, "--shard-rows", "1000")
    assert r.returncode == 0, r.stderr
    return rows_by_key(read_results(str(out)).to_pylist())


def rows_by_key(rows):
    keys = [(r["input_index"], r["sample_index"]) for r in rows]
    assert len(keys) == len(set(keys)), "a request appears twice"
    return {(r["input_index"], r["sample_index"]): (r["custom_id"], r["text"], r["error_code"]) for r in rows}


def check_committed(out: str) -> int:
    """The manifest is readable, every listed shard matches its checksum, no row appears twice, and a
    dataset reader of the folder sees listed shards only (all of them but one whose rename the kill cut
    off: it is committed under its pending name)."""
    if not os.path.exists(os.path.join(out, ".manifest.json")):
        return 0
    m = json.load(open(os.path.join(out, ".manifest.json")))
    visible_rows, pending = 0, 0
    for s in m["shards"]:
        data = read_shard_bytes(out, s["file"])
        assert hashlib.sha256(data).hexdigest() == s["sha256"]
        assert pq.read_table(pa.BufferReader(data)).num_rows == s["rows"]
        if os.path.exists(os.path.join(out, s["file"])):
            visible_rows += s["rows"]
        else:
            pending += 1
    assert pending <= 1
    visible = [n for n in os.listdir(out) if not n.startswith((".", "_"))]
    assert set(visible) <= {s["file"] for s in m["shards"]}  # never an orphan where dataset readers look
    if visible:
        assert pq.read_table(out).num_rows == visible_rows
    return len(rows_by_key(read_results(out).to_pylist()))


def test_sigkill_at_random_points_then_resume(job_input, reference, tmp_path):
    out = str(tmp_path / "out")
    marker = str(tmp_path / "phases")
    rng = random.Random(1234)
    # (kind, arg): "phase" kills while the process sleeps inside that commit phase (its k-th commit);
    # "delay" kills after a random delay, wherever the process happens to be (startup, loading,
    # reading, generating or committing).
    points = [("delay", 0.3), ("phase", ("shard-written", 1)), ("phase", ("shard-renamed", 1)),
              ("phase", ("manifest-written", 1)), ("phase", ("shard-written", 2)), ("delay", None),
              ("phase", ("shard-renamed", 2)), ("delay", None), ("phase", ("manifest-written", 3)),
              ("delay", None), ("phase", ("shard-written", 1)), ("delay", None), ("phase", ("shard-renamed", 1))]
    committed = []
    for kind, arg in points:
        if os.path.exists(marker):
            os.remove(marker)
        resume = committed and rng.random() < 0.5  # alternate `batchllm resume` and rerunning `run`
        args = ["resume", out, "-q"] if resume else ["run", job_input, "-o", out, *JOB, "--shard-rows", "3"]
        p = spawn(args, marker, 0.3)
        if kind == "delay":
            time.sleep(arg if arg is not None else rng.uniform(1.0, 7.0))
        else:
            phase, k = arg
            deadline = time.time() + 60
            while time.time() < deadline and p.poll() is None:
                seen = open(marker).read().split() if os.path.exists(marker) else []
                if seen.count(phase) >= k:
                    break
                time.sleep(0.02)
        if p.poll() is not None:  # finished before the kill point: start over is not needed, the job is done
            committed.append(check_committed(out))
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        committed.append(check_committed(out))
    print("rows committed after each kill:", committed)
    assert len(committed) >= 10 and committed[-1] < len(reference)  # the kills really interrupted the job
    assert committed == sorted(committed)  # committed work is never lost
    r = cli("resume", out, "-q")
    assert r.returncode == 0, r.stderr
    final = rows_by_key(read_results(out).to_pylist())
    assert final == reference
    assert not [n for n in os.listdir(out) if n.endswith((".tmp", ".pending"))]
    assert pq.read_table(out).num_rows == len(reference)  # the folder reads as the dataset of results
    st = json.load(open(os.path.join(out, ".status.json")))
    assert st["status"] == "completed" and st["request_counts"]["total"] == 61


def test_sigterm_commits_and_prints_resume_hint(job_input, reference, tmp_path):
    out = str(tmp_path / "out")
    marker = str(tmp_path / "phases")
    p = spawn(["run", job_input, "-o", out, *JOB, "--shard-rows", "4"], marker, 0.2)
    deadline = time.time() + 60
    while time.time() < deadline and not (os.path.exists(marker) and open(marker).read().count("manifest-written") >= 2):
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM
    assert f"resume with: batchllm resume {out}" in err and "Traceback" not in err
    st = json.load(open(os.path.join(out, ".status.json")))
    assert st["status"] == "cancelled" and st["cancelled_at"]
    partial = check_committed(out)
    assert 0 < partial < len(reference)
    r = cli("show", out)
    assert r.returncode == 0 and "cancelled" in r.stdout and "malformed_json" in r.stdout
    r = cli("resume", out, "-q")
    assert r.returncode == 0, r.stderr
    assert rows_by_key(read_results(out).to_pylist()) == reference
    r = cli("export", out, "--format", "openai", "--ordered", "--to", str(tmp_path / "res.jsonl"))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in open(tmp_path / "res.jsonl")]
    assert [x["custom_id"] for x in lines] == [f"c{i}" for i in range(60)]
    assert lines[0]["response"]["body"]["object"] == "text_completion" and len(lines[0]["response"]["body"]["choices"]) == 2
    errs = [json.loads(x) for x in open(tmp_path / "res.errors.jsonl")]
    assert len(errs) == 1 and errs[0]["error"]["code"] == "malformed_json"


def test_job_level_failures_exit_nonzero_with_one_line(job_input, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = cli("run", job_input, "-o", str(blocker / "out"), *JOB)
    assert r.returncode == 1 and "output folder" in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1
    out = str(tmp_path / "out")
    assert cli("run", job_input, "-o", out, *JOB).returncode == 0
    r = cli("run", job_input, "-o", out, *[a if a != "3" else "4" for a in JOB])  # --seed 4
    assert r.returncode == 1 and "seed (3 -> 4)" in r.stderr and "--overwrite" in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1
    r = cli("resume", str(tmp_path / "nothing"))
    assert r.returncode == 1 and "no batchllm job" in r.stderr
