"""The output folder is the user's data (issue 13, output-folder half): batchllm deletes or replaces only
files it wrote, refuses inputs inside the output folder and export targets inside a job folder, checks
every committed shard on read (size by default, sha256 on export and with --verify) and repairs a damaged
job by rerunning exactly the lost rows; a full disk at the read phase's manifest write is one line."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console
from tests.job_utils import SigintAt, run_main

from batchllm.config import JobConfig
from batchllm.errors import BatchLLMError
from batchllm.io import storage
from batchllm.io.writer import MARKER, CommitError, DamagedJob, ShardWriter, read_results
from batchllm.jobs.export import export_job
from batchllm.jobs.integrity import repair_job, verify_job
from batchllm.jobs.manifest import read_manifest
from batchllm.jobs.show import job_state, show_job
from batchllm.jobs.signals import JobInterrupted
from batchllm.pipeline import run_job

BASE = dict(model="dummy:tiny", device="cpu", dtype="float32", max_tokens=5, temperature=0.9, preview=0)


def write_jsonl(path, k: int = 12, bad: bool = True) -> str:
    with open(path, "w") as f:
        for i in range(k):
            row = {"custom_id": f"q{i}", "prompt_token_ids": [1, 100 + i % 5, 200 + i, 300]}
            if i % 4 == 0:
                row["n"] = 2
            f.write(json.dumps(row) + "\n")
        if bad:
            f.write("{bad\n")  # an error record too
    return str(path)


def run(tiny, inputs, out, overwrite=False, **kw):
    cfg = JobConfig(inputs=[str(p) for p in inputs], output=str(out), **{**BASE, **kw})
    return run_job(cfg, loaded=tiny, overwrite=overwrite)


def flip_bit(path, at: int) -> bytes:
    """Flip one bit of the file at byte ``at`` (its size unchanged); returns the damaged bytes."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
    return bytes(data)


def rows_by_key(out) -> dict:
    rows = read_results(str(out), verify=True).to_pylist()
    keys = [(r["input_index"], r["sample_index"]) for r in rows]
    assert len(keys) == len(set(keys)), "a row appears twice"
    return {(r["input_index"], r["sample_index"]): (r["custom_id"], r["text"], r["error_code"]) for r in rows}


def snapshot(folder) -> dict:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in sorted(os.listdir(folder))
            if (folder / n).is_file()}


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("safety")
    inp = write_jsonl(d / "in.jsonl")
    run(tiny, [inp], d / "ref", shard_rows=4)
    return inp, rows_by_key(d / "ref")


def finished_job(tiny, reference, tmp_path):
    inp, ref = reference
    out = tmp_path / "job"
    run(tiny, [inp], out, shard_rows=4)
    assert rows_by_key(out) == ref
    return inp, out


# --------------------------------------------------------------- 1. inputs inside the output folder


def test_input_named_like_a_shard_inside_the_output_folder_is_refused_not_deleted(tiny, tmp_path):
    data = tmp_path / "o" / "data"
    data.mkdir(parents=True)
    inp = data / "shard-00000.parquet"
    pq.write_table(pa.table({"custom_id": ["a", "b"], "prompt": ["hello", "world"]}), inp)
    before = inp.read_bytes()
    with pytest.raises(BatchLLMError, match="inside the output folder"):
        run(tiny, [inp], data)
    assert inp.read_bytes() == before and not (data / ".manifest.json").exists()


def test_input_inside_a_job_folder_is_refused_even_with_overwrite(tiny, reference, tmp_path):
    _, out = finished_job(tiny, reference, tmp_path)
    inp = out / "shard-00099.parquet"  # named like a shard of the job: an orphan to the writer
    pq.write_table(pa.table({"prompt": ["hello"]}), inp)
    before = snapshot(out)
    with pytest.raises(BatchLLMError, match="inside the output folder"):  # refused before the folder is opened
        run(tiny, [inp], out)
    with pytest.raises(BatchLLMError, match="inside the output folder"):
        run(tiny, [inp], out, overwrite=True)
    after = snapshot(out)
    assert after == before  # the input and the previous job, untouched


