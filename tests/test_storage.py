"""Job folders on pyarrow filesystem URIs (batchllm.io.storage): the storage primitives, the lease that
locks an object-store folder, and whole jobs (run, interrupt, resume, fingerprint refusal, show, export)
on an in-memory object store (a registered ``memtest://`` scheme over pyarrow's mock filesystem, which
has object-store semantics: write-once objects, no rename) and on ``file://`` URIs."""

from __future__ import annotations

import json
import os
import time

import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from batchllm.config import JobConfig
from batchllm.errors import BatchLLMError
from batchllm.io import storage as st
from batchllm.io.writer import ShardWriter, read_results
from batchllm.jobs.export import export_job
from batchllm.jobs.manifest import read_manifest
from batchllm.jobs.show import is_running, job_state
from batchllm.jobs.signals import JobInterrupted
from batchllm.jobs.status import read_status
from batchllm.pipeline import run_job
from tests.job_utils import SigintAt

BASE = {"model": "dummy:tiny", "device": "cpu", "dtype": "float32", "max_tokens": 5, "temperature": 0.8, "preview": 0}


@pytest.fixture
def uri_outputs(monkeypatch):
    """Keep URI outputs as they are in ``JobConfig.with_absolute_paths`` (which makes paths absolute).
    A no-op once config.py leaves URIs alone (requested from the lead); until then it patches it."""
    if JobConfig(output="memtest://b/x").with_absolute_paths().output == "memtest://b/x":
        return
    real = JobConfig.with_absolute_paths

    def keep_uris(self):
        out = real(self)
        if self.output and st.is_uri(self.output):
            out.output = self.output
        return out

    monkeypatch.setattr(JobConfig, "with_absolute_paths", keep_uris)


@pytest.fixture
def memfs(monkeypatch, uri_outputs):
    """A fresh in-memory object store behind ``memtest://``; leases settle fast."""
    fs = pafs._MockFileSystem()
    st.register_filesystem("memtest", lambda uri: (fs, uri.split("://", 1)[1]))
    monkeypatch.setattr(st, "LEASE_SETTLE_S", 0.01)
    yield fs
    st.register_filesystem("memtest", None)


def row(i: int) -> dict:
    return {"custom_id": f"r{i}", "input_file": "in.jsonl", "input_index": i, "sample_index": 0, "text": f"t{i}"}


# ------------------------------------------------------------------------------------------ primitives


def test_open_storage_kinds(memfs, tmp_path):
    assert isinstance(st.open_storage(str(tmp_path)), st.LocalStorage)
    f = st.open_storage(f"file://{tmp_path}/job")
    assert isinstance(f, st.LocalStorage) and f.root == f"{tmp_path}/job" and f.location == f"file://{tmp_path}/job"
    m = st.open_storage("memtest://bucket/job")
    assert isinstance(m, st.ArrowStorage) and not m.atomic_rename  # object store: write-once, no rename
    sub = st.ArrowStorage(pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()), "job", "x://job")
    assert sub.atomic_rename  # a local disk under it: temporary + rename
    with pytest.raises(BatchLLMError, match="cannot open output folder nosuch://"):
        st.open_storage("nosuch://bucket/job")
    with pytest.raises(BatchLLMError, match="must name a local path"):
        st.open_storage("file://host/job")
    assert st.is_uri("s3://b/k") and st.is_uri("gs://b") and not st.is_uri("/tmp/x") and not st.is_uri("out")


def test_registered_file_scheme_gives_a_local_folder_object_store_semantics(tmp_path, monkeypatch):
    """How tests run the object-store paths on a local disk (across processes too): file:// registered
    with pyarrow's own resolver and atomic_rename=False; removing the registration restores the default."""
    uri = f"file://{tmp_path}/job"
    monkeypatch.setattr(st, "LEASE_SETTLE_S", 0.01)
    st.register_filesystem("file", pafs.FileSystem.from_uri, atomic_rename=False)
    try:
        s = st.open_storage(uri)
        assert isinstance(s, st.ArrowStorage) and not s.atomic_rename and isinstance(s.lock(), st.Lease)
        wr = ShardWriter(uri, 1)
        wr.add(row(0))
        wr.close()
        assert read_results(uri, verify=True)["input_index"].to_pylist() == [0]
    finally:
        st.register_filesystem("file", None)
    assert isinstance(st.open_storage(uri), st.LocalStorage)
    assert read_results(uri)["input_index"].to_pylist() == [0]  # the same folder, read as a local one


