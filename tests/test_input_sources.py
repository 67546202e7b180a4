"""Where inputs come from (issue 15): pyarrow filesystem URIs (``file://``, a registered in-memory / subtree
scheme), compressed JSONL (``.gz``, ``.zst``), ``--split`` for dataset dicts, hub dataset names
(offline: one line naming the cache), and the job fingerprint / resume over URIs. Everything offline."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from tests.job_utils import run_main

from batchllm.config import JobConfig, load_job_file
from batchllm.errors import BatchLLMError
from batchllm.io import requests as rq
from batchllm.io import storage
from batchllm.io.readers import count_rows, detect_format, input_identity, is_hub_dataset_name, read_requests
from batchllm.io.requests import Request, RowError
from batchllm.io.writer import read_results
from batchllm.pipeline import run_job

BASE = dict(model="dummy:tiny", device="cpu", dtype="float32", max_tokens=4, temperature=0.0, preview=0)
ROWS = [{"custom_id": "a", "prompt": "hello"}, "{broken", "", {"custom_id": "c", "prompt_token_ids": [1, 2, 3]}]


def jsonl_bytes(rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def check_rows(out, name):
    """ROWS read back: a request, a malformed line (index 1), the blank line skipped, a request at index 3."""
    assert [type(x) for x in out] == [Request, RowError, Request]
    assert [x.input_index for x in out] == [0, 1, 3]
    assert all(x.input_file == name for x in out)
    assert out[1].error_code == rq.MALFORMED_JSON and "{broken" in out[1].error_message


@pytest.fixture
def memfs(tmp_path):
    """``mem://NAME``: a SubTreeFileSystem over a temp folder, registered as output folders register one."""
    root = tmp_path / "bucket"
    root.mkdir()
    fs = pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())
    storage.register_filesystem("mem", lambda uri: (fs, uri.split("://", 1)[1]))
    yield root
    storage.register_filesystem("mem", None)


# ----------------------------------------------------------------------------------------------- URIs


