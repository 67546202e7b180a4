"""``batchllm run-batch``: vllm run-batch's command on a durable batchllm job (dummy:tiny on the CPU).

Output lines are checked against the OpenAI Batch API output format (``tests/openai_format``)."""

from __future__ import annotations

import json
import os

import pytest

from batchllm.errors import BatchLLMError
from batchllm.io.writer import read_results
from batchllm.jobs import run_batch as rb
from batchllm.jobs.manifest import read_manifest
from batchllm.jobs.signals import JobInterrupted
from batchllm.pipeline import run_job
from tests.job_utils import SigintAt, run_main
from tests.openai_format import check_error_line, check_output_line

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
FLAGS = ["--model", "dummy:tiny", "--device", "cpu", "--max-tokens", "6", "--temperature", "0", "-q"]


def line(cid, url=CHAT, **body):
    if url == CHAT:
        body.setdefault("messages", [{"role": "user", "content": f"question {cid}?"}])
    else:
        body.setdefault("prompt", f"Once upon a time {cid}")
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def write_input(path, lines):
    path.write_text("".join(x + "\n" for x in lines))
    return str(path)


def read_lines(path):
    return [json.loads(x) for x in open(path)]


@pytest.fixture
def batch_input(tmp_path):
    return write_input(tmp_path / "in.jsonl", [
        line("chat-1", model="dummy:tiny"),
        line("comp-1", COMPLETIONS, logprobs=2),
        "{not json",
        line("chat-n", n=2, logprobs=True, top_logprobs=2, temperature=0.8, seed=3),
        line("emb", "/v1/embeddings", input="x"),
        line("comp-2", COMPLETIONS, max_tokens=3),
    ])


def test_run_batch_writes_openai_output_and_error_files(batch_input, tmp_path, capsys):
    out = str(tmp_path / "res.jsonl")
    code, err = run_main(["run-batch", "-i", batch_input, "-o", out, *FLAGS], capsys)
    assert code == 0, err
    assert f"to {out}" in err and str(tmp_path / "res.errors.jsonl") in err
    assert os.path.isdir(out + ".batchllm")  # the job folder, beside the output
    results = read_lines(out)
    for x in results:
        check_output_line(x)
    assert [x["custom_id"] for x in results] == ["chat-1", "comp-1", "chat-n", "comp-2"]  # input order
    bodies = [x["response"]["body"] for x in results]
    assert [b["object"] for b in bodies] == ["chat.completion", "text_completion", "chat.completion", "text_completion"]
    assert {b["model"] for b in bodies} == {"dummy:tiny"}  # echoed / the served name (the --model value)
    assert len(bodies[2]["choices"]) == 2 and bodies[3]["usage"]["completion_tokens"] <= 3
    # logprobs: token text and its exact bytes
    for choice in bodies[2]["choices"]:
        content = choice["logprobs"]["content"]
        for t in content:
            raw = bytes(t["bytes"])
            assert t["token"] == raw.decode("utf-8", "backslashreplace") and len(t["top_logprobs"]) == 2
    comp = bodies[1]["choices"][0]["logprobs"]
    assert len(comp["tokens"]) == len(comp["text_offset"]) == len(comp["token_logprobs"]) and not any(t.startswith("token_id:") for t in comp["tokens"])
    # the job folder's rows are what the file says
    rows = {r["custom_id"]: r for r in read_results(out + ".batchllm").to_pylist() if r["error_code"] is None and not r["sample_index"]}
    assert bodies[0]["choices"][0]["message"]["content"] == rows["chat-1"]["text"]
    assert bodies[1]["choices"][0]["text"] == rows["comp-1"]["text"]
    errors = read_lines(tmp_path / "res.errors.jsonl")
    for x in errors:
        check_error_line(x)
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [(None, "malformed_json"), ("emb", "unsupported_endpoint")]
    # a rerun of the same command: nothing to redo, the same files again
    before = open(out, "rb").read()
    code, err = run_main(["run-batch", "-i", batch_input, "-o", out, *FLAGS], capsys)
    assert code == 0 and "nothing left to do" in err
    assert open(out, "rb").read() == before


def test_run_batch_resumes_an_interrupted_job(tmp_path, capsys, tiny):
    inp = write_input(tmp_path / "in.jsonl", [line(f"c{i}", COMPLETIONS) for i in range(12)])
    ref = str(tmp_path / "ref.jsonl")
    code, err = run_main(["run-batch", "-i", inp, "-o", ref, *FLAGS], capsys)
    assert code == 0, err
    out = str(tmp_path / "res.jsonl")
    batch = rb.prepare(inp, out, model="dummy:tiny", options={"device": "cpu", "max_tokens": 6, "temperature": 0.0, "shard_rows": 1})
    with pytest.raises(JobInterrupted):
        run_job(batch.config, progress=SigintAt("step", 2), loaded=tiny)
    assert not os.path.exists(out)  # written only when the job completes
    with pytest.raises(BatchLLMError, match="was cancelled"):
        rb.finish(batch)
    code, err = run_main(["run-batch", "-i", inp, "-o", out, *FLAGS[:-1], "--shard-rows", "1"], capsys)
    assert code == 0, err
    assert "resuming the job" in err
    texts = lambda p: [(x["custom_id"], x["response"]["body"]["choices"][0]["text"]) for x in read_lines(p)]  # noqa: E731
    assert texts(out) == texts(ref)  # greedy: the resumed job gives the uninterrupted one's text


