"""The output folder reads as a dataset (issue 15): ``pyarrow.parquet.read_table(DIR)``,
``pandas.read_parquet(DIR)`` and ``datasets.load_dataset("parquet", data_dir=DIR)`` return exactly the
committed rows. The job's own files have names those readers skip (``.manifest.json``, ``.status.json``,
hidden temporaries, pending shards, lock and mark); a shard becomes visible only after the manifest lists
it, so a kill never leaves a visible orphan; folders of earlier versions (``manifest.json``,
``status.json``, visible orphans) are still read, resume, and move to the new names."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from batchllm.config import JobConfig
from batchllm.io import storage as st
from batchllm.io.writer import (
    MARKER,
    ShardWriter,
    discard_shard,
    encode_shard,
    pending_name,
    read_results,
    write_shard_file,
)
from batchllm.jobs.export import export_job
from batchllm.jobs.integrity import pending_shards, unlisted_shards, verify_job
from batchllm.jobs.manifest import read_manifest
from batchllm.jobs.show import job_state
from batchllm.jobs.status import read_status
from batchllm.pipeline import run_job

try:
    from pandas import NA as _NA
except ImportError:
    _NA = object()

BASE = dict(model="dummy:tiny", device="cpu", dtype="float32", max_tokens=5, temperature=0.9, preview=0)


def write_jsonl(path, k: int = 10) -> str:
    with open(path, "w") as f:
        for i in range(k):
            row = {"custom_id": f"q{i}", "prompt_token_ids": [1, 100 + i % 3, 200 + i, 300]}
            if i % 4 == 0:
                row["n"] = 2
            f.write(json.dumps(row) + "\n")
        f.write("{bad\n")  # an error record too
    return str(path)


def run(tiny, inp, out, **kw):
    return run_job(JobConfig(inputs=[inp], output=str(out), **{**BASE, **kw}), loaded=tiny)


def _scalar(v):
    """A cell as pyarrow gives it: pandas' NaN / NA for a missing value is None, 0.0 for an int is 0."""
    if v is None or v is _NA or (isinstance(v, float) and v != v):
        return None
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v.item() if hasattr(v, "item") else v


def keyed(rows) -> list[tuple]:
    out = []
    for r in rows:
        idx, sample, cid, text, code = (_scalar(r[k]) for k in ("input_index", "sample_index", "custom_id", "text", "error_code"))
        out.append((idx, -1 if sample is None else sample, cid, text, code))
    return sorted(out, key=repr)


def committed(out) -> list[tuple]:
    return keyed(read_results(str(out), verify=True).to_pylist())


def row(i: int) -> dict:
    return {"custom_id": f"r{i}", "input_file": "in.jsonl", "input_index": i, "sample_index": 0, "text": f"t{i}"}