@pytest.mark.parametrize("kind", ["object", "subtree"])
def test_arrow_storage_primitives(memfs, tmp_path, kind):
    if kind == "object":
        s = st.open_storage("memtest://bucket/job")
    else:
        s = st.ArrowStorage(pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()), "job", "sub://job")
    s.ensure_folder()
    assert s.names() == [] and s.read_bytes("a") is None and not s.exists("a")
    phases = []
    s.write_new("shard-00000.parquet", b"abc", phases.append)
    s.replace("manifest.json", b"{1}")
    s.replace("manifest.json", b"{2}")
    assert phases == (["shard-written"] if kind == "object" else ["shard-written", "shard-renamed"])
    assert sorted(s.names()) == ["manifest.json", "shard-00000.parquet"]  # no temporary left behind
    assert s.read_bytes("manifest.json") == b"{2}" and s.exists("shard-00000.parquet")
    with s.open_input("shard-00000.parquet") as f:
        assert f.read() == b"abc"
    s.remove("shard-00000.parquet")
    s.remove("never-there")
    assert s.names() == ["manifest.json"]


def test_writer_on_object_store_commits_and_cleans_orphans(memfs):
    uri = "memtest://bucket/job"
    wr = ShardWriter(uri, 2)
    assert is_running(uri)
    for i in range(5):
        wr.add(row(i))
    wr.close()
    assert not is_running(uri) and not memfs.get_file_info(f"bucket/job/{st.LOCK}").is_file  # lease released
    m = read_manifest(uri)
    # under a lease each run tags its shard names: a run that lost the folder cannot overwrite them
    names = [s["file"] for s in m["shards"]]
    tag = names[0].split("-")[2].split(".")[0]
    assert len(tag) == 8 and names == [f"shard-0000{i}-{tag}.parquet" for i in range(3)]
    assert read_results(uri, verify=True)["input_index"].to_pylist() == [0, 1, 2, 3, 4]
    # a killed run's leftovers: a shard written but never listed, and a temporary
    s = st.open_storage(uri)
    s.write_new("shard-00007.parquet", b"partial")
    s.write_new(".shard-00008.parquet.tmp", b"partial")
    wr = ShardWriter(uri, 2, manifest=read_manifest(uri))
    assert sorted(n for n in s.names() if "shard" in n) == names
    wr.add(row(5))
    wr.close()
    assert read_results(uri, verify=True).num_rows == 6


def test_lease_refuses_a_live_holder_takes_an_expired_one(memfs):
    uri = "memtest://bucket/job"
    s = st.open_storage(uri)
    s.ensure_folder()
    other = {"token": "other", "host": "node-7", "pid": 42, "acquired_at": time.time(), "renewed_at": time.time(), "ttl": 60}
    s.replace(st.LOCK, json.dumps(other).encode())
    assert is_running(uri)
    with pytest.raises(BatchLLMError, match=r"another batchllm process is writing to memtest://bucket/job \(lease held by node-7 pid 42"):
        ShardWriter(uri, 2)
    other["renewed_at"] = time.time() - 61  # its process was killed a minute ago: the lease expired
    s.replace(st.LOCK, json.dumps(other).encode())
    assert not is_running(uri)
    wr = ShardWriter(uri, 2)
    assert json.loads(s.read_bytes(st.LOCK))["token"] == wr._lock.token
    with pytest.raises(BatchLLMError, match="another batchllm process"):  # and now it is ours
        ShardWriter(uri, 2)
    wr.close()


