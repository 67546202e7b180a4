"""``batchllm export`` and ``batchllm show`` logic on hand-made job folders (no model involved)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from rich.console import Console

from batchllm.errors import BatchLLMError
from batchllm.io.writer import ShardWriter
from batchllm.jobs.export import export_job
from batchllm.jobs.show import job_state, show_job


def completion(i, sample=0, file="a.jsonl", kind="chat", logprobs=False):
    r = {"custom_id": f"{file}-{i}", "input_file": file, "input_index": i, "sample_index": sample, "text": f"text {i}.{sample}",
         "finish_reason": "stop", "prompt_tokens": 7, "completion_tokens": 2, "cached_tokens": 4, "token_ids": [11, 12],
         "request_type": kind}
    if logprobs:
        r["logprobs"] = [-0.5, -1.0]
        r["top_logprobs"] = [[{"token_id": 11, "logprob": -0.5}], [{"token_id": 12, "logprob": -1.0}, {"token_id": 3, "logprob": -2.0}]]
    return r


def error(i, file="a.jsonl", code="malformed_json", cid=None):
    return {"custom_id": cid, "input_file": file, "input_index": i, "error_code": code, "error_message": "invalid JSON"}


@pytest.fixture
def job(tmp_path):
    """Rows committed out of input order (as a prefix-sharing plan commits them), over two input files."""
    out = str(tmp_path / "job")
    wr = ShardWriter(out, 3, job_spec={"inputs": ["a.jsonl", "b.jsonl"], "model": "dummy:tiny"})
    wr.add(error(2))
    wr.add_request([completion(0, 1, "b.jsonl", kind="completion"), completion(0, 0, "b.jsonl", kind="completion")])
    wr.add_request([completion(5)])
    wr.add_request([completion(1, logprobs=True)])
    wr.add(error(1, "b.jsonl", "duplicate_custom_id", "b.jsonl-1"))
    wr.add_request([completion(0)])
    wr.close()
    return out


def test_export_ordered_parquet_and_jsonl(job, tmp_path):
    res = export_job(job, "parquet", str(tmp_path / "o.parquet"), ordered=True)
    assert (res.rows, res.requests, res.failed) == (7, 6, 2)
    t = pq.read_table(tmp_path / "o.parquet")
    keys = list(zip(t["input_file"].to_pylist(), t["input_index"].to_pylist(), t["sample_index"].to_pylist()))
    assert keys == [("a.jsonl", 0, 0), ("a.jsonl", 1, 0), ("a.jsonl", 2, None), ("a.jsonl", 5, 0),
                    ("b.jsonl", 0, 0), ("b.jsonl", 0, 1), ("b.jsonl", 1, None)]
    assert "_file_id" not in t.column_names
    export_job(job, "jsonl", str(tmp_path / "o.jsonl"))  # commit order
    lines = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [(x["input_file"], x["input_index"]) for x in lines][:3] == [("a.jsonl", 2), ("b.jsonl", 0), ("b.jsonl", 0)]
    assert lines[0]["error_code"] == "malformed_json" and lines[1]["text"] == "text 0.1"


def test_export_openai_formats(job, tmp_path):
    to = str(tmp_path / "results.jsonl")
    res = export_job(job, "openai", to, ordered=True)
    assert res.paths == [to, str(tmp_path / "results.errors.jsonl")]
    out = [json.loads(x) for x in open(to)]
    assert [o["custom_id"] for o in out] == ["a.jsonl-0", "a.jsonl-1", "a.jsonl-5", "b.jsonl-0"]
    first = out[0]
    assert set(first) == {"id", "custom_id", "response", "error"} and first["error"] is None
    assert first["id"].startswith("batch_req_") and first["response"]["status_code"] == 200
    assert first["response"]["request_id"].startswith("req_")
    body = first["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "dummy:tiny" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "text 0.0"}, "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9, "prompt_tokens_details": {"cached_tokens": 4}}
    lp = out[1]["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert lp[1] == {"token": "token_id:12", "logprob": -1.0, "bytes": None,
                     "top_logprobs": [{"token": "token_id:12", "logprob": -1.0, "bytes": None}, {"token": "token_id:3", "logprob": -2.0, "bytes": None}]}
    text = out[3]["response"]["body"]
    assert text["object"] == "text_completion" and text["id"].startswith("cmpl-")
    assert [c["index"] for c in text["choices"]] == [0, 1] and text["choices"][1]["text"] == "text 0.1"
    assert text["usage"]["completion_tokens"] == 4 and text["usage"]["prompt_tokens"] == 7
    errs = [json.loads(x) for x in open(tmp_path / "results.errors.jsonl")]
    assert [e["custom_id"] for e in errs] == [None, "b.jsonl-1"]
    assert errs[0]["response"] is None and errs[0]["error"]["code"] == "malformed_json"
    assert "a.jsonl, row 2" in errs[0]["error"]["message"]
    # ids are stable across exports
    export_job(job, "openai", str(tmp_path / "again.jsonl"))
    again = {json.loads(x)["custom_id"]: json.loads(x)["id"] for x in open(tmp_path / "again.jsonl")}
    assert again["a.jsonl-0"] == first["id"]


def test_export_errors(tmp_path, job):
    with pytest.raises(BatchLLMError, match="no manifest"):
        export_job(str(tmp_path / "none"), "jsonl", str(tmp_path / "x.jsonl"))
    with pytest.raises(BatchLLMError, match="unknown export format"):
        export_job(job, "csv", str(tmp_path / "x.csv"))
    with pytest.raises(BatchLLMError, match="does not exist"):
        export_job(job, "jsonl", str(tmp_path / "no" / "x.jsonl"))


def test_show_finished_and_interrupted(job):
    console = Console(record=True, width=120)
    s = show_job(job, console)
    text = console.export_text()
    assert s["status"] == "interrupted" and not s["running"]  # no status.json and no live process
    assert "resume with: batchllm resume" in text and "malformed_json: 1" in text and "duplicate_custom_id: 1" in text
    assert "prefix reuse" in text and "57.1%" in text  # 20 of 35 prompt tokens reused
    assert job_state(job)["completed"] == 4 and job_state(job)["failed"] == 2