def test_output_folder_inside_an_input_folder_is_refused(tmp_path):
    (tmp_path / "ds").mkdir()
    with pytest.raises(BatchLLMError, match="inside the input folder"):
        ShardWriter(str(tmp_path / "ds" / "out"), 4, input_files=[str(tmp_path / "ds")])
    assert not (tmp_path / "ds" / "out" / ".manifest.json").exists()


# ----------------------------------------------------- 2. a new job never touches the user's files


def test_new_job_never_deletes_or_overwrites_users_files_named_like_shards(tiny, reference, tmp_path):
    inp, _ = reference
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("shard-00000.parquet", "shard-00003.parquet", "notes.txt"):
        (out / name).write_bytes(b"the user's own " + name.encode())
    before = snapshot(out)
    for overwrite in (False, True):
        with pytest.raises(BatchLLMError, match="not a batchllm job folder.*shard-00000.parquet, shard-00003.parquet"):
            run(tiny, [inp], out, overwrite=overwrite)
    assert {n: h for n, h in snapshot(out).items() if n != ".batchllm.lock"} == before
    with pytest.raises(BatchLLMError, match="not a batchllm job folder"):  # direct library use too
        ShardWriter(str(out), 4)
    assert {n: h for n, h in snapshot(out).items() if n != ".batchllm.lock"} == before


def test_users_own_manifest_json_is_never_replaced_even_with_overwrite(tiny, reference, tmp_path):
    inp, _ = reference
    out = tmp_path / "mine"
    out.mkdir()
    (out / "manifest.json").write_text('{"my": "manifest"}')
    with pytest.raises(BatchLLMError, match="not a batchllm manifest"):
        run(tiny, [inp], out)
    with pytest.raises(BatchLLMError, match="not a batchllm job folder"):
        run(tiny, [inp], out, overwrite=True)
    assert (out / "manifest.json").read_text() == '{"my": "manifest"}'


def test_job_folder_is_marked_before_anything_is_written_and_other_files_are_kept(tiny, reference, tmp_path):
    inp, ref = reference
    out = tmp_path / "job"
    out.mkdir()
    (out / "README.txt").write_text("mine")
    run(tiny, [inp], out, shard_rows=4)
    assert (out / MARKER).exists() and (out / "README.txt").read_text() == "mine"
    run(tiny, [inp], out, shard_rows=4, seed=9, overwrite=True)  # overwrite: batchllm's files only
    assert (out / "README.txt").read_text() == "mine"
    assert {n for n in os.listdir(out) if n.startswith("shard-")} == {s["file"] for s in read_manifest(str(out))["shards"]}


def test_folder_of_an_older_batchllm_without_the_mark_still_resumes(tiny, reference, tmp_path):
    inp, out = finished_job(tiny, reference, tmp_path)
    os.remove(out / MARKER)
    s = run(tiny, [inp], out, shard_rows=4)
    assert s.samples == 0 and s.done_before > 0 and (out / MARKER).exists()


# ------------------------------------------------------------- 3. export never writes into a job folder


def test_export_target_inside_a_job_folder_is_refused_and_the_job_stays_intact(tiny, reference, tmp_path):
    inp, out = finished_job(tiny, reference, tmp_path)
    other = tmp_path / "other"
    run(tiny, [inp], other, shard_rows=4)
    before, before_other = snapshot(out), snapshot(other)
    for to, fmt in ((out / "shard-00001.parquet", "parquet"), (out / ".manifest.json", "jsonl"),
                    (out / "new.jsonl", "jsonl"), (out, "parquet"), (other / "shard-00000.parquet", "parquet")):
        with pytest.raises(BatchLLMError, match="inside the batchllm job folder"):
            export_job(str(out), fmt, str(to))
    with pytest.raises(BatchLLMError, match="inside the batchllm job folder"):  # the OpenAI error file too
        export_job(str(out), "openai", str(tmp_path / "ok.jsonl"), errors_to=str(out / "shard-00000.parquet"))
    assert snapshot(out) == before and snapshot(other) == before_other
    res = export_job(str(out), "parquet", str(tmp_path / "all.parquet"))
    assert res.rows == len(reference[1])