def test_file_uri_is_read_as_the_local_file(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(jsonl_bytes(ROWS))
    uri = p.as_uri()
    assert uri.startswith("file:///") and detect_format(uri) == "jsonl"
    check_rows(list(read_requests([uri])), uri)
    assert count_rows([uri]) == 3
    assert input_identity(uri) == input_identity(str(p))  # the same file, the same identity


def test_registered_filesystem_jsonl_gz_parquet_and_openai(memfs):
    (memfs / "in.jsonl").write_bytes(jsonl_bytes(ROWS))
    (memfs / "in.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(ROWS)))
    pq.write_table(pa.table({"custom_id": ["p0", "p1"], "prompt": ["x", None]}), str(memfs / "in.parquet"))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    (memfs / "batch.jsonl").write_bytes(jsonl_bytes([{"custom_id": "o1", "method": "POST", "url": "/v1/chat/completions", "body": body}]))
    check_rows(list(read_requests(["mem://in.jsonl"])), "mem://in.jsonl")
    check_rows(list(read_requests(["mem://in.jsonl.gz"])), "mem://in.jsonl.gz")
    parquet = list(read_requests(["mem://in.parquet"]))
    assert isinstance(parquet[0], Request) and parquet[0].prompt == "x" and parquet[1].error_code == rq.MISSING_PROMPT
    assert detect_format("mem://batch.jsonl") == "openai"
    assert list(read_requests(["mem://batch.jsonl"]))[0].messages[0]["content"] == "hi"
    assert count_rows(["mem://in.jsonl.gz", "mem://in.parquet"]) == 5
    # several inputs: default ids are prefixed with the file's base name, URIs included
    both = list(read_requests(["mem://in.parquet", "mem://in.jsonl"]))
    assert {x.input_file for x in both} == {"mem://in.parquet", "mem://in.jsonl"}


def test_in_memory_object_store():
    """pyarrow's in-memory mock filesystem (object-store semantics: no local path behind it)."""
    fs = pafs._MockFileSystem()
    fs.create_dir("bucket")
    with fs.open_output_stream("bucket/in.jsonl.zst", compression="zstd") as f:
        f.write(jsonl_bytes(ROWS))
    storage.register_filesystem("memtest", lambda uri: (fs, uri.split("://", 1)[1]))
    try:
        check_rows(list(read_requests(["memtest://bucket/in.jsonl.zst"])), "memtest://bucket/in.jsonl.zst")
        assert input_identity("memtest://bucket/in.jsonl.zst").split(":")[0] == str(fs.get_file_info("bucket/in.jsonl.zst").size)
    finally:
        storage.register_filesystem("memtest", None)


def test_uri_errors_are_one_line(memfs):
    with pytest.raises(BatchLLMError, match=r"^input not found: mem://nope\.jsonl$"):
        read_requests(["mem://nope.jsonl"])
    (memfs / "t.csv").write_text("prompt\nx\n")
    with pytest.raises(BatchLLMError, match="read from local paths only"):
        read_requests(["mem://t.csv"])
    (memfs / "dir").mkdir()
    with pytest.raises(BatchLLMError, match="is a folder"):
        read_requests(["mem://dir"])
    with pytest.raises(BatchLLMError, match="cannot open input nosuchscheme://"):
        read_requests(["nosuchscheme://bucket/in.jsonl"])


def test_uri_identity_follows_content(memfs):
    (memfs / "in.jsonl").write_bytes(jsonl_bytes(ROWS))
    a = input_identity("mem://in.jsonl")
    assert a == input_identity("mem://in.jsonl") and a.startswith(f"{len(jsonl_bytes(ROWS))}:")
    (memfs / "in.jsonl").write_bytes(jsonl_bytes(ROWS[:1]))
    assert input_identity("mem://in.jsonl") != a
    assert input_identity("mem://in.jsonl", split="x").endswith("|split=x")


# -------------------------------------------------------------------------------------------- compressed


def test_gzip_and_zstd_jsonl_keep_line_numbers(tmp_path):
    data = jsonl_bytes(ROWS)
    gz = tmp_path / "in.jsonl.gz"
    gz.write_bytes(gzip.compress(data))
    zst = tmp_path / "in.ndjson.zst"
    with pa.output_stream(str(zst), compression="zstd") as f:
        f.write(data)
    for p in (gz, zst):
        assert detect_format(str(p)) == "jsonl"
        check_rows(list(read_requests([str(p)])), str(p))
        assert count_rows([str(p)]) == 3


def test_compressed_damage_and_other_formats_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(jsonl_bytes([{"prompt": "x" * 50, "custom_id": str(i)} for i in range(2000)]))[:300])
    with pytest.raises(BatchLLMError, match=r"^cannot read .*bad\.jsonl\.gz: "):
        list(read_requests([str(bad)]))
    notgz = tmp_path / "plain.jsonl.gz"
    notgz.write_bytes(jsonl_bytes(ROWS))
    with pytest.raises(BatchLLMError, match=r"^cannot read .*plain\.jsonl\.gz"):
        read_requests([str(notgz)])
    pq.write_table(pa.table({"prompt": ["x"]}), str(tmp_path / "t.parquet"))
    (tmp_path / "t.parquet.gz").write_bytes(gzip.compress((tmp_path / "t.parquet").read_bytes()))
    with pytest.raises(BatchLLMError, match="only JSONL files are read compressed"):
        read_requests([str(tmp_path / "t.parquet.gz")])
    empty = tmp_path / "empty.jsonl.gz"
    empty.write_bytes(gzip.compress(b"\n\n"))
    with pytest.raises(BatchLLMError, match="is empty"):
        read_requests([str(empty)])


# ----------------------------------------------------------------------------------------------- splits


@pytest.fixture
def datasets_mod(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    return datasets


def test_split_of_a_saved_dataset_dict(tmp_path, datasets_mod):
    ds = datasets_mod.Dataset.from_dict({"prompt": ["a", "b", "c"]})
    folder = str(tmp_path / "dd")
    datasets_mod.DatasetDict({"train": ds, "test": ds.select([2])}).save_to_disk(folder)
    with pytest.raises(BatchLLMError, match=r"dd has splits train, test: choose one with --split$"):
        read_requests([folder])
    assert [r.prompt for r in read_requests([folder], split="test")] == ["c"]
    assert [r.prompt for r in read_requests([folder], split="train")] == ["a", "b", "c"]
    assert count_rows([folder], split="test") == 1
    with pytest.raises(BatchLLMError, match=r"has no split 'dev'; its splits: train, test"):
        read_requests([folder], split="dev")
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_bytes(jsonl_bytes(ROWS))
    with pytest.raises(BatchLLMError, match="--split test: no input has splits"):
        read_requests([str(jsonl)], split="test")
    assert input_identity(folder, "test") != input_identity(folder, "train")


def test_hub_dataset_names_and_paths():
    assert is_hub_dataset_name("org/name") and is_hub_dataset_name("imdb")
    for spec in ("missing.jsonl", "/abs/org/name", "./org/name", "s3://b/k", "a/b/c", "../x", "x.jsonl.gz"):
        assert not is_hub_dataset_name(spec), spec


def test_hub_dataset_offline_not_cached_is_one_line(tmp_path, datasets_mod, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets_mod.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    assert detect_format("someorg/missing-set") == "hub"
    with pytest.raises(BatchLLMError) as e:
        read_requests(["someorg/missing-set"])
    msg = str(e.value)
    assert "\n" not in msg and "someorg/missing-set" in msg and "not in the local cache" in msg
    assert str(tmp_path / "hf-datasets") in msg and str(tmp_path / "hub") in msg and "HF_HUB_OFFLINE=1" in msg


def test_hub_dataset_through_load_dataset(tmp_path, datasets_mod, monkeypatch):
    ds = datasets_mod.Dataset.from_dict({"custom_id": ["x", "y"], "prompt": ["p", "q"]})
    calls = []

    def fake_load(name, split=None, **kw):
        calls.append((name, split))
        dd = datasets_mod.DatasetDict({"train": ds, "validation": ds.select([1])})
        return dd if split is None else dd[split]

    monkeypatch.setattr(datasets_mod, "load_dataset", fake_load)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BatchLLMError, match="org/set has splits train, validation: choose one with --split"):
        read_requests(["org/set"])
    out = list(read_requests(["org/set"], split="validation"))
    assert [(r.custom_id, r.prompt, r.input_file) for r in out] == [("y", "q", "org/set")]
    assert ("org/set", "validation") in calls
    assert input_identity("org/set", "validation").startswith("hub:org/set:1:")


def test_hub_lookup_retry_warnings_do_not_precede_the_error_line(tmp_path, datasets_mod, monkeypatch, caplog):
    import logging

    def failing_load(name, split=None, **kw):
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 8s [Retry 5/5].")
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets_mod, "load_dataset", failing_load)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING), pytest.raises(BatchLLMError, match="could not be loaded .*Couldn't reach the Hub"):
        read_requests(["org/unreachable"])
    assert "Retrying" not in caplog.text


