"""``batchllm export`` and ``batchllm show`` logic on hand-made job folders (no model involved)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from rich.console import Console

from batchllm.errors import BatchLLMError
from batchllm.io.writer import ShardWriter
from batchllm.jobs.export import IncompleteJob, export_job
from batchllm.jobs.show import job_state, show_job
from batchllm.jobs.status import CANCELLED, StatusFile
from batchllm.models import loader
from tests.job_utils import run_main
from tests.openai_format import check_error_line, check_output_line


def completion(i, sample=0, file="a.jsonl", kind="chat", logprobs=None):
    """A finished sample; ``logprobs``: token ids whose log-probabilities it carries (each with one
    alternative, the id + 1... or the first id)."""
    r = {"custom_id": f"{file}-{i}", "input_file": file, "input_index": i, "sample_index": sample, "text": f"text {i}.{sample}",
         "finish_reason": "stop", "prompt_tokens": 7, "completion_tokens": 2, "cached_tokens": 4, "token_ids": [11, 12],
         "request_type": kind}
    if logprobs:
        r["token_ids"] = list(logprobs)
        r["logprobs"] = [-0.5 - k for k in range(len(logprobs))]
        r["top_logprobs"] = [[{"token_id": t, "logprob": -0.5 - k}, {"token_id": logprobs[0], "logprob": -3.0}]
                             for k, t in enumerate(logprobs)]
    return r


def error(i, file="a.jsonl", code="malformed_json", cid=None):
    return {"custom_id": cid, "input_file": file, "input_index": i, "error_code": code, "error_message": "invalid JSON"}


@pytest.fixture(scope="module")
def tok():
    """dummy:tiny's tokenizer (byte-level: one token per UTF-8 byte)."""
    return loader.load_tokenizer(loader.resolve_model("dummy:tiny"))