# -------------------------------------------------------------- 4. integrity on read, and the repair


def test_deleted_listed_shard_is_reported_by_run_resume_show_and_export(tiny, reference, tmp_path):
    inp, out = finished_job(tiny, reference, tmp_path)
    os.remove(out / "shard-00001.parquet")
    with pytest.raises(DamagedJob, match=r"1 of \d+ committed shards are not as the manifest records "
                                         r"\(shard-00001.parquet: missing\).*batchllm resume .* --repair"):
        run(tiny, [inp], out, shard_rows=4)  # run (and resume, the same open path) refuse
    state = job_state(str(out))
    assert state["status"] == "damaged" and [d.file for d in state["damaged"]] == ["shard-00001.parquet"]
    with pytest.raises(DamagedJob, match="shard-00001.parquet: missing"):
        export_job(str(out), "jsonl", str(tmp_path / "x.jsonl"))
    assert not (tmp_path / "x.jsonl").exists()


def test_bit_flip_in_a_committed_shard_fails_export_and_verify(tiny, reference, tmp_path):
    inp, out = finished_job(tiny, reference, tmp_path)
    p = out / "shard-00002.parquet"
    flip_bit(p, len(p.read_bytes()) // 3)  # same size: the fast check cannot see it, the sha256 can
    verify_job(str(out), full=False)
    assert job_state(str(out))["status"] == "completed"
    with pytest.raises(DamagedJob, match="shard-00002.parquet: sha256 differs"):
        verify_job(str(out), full=True)
    assert job_state(str(out), verify=True)["status"] == "damaged"
    with pytest.raises(DamagedJob, match="shard-00002.parquet: sha256 differs.*--repair"):
        export_job(str(out), "parquet", str(tmp_path / "x.parquet"))
    assert not (tmp_path / "x.parquet").exists()


def test_truncated_shard_fails_the_fast_size_check(tiny, reference, tmp_path):
    inp, out = finished_job(tiny, reference, tmp_path)
    p = out / "shard-00000.parquet"
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(DamagedJob, match=r"shard-00000.parquet: [\d,]+ bytes, the manifest records"):
        run(tiny, [inp], out, shard_rows=4)


def test_bit_flip_passes_the_fast_check_and_fails_run_verify(tiny, reference, tmp_path, capsys):
    inp, out = finished_job(tiny, reference, tmp_path)
    p = out / read_manifest(str(out))["shards"][0]["file"]
    damaged = flip_bit(p, 40)  # same size: only the sha256 sees it
    args = ["run", inp, "-o", str(out), "--model", "dummy:tiny", "--device", "cpu", "--dtype", "float32", "-q",
            "--shard-rows", "4"]
    code, err = run_main([*args, "--verify"], capsys)
    assert code == 1
    assert "sha256 differs" in err and f"batchllm resume {out} --repair" in err and "Traceback" not in err
    assert p.read_bytes() == damaged  # reported, not touched


def test_repair_drops_damaged_shards_and_the_resume_reruns_exactly_their_rows(tiny, reference, tmp_path):
    inp, ref = reference
    inp, out = finished_job(tiny, reference, tmp_path)
    shards = read_manifest(str(out))["shards"]
    os.remove(out / shards[0]["file"])  # holds the error record of the bad line too: redone exactly
    p = out / shards[-1]["file"]
    flip_bit(p, 40)
    lost = shards[0]["rows"] + shards[-1]["rows"]
    dropped = repair_job(str(out))
    assert sorted(d.file for d in dropped) == sorted([shards[0]["file"], shards[-1]["file"]])
    m = read_manifest(str(out))
    assert len(m["shards"]) == len(shards) - 2 and m["read_complete"] is False and m["repairs"][0]["rows"] == lost
    assert not p.exists()
    s = run(tiny, [inp], out, shard_rows=4)
    assert rows_by_key(out) == ref  # every row exactly once, token for token the uninterrupted run's
    ok = sum(1 for v in ref.values() if v[2] is None)
    assert s.done_before > 0 and 0 < s.samples < ok  # only the dropped shards' rows ran again
    assert repair_job(str(out)) == []  # nothing left to repair


def test_damaged_job_cli_is_one_error_line_and_resume_repair_fixes_it(tiny, reference, tmp_path):
    inp, out = finished_job(tiny, reference, tmp_path)

    def cli(*a):
        return subprocess.run([sys.executable, "-m", "batchllm", *a], capture_output=True, text=True, timeout=300)

    os.remove(out / "shard-00001.parquet")
    for cmd in (("show", str(out)), ("resume", str(out), "-q")):  # run opens the folder as resume does
        r = cli(*cmd)
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in r.stderr, (cmd, r.stderr)
        assert "shard-00001.parquet: missing" in errors[0] and f"batchllm resume {out} --repair" in errors[0]
    r = cli("resume", str(out), "--repair", "-q")
    assert r.returncode == 0 and "dropped 1 damaged shards" in r.stderr, r.stderr
    assert rows_by_key(out) == reference[1]
    r = cli("show", str(out), "--verify")
    assert r.returncode == 0 and "sha256 checked" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------ 7. disk full at the read phase's manifest write


def test_disk_full_at_the_read_complete_manifest_write_is_a_commit_error_not_a_traceback(tiny, reference, tmp_path, monkeypatch):
    inp = write_jsonl(tmp_path / "good.jsonl", 6, bad=False)  # no error record: nothing committed while reading
    out = tmp_path / "job"
    writes = {"n": 0}

    def full_open(path, *a, **k):  # the job's second manifest write (read_complete) finds the disk full
        if os.fspath(path).endswith("..manifest.json.tmp"):
            writes["n"] += 1
            if writes["n"] == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return open(path, *a, **k)

    real_open_local = storage.open_local
    monkeypatch.setattr(storage, "open_local", full_open)
    with pytest.raises(CommitError, match="cannot write the manifest in .*No space left on device.*resume with"):
        run(tiny, [inp], out, shard_rows=100)
    monkeypatch.setattr(storage, "open_local", real_open_local)
    s = run(tiny, [inp], out, shard_rows=100)
    assert s.samples == 8 and len(rows_by_key(out)) == 8


def test_write_manifest_failure_raises_commit_error(tmp_path, monkeypatch):
    wr = ShardWriter(str(tmp_path / "job"), 4)

    def full(name, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(wr.storage, "replace", full)
    with pytest.raises(CommitError, match="No space left on device"):
        wr.write_manifest(read_complete=True)


# ------------------------------------------ 11. an unlisted shard left by a kill before the manifest


def test_unlisted_shard_left_by_a_kill_is_reported_by_show_and_removed_by_resume(tiny, reference, tmp_path):
    inp, ref = reference
    out = tmp_path / "job"
    with pytest.raises(JobInterrupted):
        run_job(JobConfig(inputs=[inp], output=str(out), shard_rows=4, **BASE), progress=SigintAt("step", 2), loaded=tiny)
    listed = read_manifest(str(out))["shards"]
    # what a SIGKILL between a shard's rename and the manifest write leaves: a complete, unlisted shard
    orphan = f"shard-{len(listed) + 5:05d}.parquet"
    shutil.copy(out / listed[0]["file"], out / orphan)
    state = job_state(str(out))
    assert state["unlisted"] == [orphan] and state["status"] != "damaged"
    console = Console(record=True, width=200)
    show_job(str(out), console)
    text = console.export_text()
    assert "unlisted shards" in text and orphan in text
    assert len(read_results(str(out)).to_pylist()) == sum(s["rows"] for s in listed)  # never read
    run(tiny, [inp], out, shard_rows=4)
    assert not (out / orphan).exists() and rows_by_key(out) == ref
    assert job_state(str(out))["unlisted"] == []