# ---------------------------------------------------------------------------------- config and jobs


def test_config_keeps_uris_and_hub_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local.jsonl").write_text("{}\n")
    cfg = JobConfig(inputs=["s3://bucket/in.jsonl", "file:///abs/in.jsonl", "org/name", "local.jsonl"], output="out")
    assert cfg.with_absolute_paths().inputs == ["s3://bucket/in.jsonl", "file:///abs/in.jsonl", "org/name",
                                                str(tmp_path / "local.jsonl")]
    job = tmp_path / "jobs" / "job.toml"
    job.parent.mkdir()
    (job.parent / "here.jsonl").write_text("{}\n")
    job.write_text('inputs = ["gs://b/in.jsonl.gz", "org/name", "here.jsonl"]\nsplit = "test"\n')
    flat = load_job_file(str(job))
    assert flat["inputs"] == ["gs://b/in.jsonl.gz", "org/name", str(job.parent / "here.jsonl")]
    assert flat["split"] == "test"


def test_job_from_a_uri_resumes_and_refuses_changed_content(tiny, memfs, tmp_path):
    rows = [{"custom_id": f"q{i}", "prompt_token_ids": [1, 100 + i, 200, 300]} for i in range(5)]
    (memfs / "in.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(rows)))
    out = tmp_path / "out"
    cfg = JobConfig(inputs=["mem://in.jsonl.gz"], output=str(out), **BASE)
    first = run_job(cfg, loaded=tiny)
    assert first.samples == 5
    got = read_results(str(out)).to_pylist()
    assert {r["input_file"] for r in got} == {"mem://in.jsonl.gz"} and sorted(r["input_index"] for r in got) == list(range(5))
    again = run_job(JobConfig(inputs=["mem://in.jsonl.gz"], output=str(out), **BASE), loaded=tiny)
    assert again.samples == 0 and again.done_before == 5  # same fingerprint: resumed, nothing left
    (memfs / "in.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(rows[:4])))
    with pytest.raises(BatchLLMError, match="input files"):
        run_job(JobConfig(inputs=["mem://in.jsonl.gz"], output=str(out), **BASE), loaded=tiny)


def test_cli_bad_inputs_are_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    (tmp_path / "in.jsonl").write_bytes(jsonl_bytes(ROWS))
    for args in (["someorg/absent"], ["in.jsonl", "--split", "test"]):
        code, err = run_main(["run", *args, "-o", str(tmp_path / "out"), "--model", "dummy:tiny", "-q"], capsys)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and lines[0].startswith("error:"), err
        assert "Traceback" not in err