def test_run_batch_model_names(tmp_path, capsys):
    inp = write_input(tmp_path / "in.jsonl", [line("a", model="gpt-4o-mini"), line("b")])
    out = str(tmp_path / "res.jsonl")
    code, err = run_main(["run-batch", "-i", inp, "-o", out, *FLAGS], capsys)
    assert code == 1 and err.count("error:") == 1 and "Traceback" not in err
    assert "line 1 asks for model 'gpt-4o-mini'" in err and "--served-model-name gpt-4o-mini" in err
    assert not os.path.exists(out + ".batchllm")  # refused before anything ran
    code, err = run_main(["run-batch", "-i", inp, "-o", out, *FLAGS, "--served-model-name", "gpt-4o-mini"], capsys)
    assert code == 0, err
    assert [x["response"]["body"]["model"] for x in read_lines(out)] == ["gpt-4o-mini", "gpt-4o-mini"]


def test_run_batch_uri_input_and_output(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(tmp_path / "cache"))
    inp = write_input(tmp_path / "in.jsonl", [line("a"), line("b", COMPLETIONS)])
    (tmp_path / "out").mkdir()
    code, err = run_main(["run-batch", "-i", f"file://{inp}", "-o", f"file://{tmp_path}/out/res.jsonl", *FLAGS], capsys)
    assert code == 0, err
    results = read_lines(tmp_path / "out" / "res.jsonl")
    assert [x["custom_id"] for x in results] == ["a", "b"]
    assert (tmp_path / "out" / "res.errors.jsonl").read_text() == ""
    assert os.path.isdir(tmp_path / "out" / "res.jsonl.batchllm")


def test_run_batch_bad_commands(tmp_path, capsys):
    native = write_input(tmp_path / "rows.jsonl", [json.dumps({"prompt": "hi"})])
    good = write_input(tmp_path / "in.jsonl", [line("a")])
    cases = [
        (["-i", native, "-o", str(tmp_path / "o.jsonl")], "not an OpenAI batch file"),
        (["-i", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o.jsonl")], "input not found"),
        (["-i", good, "-o", str(tmp_path)], "is a folder"),
        (["-i", good, "-o", str(tmp_path / "no" / "o.jsonl")], "does not exist"),
        (["-i", good, "-o", good], "is the input file"),
        (["-i", good, "-o", str(tmp_path / "o.jsonl"), "--dtype", "float8"], "dtype"),
    ]
    for args, message in cases:
        code, err = run_main(["run-batch", *args, *FLAGS], capsys)
        assert code == 1 and err.count("error:") == 1 and message in err and "Traceback" not in err, (args, err)
    assert not os.path.exists(tmp_path / "o.jsonl.batchllm")


def test_vllm_dtype_spellings(tmp_path):
    good = write_input(tmp_path / "in.jsonl", [line("a")])
    for given, dtype in (("half", "float16"), ("float", "float32"), ("bfloat16", "bfloat16")):
        assert rb.prepare(good, str(tmp_path / "o.jsonl"), model="dummy:tiny", options={"dtype": given}).config.dtype == dtype


def test_run_batch_chat_template_override(tmp_path, capsys):
    """--chat-template (as batchllm run's) reaches the job; the export loads the job's tokenizer with it
    for the logprob spelling (no fallback warning)."""
    inp = write_input(tmp_path / "in.jsonl", [line("a", logprobs=True)])
    out = str(tmp_path / "res.jsonl")
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    code, err = run_main(["run-batch", "-i", inp, "-o", out, *FLAGS, "--chat-template", template], capsys)
    assert code == 0, err
    assert "warning:" not in err
    spec = read_manifest(out + ".batchllm")["job"]
    assert spec["chat_template"] == template
    content = read_lines(out)[0]["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert content and not any(t["token"].startswith("token_id:") for t in content)


def test_run_batch_is_run_then_export(batch_input, tmp_path, capsys):
    """One execution path: run-batch gives what batchllm run + batchllm export --format openai give (ids
    aside: they derive from the job)."""
    out = str(tmp_path / "res.jsonl")
    code, err = run_main(["run-batch", "-i", batch_input, "-o", out, *FLAGS], capsys)
    assert code == 0, err
    code, err = run_main(["run", batch_input, "-o", str(tmp_path / "job"), *FLAGS], capsys)
    assert code == 0, err
    code, err = run_main(["export", str(tmp_path / "job"), "--format", "openai", "--ordered", "--to", str(tmp_path / "x.jsonl")], capsys)
    assert code == 0, err

    def same(line):
        body = line["response"]["body"]
        return line["custom_id"], body["object"], body["model"], body["choices"], body["usage"]

    assert [same(x) for x in read_lines(out)] == [same(x) for x in read_lines(tmp_path / "x.jsonl")]
    errors = lambda p: [(x["custom_id"], x["error"]) for x in read_lines(p)]  # noqa: E731
    assert errors(tmp_path / "res.errors.jsonl") == errors(tmp_path / "x.errors.jsonl")