@pytest.fixture
def finished(tiny, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl")
    out = tmp_path / "out"
    run(tiny, inp, out, shard_rows=4)
    return inp, out


def test_pyarrow_pandas_and_datasets_read_exactly_the_committed_rows(finished, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    pd = pytest.importorskip("pandas")
    datasets = pytest.importorskip("datasets")
    _, out = finished
    want = committed(out)
    assert len(want) == 14  # 10 requests, 3 of them n=2, and an error record
    names = os.listdir(out)
    assert {".manifest.json", ".status.json", MARKER} <= set(names)
    assert all(n.startswith(("_", ".")) or n.startswith("shard-") for n in names), names
    assert keyed(pq.read_table(str(out)).to_pylist()) == want
    assert keyed(pd.read_parquet(str(out)).to_dict("records")) == want
    ds = datasets.load_dataset("parquet", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert keyed(ds.to_list()) == want


def test_a_pending_shard_is_invisible_until_listed_and_an_unlisted_one_is_deleted(tmp_path):
    out = str(tmp_path / "job")
    wr = ShardWriter(out, 2)
    for i in range(4):
        wr.add(row(i))
    # a shard written by another process (a Ray replica): durable but hidden until the writer lists it
    name = wr.reserve_shard_name()
    data, entry = encode_shard([row(10), row(11)], wr.file_id)
    write_shard_file(out, name, data)
    assert os.path.exists(os.path.join(out, pending_name(name))) and not os.path.exists(os.path.join(out, name))
    assert pq.read_table(out).num_rows == 4
    entry["file"] = name
    wr.commit_entries([entry])
    assert os.path.exists(os.path.join(out, name)) and not os.path.exists(os.path.join(out, pending_name(name)))
    assert pq.read_table(out).num_rows == 6
    # a failed unit's shard is discarded before it is ever visible
    other = wr.reserve_shard_name()
    write_shard_file(out, other, encode_shard([row(20)], wr.file_id)[0])
    discard_shard(out, other)
    wr.close()
    assert not [n for n in os.listdir(out) if n.endswith((".pending", ".tmp"))]
    # what a kill before the manifest write leaves: an unlisted pending shard, invisible to readers
    (tmp_path / "job" / ".shard-00009.parquet.pending").write_bytes(b"partial")
    assert pq.read_table(out).num_rows == 6 and unlisted_shards(out, read_manifest(out)) == []
    ShardWriter(out, 2, manifest=read_manifest(out)).close()  # the next writer deletes it
    assert not (tmp_path / "job" / ".shard-00009.parquet.pending").exists()
    assert keyed(pq.read_table(out).to_pylist()) == committed(out)


def test_a_listed_shard_whose_rename_a_kill_cut_off_is_committed_and_renamed_by_the_next_writer(tmp_path):
    out = tmp_path / "job"
    wr = ShardWriter(str(out), 2)
    for i in range(6):
        wr.add(row(i))
    wr.close()
    last = read_manifest(str(out))["shards"][-1]["file"]
    os.rename(out / last, out / pending_name(last))  # killed between the manifest write and the rename
    assert [r["input_index"] for r in read_results(str(out), verify=True).to_pylist()] == list(range(6))
    verify_job(str(out), full=True)
    verify_job(str(out), full=False)
    assert pending_shards(str(out), read_manifest(str(out))) == [last]
    state = job_state(str(out))
    assert state["pending"] == [last] and not state["damaged"]
    assert pq.read_table(str(out)).num_rows == 4  # the one documented gap, until the next writer
    assert export_job(str(out), "jsonl", str(tmp_path / "all.jsonl")).rows == 6  # export reads it too
    wr = ShardWriter(str(out), 2, manifest=read_manifest(str(out)))
    assert (out / last).exists() and not (out / pending_name(last)).exists()
    wr.add(row(6))
    wr.close()
    assert sorted(pq.read_table(str(out))["input_index"].to_pylist()) == list(range(7))


def test_object_store_settles_a_half_done_promote_from_the_pending_object(monkeypatch):
    fs = pafs._MockFileSystem()
    st.register_filesystem("memds", lambda uri: (fs, uri.split("://", 1)[1]))
    monkeypatch.setattr(st, "LEASE_SETTLE_S", 0.01)
    try:
        uri = "memds://bucket/job"
        wr = ShardWriter(uri, 2)
        for i in range(4):
            wr.add(row(i))
        wr.close()
        s = st.open_storage(uri)
        last = read_manifest(uri)["shards"][-1]["file"]
        good = s.read_bytes(last)
        # killed inside the promote's copy (not atomic on a mock): a partial visible object and the pending one
        s.write_direct(pending_name(last), good)
        s.replace(last, good[:10])
        assert read_results(uri, verify=True).num_rows == 4  # batchllm reads the pending object
        ShardWriter(uri, 2, manifest=read_manifest(uri)).close()
        assert s.read_bytes(last) == good and not s.exists(pending_name(last))
        assert sorted(n for n in s.names() if not n.startswith(".")) == sorted(e["file"] for e in read_manifest(uri)["shards"])
    finally:
        st.register_filesystem("memds", None)


def test_folder_of_an_earlier_version_is_read_resumed_and_moved_to_the_new_names(tiny, tmp_path):
    pd = pytest.importorskip("pandas")
    inp = write_jsonl(tmp_path / "in.jsonl")
    ref = tmp_path / "ref"
    run(tiny, inp, ref, shard_rows=4)
    want = committed(ref)
    # the folder as an earlier version left it after a kill: manifest.json and status.json, no mark,
    # the last shard renamed but never listed (a visible orphan)
    out = tmp_path / "old"
    run(tiny, inp, out, shard_rows=4)
    m = read_manifest(str(out))
    orphan = m["shards"].pop()["file"]
    (out / "manifest.json").write_text(json.dumps(m))
    os.rename(out / ".status.json", out / "status.json")
    os.remove(out / ".manifest.json")
    os.remove(out / MARKER)
    assert read_manifest(str(out))["job_id"] == m["job_id"] and read_status(str(out))["status"] == "completed"
    state = job_state(str(out))
    assert state["unlisted"] == [orphan] and state["committed"]["shards"] == len(m["shards"])
    s = run(tiny, inp, out, shard_rows=4)  # resumes: same job, only the forgotten shard's rows are redone
    assert s.done_before > 0 and 0 < s.samples
    names = set(os.listdir(out))
    assert "manifest.json" not in names and "status.json" not in names and {".manifest.json", ".status.json", MARKER} <= names
    assert committed(out) == want
    assert keyed(pd.read_parquet(str(out)).to_dict("records")) == want
    assert read_manifest(str(out))["job_id"] == m["job_id"] and len(read_manifest(str(out))["runs"]) == 2