@pytest.fixture
def he_ids(tok):
    """The ids of "h", 0xC3, 0xA9: "hé", the é split over two tokens."""
    ids = tok("hé", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3
    return ids


@pytest.fixture
def job(tmp_path, he_ids):
    """Rows committed out of input order (as a prefix-sharing plan commits them), over two input files."""
    out = str(tmp_path / "job")
    wr = ShardWriter(out, 3, job_spec={"inputs": ["a.jsonl", "b.jsonl"], "model": "dummy:tiny"})
    wr.add(error(2))
    wr.add_request([completion(0, 1, "b.jsonl", kind="completion"), completion(0, 0, "b.jsonl", kind="completion", logprobs=he_ids)])
    wr.add_request([completion(5)])
    wr.add_request([completion(1, logprobs=he_ids)])
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


def test_export_openai_formats(job, tmp_path, he_ids):
    to = str(tmp_path / "results.jsonl")
    res = export_job(job, "openai", to, ordered=True)
    assert res.paths == [to, str(tmp_path / "results.errors.jsonl")]
    assert res.state == "unknown"  # a hand-made folder: no status.json
    assert any("a.jsonl" in w and "model names" in w for w in res.warnings)  # the inputs are not there
    out = [json.loads(x) for x in open(to)]
    for line in out:
        check_output_line(line)
    assert [o["custom_id"] for o in out] == ["a.jsonl-0", "a.jsonl-1", "a.jsonl-5", "b.jsonl-0"]
    first = out[0]
    assert set(first) == {"id", "custom_id", "response", "error"} and first["error"] is None
    assert first["id"].startswith("batch_req_") and first["response"]["status_code"] == 200
    assert first["response"]["request_id"].startswith("req_")
    body = first["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "dummy:tiny" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "text 0.0", "refusal": None},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9,
                             "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 0},
                             "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                           "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}
    # chat logprobs: token text and exact UTF-8 bytes (the é spans two byte tokens)
    lp = out[1]["response"]["body"]["choices"][0]["logprobs"]
    assert lp["refusal"] is None
    h, c3, a9 = lp["content"]
    assert (h["token"], h["bytes"], h["logprob"]) == ("h", [104], -0.5)
    assert (c3["token"], c3["bytes"]) == ("\\xc3", [0xC3]) and (a9["token"], a9["bytes"]) == ("\\xa9", [0xA9])
    assert bytes(b for t in lp["content"] for b in t["bytes"]).decode() == "hé"
    assert c3["top_logprobs"] == [{"token": "\\xc3", "logprob": -1.5, "bytes": [0xC3]}, {"token": "h", "logprob": -3.0, "bytes": [104]}]
    text = out[3]["response"]["body"]
    assert text["object"] == "text_completion" and text["id"].startswith("cmpl-")
    assert [c["index"] for c in text["choices"]] == [0, 1] and text["choices"][1]["text"] == "text 0.1"
    assert text["usage"]["completion_tokens"] == 4 and text["usage"]["prompt_tokens"] == 7
    clp = text["choices"][0]["logprobs"]
    assert clp["tokens"] == ["h", "\\xc3", "\\xa9"] and clp["token_logprobs"] == [-0.5, -1.5, -2.5]
    assert clp["text_offset"] == [0, 1, 1] and clp["top_logprobs"][1] == {"\\xc3": -1.5, "h": -3.0}
    assert text["choices"][1]["logprobs"] is None
    errs = [json.loads(x) for x in open(tmp_path / "results.errors.jsonl")]
    for line in errs:
        check_error_line(line)
    assert [e["custom_id"] for e in errs] == [None, "b.jsonl-1"]
    assert errs[0]["response"] is None and errs[0]["error"]["code"] == "malformed_json"
    assert "a.jsonl, row 2" in errs[0]["error"]["message"]
    # ids are stable across exports
    export_job(job, "openai", str(tmp_path / "again.jsonl"))
    again = {json.loads(x)["custom_id"]: json.loads(x)["id"] for x in open(tmp_path / "again.jsonl")}
    assert again["a.jsonl-0"] == first["id"]


def test_export_openai_echoes_request_models(tmp_path):
    """Bodies name the model the request asked for (read back from the job's unchanged input file), the
    served name for requests without one."""
    inp = tmp_path / "in.jsonl"
    lines = [{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-4o-mini", "messages": []}},
             {"custom_id": "y", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = str(tmp_path / "job")
    wr = ShardWriter(out, 10, job_spec={"inputs": [str(inp)], "model": "dummy:tiny"})
    wr.add_request([completion(0, file=str(inp))])
    wr.add_request([completion(1, file=str(inp))])
    wr.close()
    res = export_job(out, "openai", str(tmp_path / "o.jsonl"), ordered=True, served_model_name="my-model")
    assert res.warnings == []
    models = [json.loads(x)["response"]["body"]["model"] for x in open(tmp_path / "o.jsonl")]
    assert models == ["gpt-4o-mini", "my-model"]


def test_export_openai_without_tokenizer_falls_back_to_ids(tmp_path):
    """No tokenizer can be loaded (the model is gone): tokens keep the id spelling, and a warning says so."""
    out = str(tmp_path / "job")
    wr = ShardWriter(out, 10, job_spec={"inputs": ["a.jsonl"], "model": str(tmp_path / "gone-model")})
    wr.add_request([completion(0, logprobs=[5, 6])])
    wr.close()
    res = export_job(out, "openai", str(tmp_path / "o.jsonl"))
    assert any("cannot load the tokenizer" in w and "token_id:<id>" in w for w in res.warnings)
    line = json.loads(open(tmp_path / "o.jsonl").read())
    check_output_line(line)
    assert line["response"]["body"]["choices"][0]["logprobs"]["content"][0]["token"] == "token_id:5"
    assert line["response"]["body"]["choices"][0]["logprobs"]["content"][0]["bytes"] is None


def test_export_refuses_an_incomplete_job_unless_allow_partial(job, tmp_path, capsys):
    with pytest.raises(IncompleteJob, match="not known to be complete"):
        export_job(job, "jsonl", str(tmp_path / "x.jsonl"), require_complete=True)
    assert not (tmp_path / "x.jsonl").exists()
    st = StatusFile(job, "id", 0, ["a.jsonl"], "dummy:tiny")
    st.finish(CANCELLED)
    code, err = run_main(["export", job, "--format", "openai", "--to", str(tmp_path / "x.jsonl")], capsys)
    assert code == 1 and "error:" in err and "was cancelled" in err and "--allow-partial" in err
    assert f"batchllm resume {job}" in err and "Traceback" not in err
    assert not (tmp_path / "x.jsonl").exists()
    code, err = run_main(["export", job, "--format", "openai", "--to", str(tmp_path / "x.jsonl"), "--allow-partial"], capsys)
    assert code == 0 and "warning:" in err and "not complete (cancelled)" in err
    assert len((tmp_path / "x.jsonl").read_text().splitlines()) == 4


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


def test_export_of_a_running_job_is_refused(job, tmp_path):
    """A process holding the folder's lock: the job is running, an export would miss what it commits next."""
    from batchllm.io.storage import storage_of

    lock = storage_of(job).lock()
    lock.acquire()
    try:
        with pytest.raises(IncompleteJob, match="is still running: wait for it to finish"):
            export_job(job, "parquet", str(tmp_path / "x.parquet"), require_complete=True)
        res = export_job(job, "parquet", str(tmp_path / "x.parquet"))  # the library default: no completeness check
        assert res.state == "running" and res.rows == 7
    finally:
        lock.release()


def test_export_openai_prompt_logprobs_in_vllms_shape(tmp_path, he_ids):
    """A request's prompt_logprobs column becomes vLLM's response field: per choice of a completion, once
    per chat completion; None for the first prompt token, else {id: {logprob, rank, decoded_token}}."""
    h, c3, _ = he_ids
    pl = [None, {"token_id": c3, "logprob": -1.25, "rank": 2,
                 "top_logprobs": [{"token_id": h, "logprob": -0.75}]}]
    out = str(tmp_path / "job")
    wr = ShardWriter(out, 3, job_spec={"inputs": ["a.jsonl"], "model": "dummy:tiny"})
    wr.add_request([{**completion(0, kind="completion"), "prompt_logprobs": pl}])
    wr.add_request([{**completion(1, kind="chat"), "prompt_logprobs": pl}])
    wr.add_request([completion(2, kind="completion")])
    wr.close()
    to = str(tmp_path / "results.jsonl")
    export_job(out, "openai", to, ordered=True)
    lines = [json.loads(x) for x in open(to)]
    for line in lines:
        check_output_line(line)
    expected = [None, {str(h): {"logprob": -0.75, "rank": 1, "decoded_token": "h"},
                       str(c3): {"logprob": -1.25, "rank": 2, "decoded_token": "\\xc3"}}]
    text, chat, plain = (x["response"]["body"] for x in lines)
    assert text["choices"][0]["prompt_logprobs"] == expected and "prompt_logprobs" not in text
    assert chat["prompt_logprobs"] == expected and "prompt_logprobs" not in chat["choices"][0]
    assert "prompt_logprobs" not in plain and "prompt_logprobs" not in plain["choices"][0]  # did not ask