def test_lease_renewed_and_a_lost_lease_stops_manifest_writes(memfs):
    uri = "memtest://bucket/job"
    s = st.open_storage(uri)
    lease = st.Lease(s, ttl=0.4, settle=0.01)
    s.ensure_folder()
    lease.acquire()
    first = json.loads(s.read_bytes(st.LOCK))["renewed_at"]
    time.sleep(0.3)
    assert json.loads(s.read_bytes(st.LOCK))["renewed_at"] > first  # the background renewal
    lease.release()
    assert s.read_bytes(st.LOCK) is None

    wr = ShardWriter(uri, 1)
    wr.add(row(0))
    before = read_manifest(uri)
    # another process took the folder over (this one stalled longer than the TTL)
    s.replace(st.LOCK, json.dumps({"token": "thief", "renewed_at": time.time(), "ttl": 60}).encode())
    with pytest.raises(BatchLLMError, match="no longer holds memtest://bucket/job: its lease was taken over"):
        wr.add(row(1))
    assert read_manifest(uri) == before  # nothing written over the new holder's manifest
    wr.abandon()
    assert json.loads(s.read_bytes(st.LOCK))["token"] == "thief"  # release leaves someone else's lease alone


# ---------------------------------------------------------------------------------------------- jobs


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny):
    """An input file (shared prefixes, n=2 rows, a bad line) and its single-process results on a local path."""
    d = tmp_path_factory.mktemp("storage")
    inp = d / "in.jsonl"
    lines = []
    for i in range(16):
        r = {"custom_id": f"q{i}", "prompt_token_ids": [1, 10 + i % 3, 20 + i % 3, 30 + i, 40 + i % 5]}
        if i % 5 == 0:
            r["n"] = 2
        lines.append(json.dumps(r))
    lines.insert(3, "{bad")
    inp.write_text("\n".join(lines) + "\n")
    run_job(JobConfig(inputs=[str(inp)], output=str(d / "ref"), **BASE), loaded=tiny)
    return str(inp), read_results(str(d / "ref"), verify=True).to_pylist()


def keyed(rows) -> dict:
    return {(r["custom_id"], r["sample_index"]): (r["text"], r["error_code"]) for r in rows}


def exactly_once(out, ref) -> list[dict]:
    got = read_results(out, verify=True).to_pylist()
    keys = [(r["custom_id"], r["sample_index"]) for r in got]
    assert len(keys) == len(set(keys)) and keyed(got) == keyed(ref)
    return got


def test_job_on_object_store_interrupt_resume_refuse_show_export(memfs, tiny, job, tmp_path):
    inp, ref = job
    uri = "memtest://bucket/jobs/a"
    cfg = dict(inputs=[inp], output=uri, shard_rows=3, **BASE)
    with pytest.raises(JobInterrupted, match="resume with: batchllm resume memtest://bucket/jobs/a"):
        run_job(JobConfig(**cfg), progress=SigintAt("step", 3), loaded=tiny)
    partial = read_results(uri, verify=True).to_pylist()
    assert 0 < len(partial) < len(ref)
    assert read_status(uri)["status"] == "cancelled" and job_state(uri)["status"] == "cancelled"
    assert not is_running(uri)
    with pytest.raises(BatchLLMError, match="different configuration: seed"):
        run_job(JobConfig(**{**cfg, "seed": 1}), loaded=tiny)
    s = run_job(JobConfig(**cfg), loaded=tiny)
    assert s.done_before > 0
    exactly_once(uri, ref)
    state = job_state(uri)
    assert state["status"] == "completed" and state["runs"] == 2 and state["failed"] == 1 and not state["running"]
    # every object in the folder is a listed shard, the manifest, the status file or the job-folder mark:
    # no orphan, no temporary
    names = {i.base_name for i in memfs.get_file_info(pafs.FileSelector("bucket/jobs/a"))}
    assert names == {".batchllm-job", ".manifest.json", ".status.json"} | {e["file"] for e in read_manifest(uri)["shards"]}
    # export to a local file and into the object store
    res = export_job(uri, "jsonl", str(tmp_path / "all.jsonl"), ordered=True)
    assert res.rows == len(ref) and res.failed == 1
    res = export_job(uri, "openai", "memtest://bucket/exports/out.jsonl")
    with memfs.open_input_stream("bucket/exports/out.errors.jsonl") as f:
        assert json.loads(f.read().decode().splitlines()[0])["error"]["code"] == "malformed_json"
    export_job(uri, "parquet", "memtest://bucket/exports/all.parquet", ordered=True)
    with memfs.open_input_file("bucket/exports/all.parquet") as f:
        assert pq.read_table(f).num_rows == len(ref)


def test_job_on_file_uri_is_the_local_folder(uri_outputs, tiny, job, tmp_path):
    """A file:// URI is the local folder itself (same files, same flock): a job started under the URI
    resumes under the plain path, and the other way round."""
    from typer.testing import CliRunner

    from batchllm.cli import app

    inp, ref = job
    folder = tmp_path / "out"
    uri = f"file://{folder}"
    with pytest.raises(JobInterrupted):
        run_job(JobConfig(inputs=[inp], output=uri, shard_rows=3, **BASE), progress=SigintAt("step", 3), loaded=tiny)
    assert os.path.isfile(folder / ".manifest.json")
    run_job(JobConfig(inputs=[inp], output=str(folder), shard_rows=3, **BASE), loaded=tiny)
    exactly_once(uri, ref)
    assert read_results(str(folder)).num_rows == len(ref)
    shown = CliRunner().invoke(app, ["show", uri])
    assert shown.exit_code == 0 and "completed" in shown.output, shown.output
    out = CliRunner().invoke(app, ["export", uri, "--to", f"file://{tmp_path}/x.parquet"])
    assert out.exit_code == 0, out.output
    assert pq.read_table(tmp_path / "x.parquet").num_rows == len(ref)


# -- review findings: a stale holder, read blips, a stalled renewal ---------------------------------


class _FlakyLeaseReads(st.ArrowStorage):
    """Fails the next ``fail`` reads of the lease object with an OSError (a network blip)."""

    fail = 0

    def read_bytes(self, name):
        if name == st.LOCK and _FlakyLeaseReads.fail:
            _FlakyLeaseReads.fail -= 1
            raise OSError("connection reset (simulated)")
        return super().read_bytes(name)


def test_a_read_blip_neither_loses_the_lease_nor_lets_another_process_take_it(memfs):
    s = _FlakyLeaseReads(memfs, "bucket/job", "memtest://bucket/job")
    s.ensure_folder()
    lease = st.Lease(s, ttl=0.4, settle=0.01)
    lease.acquire()
    wr = ShardWriter(s, 1, lock=lease)
    _FlakyLeaseReads.fail = 1  # one failed GET during the next renewal
    time.sleep(0.25)
    assert lease._lost is None and lease._thread.is_alive()
    wr.add(row(0))  # commits (shard_rows 1)
    wr.close()
    other = st.Lease(s, ttl=60, settle=0.01)
    first = st.Lease(s, ttl=60, settle=0.01)
    first.acquire()
    _FlakyLeaseReads.fail = 1
    with pytest.raises(BatchLLMError, match="cannot read the lease"):
        other.acquire()  # an unreadable lease is not a free one
    first.check()
    first.release()


def test_a_stalled_holder_loses_the_folder_and_never_overwrites_the_new_holders_work(memfs):
    uri = "memtest://bucket/job"
    s = st.open_storage(uri)
    s.ensure_folder()
    stale = st.Lease(s, ttl=0.4, settle=0.01)
    stale.acquire()
    stale._stop.set()  # its renewal thread "froze"
    wr = ShardWriter(s, 1, lock=stale)
    wr.add(row(0))
    time.sleep(0.5)  # the lease expired
    new = st.Lease(s, ttl=60, settle=0.01)
    new.acquire()
    wr2 = ShardWriter(s, 1, lock=new, manifest=read_manifest(uri))
    wr2.add(row(1))
    with pytest.raises(BatchLLMError, match="no longer holds"):
        wr.add(row(2))  # the stale run writes nothing more: no shard, no manifest
    m = read_manifest(uri)
    assert [s_["rows"] for s_ in m["shards"]] == [1, 1]
    assert read_results(uri, verify=True)["input_index"].to_pylist() == [0, 1]
    assert len({n.split("-")[2] for n in (x["file"] for x in m["shards"])}) == 2  # one tag per run
    wr2.close()
    stale._held = False  # its lease object belongs to the new holder now


def test_hdfs_folders_are_refused():
    with pytest.raises(BatchLLMError, match="no atomic replace"):
        st.open_storage("hdfs://namenode:8020/jobs/x")
