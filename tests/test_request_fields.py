"""Request fields batchllm does not implement (unsupported_parameter), --chat / --system-prompt, and
--keep-columns (input columns carried into the output rows): readers, run_job on dummy:tiny, the CLI."""

from __future__ import annotations

import copy
import dataclasses
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.job_utils import run_main

from batchllm.config import JobConfig
from batchllm.errors import BatchLLMError
from batchllm.io import requests as rq
from batchllm.io.readers import ColumnMapping, read_requests, resolve_keep_columns
from batchllm.io.requests import Request, RowError
from batchllm.io.writer import OUTPUT_SCHEMA, read_results
from batchllm.pipeline import run_job
from batchllm import sampling_params
from batchllm.sampling_params import UNSUPPORTED_FIELDS, SamplingParams, StructuredOutput, unsupported_field

BASE = dict(model="dummy:tiny", device="cpu", dtype="float32", max_tokens=4, temperature=0.0, preview=0)
CHAT = [{"role": "user", "content": "hi"}]


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def read(paths, **kw):
    return list(read_requests(paths, **kw))


def openai_line(cid, url="/v1/chat/completions", **body):
    body.setdefault("messages" if url.endswith("chat/completions") else "prompt", CHAT if "chat" in url else "hi")
    return {"custom_id": cid, "method": "POST", "url": url, "body": {"model": "gpt-4o-mini", **body}}


# ------------------------------------------------------------------------------ unsupported parameters

CHANGING = [
    ("guided_whitespace_pattern", " *"), ("guided_decoding_backend", "outlines"), ("use_beam_search", True), ("best_of", 3), ("lora_request", {"lora_name": "x"}),
    ("echo", True), ("logit_bias", {"50256": -100}), ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "required"), ("functions", [{"name": "f"}]), ("stream", True), ("include_stop_str_in_output", True),
]
NEUTRAL = [("stream", False), ("logit_bias", {}), ("echo", False), ("best_of", 1), ("use_beam_search", False),
           ("response_format", {"type": "text"}), ("tools", []), ("tool_choice", "none"), ("skip_special_tokens", True)]


@pytest.mark.parametrize("name,value", CHANGING)
def test_flat_row_field_batchllm_lacks_is_an_error_row_naming_it(tmp_path, name, value):
    path = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "a", "prompt": "p", name: value}, {"custom_id": "b", "prompt": "p"}])
    bad, ok = read([path])
    assert isinstance(bad, RowError) and bad.error_code == rq.UNSUPPORTED_PARAMETER == "unsupported_parameter"
    assert bad.error_message.startswith(f"{name} = ") and "not supported" in bad.error_message and bad.custom_id == "a"
    assert isinstance(ok, Request)


@pytest.mark.parametrize("name,value", CHANGING)
def test_openai_body_field_batchllm_lacks_is_an_error_row(tmp_path, name, value):
    path = write_jsonl(tmp_path / "b.jsonl", [openai_line("a", **{name: value})])
    (bad,) = read([path])
    assert bad.error_code == rq.UNSUPPORTED_PARAMETER and bad.error_message.startswith(f"{name} = ")


@pytest.mark.parametrize("name,value", NEUTRAL)
def test_neutral_values_are_accepted_in_rows_and_bodies(tmp_path, name, value):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", name: value}])
    body = write_jsonl(tmp_path / "b.jsonl", [openai_line("a", **{name: value}),
                                             openai_line("b", url="/v1/completions", **{name: value})])
    assert all(isinstance(r, Request) for r in read([path]) + read([body]))


def test_best_of_equal_to_n_is_accepted_and_other_values_are_not(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "n": 3, "best_of": 3}, {"prompt": "p", "n": 2, "best_of": 3},
                                              {"prompt": "p", "best_of": 2}])
    same, more, default_n = read([path])
    assert isinstance(same, Request) and same.sampling.n == 3
    assert more.error_code == default_n.error_code == rq.UNSUPPORTED_PARAMETER and "must equal n (2)" in more.error_message


def test_null_means_not_given(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "guided_json": None, "response_format": None}])
    assert isinstance(read([path])[0], Request)


def test_body_accepts_fields_that_change_nothing_and_refuses_unknown_ones(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [
        openai_line("ok", user="u1", metadata={"k": "v"}, store=False, stream=False, n=2, seed=1, top_logprobs=2, logprobs=True),
        openai_line("typo", temprature=0.5),
        openai_line("wrong-url", prompt="x"),
        openai_line("comp-top", url="/v1/completions", top_logprobs=2),
    ])
    ok, typo, wrong, comp = read([path])
    assert isinstance(ok, Request) and ok.sampling.n == 2 and ok.sampling.logprobs == 2
    assert typo.error_code == rq.UNSUPPORTED_PARAMETER and "unknown field 'temprature'" in typo.error_message
    assert wrong.error_code == rq.UNSUPPORTED_PARAMETER and "'prompt' is not a field of /v1/chat/completions" in wrong.error_message
    assert comp.error_code == rq.UNSUPPORTED_PARAMETER and "logprobs: K" in comp.error_message


def test_flat_data_columns_stay_data(tmp_path):
    # names that are not request parameters are data; a flat column the job names (template field, kept
    # column, mapped column) is data even when it has a request parameter's name
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "documents": ["d"], "user": "x", "foo": 1, "tools": ["t"]}])
    (r,) = read([path], keep={"tools": True})
    assert isinstance(r, Request)
    (t,) = read([path], mapping=ColumnMapping(prompt_template="{prompt} {tools}"))
    assert isinstance(t, Request) and t.prompt == "p ['t']"
    (e,) = read([path])
    assert e.error_code == rq.UNSUPPORTED_PARAMETER and e.error_message.startswith("tools = ")


def test_nested_sampling_params(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "p", "sampling_params": {"use_beam_search": True}},
        {"prompt": "p", "sampling_params": {"use_beam_search": False, "detokenize": True}},
        {"prompt": "p", "sampling_params": {"temprature": 1}},
    ])
    beam, neutral, typo = read([path])
    assert beam.error_code == rq.UNSUPPORTED_PARAMETER and isinstance(neutral, Request)
    assert typo.error_code == rq.INVALID_PARAMETER and "unknown sampling parameter 'temprature'" in typo.error_message


def test_parquet_columns_are_checked_too(tmp_path):
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "guided_regex": [None, "x+", None], "echo": [None, None, True]}), path)
    ok, regex, echo = read([path])
    assert isinstance(ok, Request) and ok.sampling.structured is None
    assert isinstance(regex, Request) and regex.sampling.structured == StructuredOutput("regex", "x+")
    assert echo.error_code == rq.UNSUPPORTED_PARAMETER and echo.error_message.startswith("echo = ")


def test_prompt_logprobs_is_read_from_flat_rows_and_openai_bodies(tmp_path):
    flat = write_jsonl(tmp_path / "f.jsonl", [{"custom_id": "a", "prompt": "hi", "prompt_logprobs": 2}])
    body = write_jsonl(tmp_path / "b.jsonl", [openai_line("b", prompt_logprobs=0)])
    (a,) = read([flat])
    (b,) = read([body])
    assert a.sampling.prompt_logprobs == 2 and b.sampling.prompt_logprobs == 0
    assert "prompt_logprobs" not in UNSUPPORTED_FIELDS


def test_unsupported_field_helper():
    assert unsupported_field({"best_of": 2}, n=2) is None
    assert unsupported_field({"top_logprobs": 2}, n=1, chat=True) is None
    assert unsupported_field({"top_logprobs": 2}, n=1)[0] == "top_logprobs"
    assert unsupported_field({"prompt_logprobs": 1, "echo": True}, n=1, names=["echo"])[0] == "echo"
    assert {"guided_whitespace_pattern", "use_beam_search", "best_of", "lora_request", "echo",
            "logit_bias", "tools", "tool_choice", "functions"} <= set(UNSUPPORTED_FIELDS)


# ------------------------------------------------------------------------------------- structured output

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}, "required": ["b"]}
SCHEMA_TEXT = '{"type":"object","properties":{"b":{"type":"integer"},"a":{"type":"string"}},"required":["b"]}'
STRUCTURED = [  # (field, value, the StructuredOutput it asks for)
    ("response_format", {"type": "json_object"}, StructuredOutput("json", '{"type":"object"}')),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}},
     StructuredOutput("json", SCHEMA_TEXT)),
    ("guided_json", SCHEMA, StructuredOutput("json", SCHEMA_TEXT)),
    ("guided_json", json.dumps(SCHEMA), StructuredOutput("json", SCHEMA_TEXT)),
    ("guided_regex", "[0-9]{3}", StructuredOutput("regex", "[0-9]{3}")),
    ("guided_choice", ["yes", "no"], StructuredOutput("choice", '["yes", "no"]')),
    ("guided_grammar", 'root ::= "a"+', StructuredOutput("grammar", 'root ::= "a"+')),
    ("structured_outputs", {"json": SCHEMA, "disable_any_whitespace": True}, StructuredOutput("json", SCHEMA_TEXT, False)),
    ("structured_outputs", {"json_object": True}, StructuredOutput("json", '{"type":"object"}')),
    ("structured_outputs", {"choice": ["a"], "regex": None}, StructuredOutput("choice", '["a"]')),
    ("guided_decoding", {"grammar": "start: /[ab]+/"}, StructuredOutput("grammar", "start: /[ab]+/")),
]


@pytest.fixture
def applied(monkeypatch):
    """The engine applies structured output (the switch the engine's wiring flips)."""
    monkeypatch.setattr(sampling_params, "STRUCTURED_OUTPUT_APPLIED", True)


@pytest.mark.parametrize("name,value,expected", STRUCTURED)
def test_structured_output_rows_are_refused_while_the_engine_does_not_apply_them(tmp_path, monkeypatch, name, value,
                                                                                 expected):
    monkeypatch.setattr(sampling_params, "STRUCTURED_OUTPUT_APPLIED", False)
    flat = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "a", "prompt": "p", name: value}, {"custom_id": "b", "prompt": "p"},
                                              {"prompt": "p", "sampling_params": {name: value}}])
    body = write_jsonl(tmp_path / "b.jsonl", [openai_line("c", **{name: value}),
                                             openai_line("d", url="/v1/completions", **{name: value})])
    bad, ok, nested = read([flat])
    assert isinstance(ok, Request) and ok.sampling.structured is None
    for row in (bad, nested, *read([body])):
        assert row.error_code == rq.UNSUPPORTED_PARAMETER
        assert row.error_message == (f"structured output ({expected.kind}) is not yet applied by batchllm's engine; "
                                     "the row would run unconstrained, so it is refused")


@pytest.mark.parametrize("name,value,expected", STRUCTURED)
def test_structured_output_fields_in_rows_nested_and_bodies(tmp_path, applied, name, value, expected):
    flat = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", name: value}, {"prompt": "p", "sampling_params": {name: value}}])
    body = write_jsonl(tmp_path / "b.jsonl", [openai_line("c", **{name: value}),
                                             openai_line("d", url="/v1/completions", **{name: value})])
    rows = read([flat]) + read([body])
    assert all(isinstance(r, Request) and r.sampling.structured == expected for r in rows)


def test_structured_output_conflicts_and_malformed_specs_are_error_rows(tmp_path, applied):
    rows = [
        {"prompt": "p", "guided_json": SCHEMA, "guided_regex": "a"},
        {"prompt": "p", "response_format": {"type": "json_object"}, "sampling_params": {"guided_choice": ["a"]}},
        {"prompt": "p", "structured_outputs": {"json": SCHEMA, "regex": "a"}},
        {"prompt": "p", "guided_json": "{not json"},
        {"prompt": "p", "guided_json": [1, 2]},
        {"prompt": "p", "guided_choice": []},
        {"prompt": "p", "response_format": {"type": "json_schema"}},
        {"prompt": "p", "structured_outputs": {"jsn": {}}},
        {"prompt": "p", "structured_outputs": {"regex": "a", "whitespace_pattern": " "}},
        {"prompt": "p", "response_format": {"type": "text"}, "guided_regex": "a+"},
        {"prompt": "p", "guided_regex": "a+", "sampling_params": {"guided_regex": "b+"}},
    ]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    two, across, inside, text, array, empty, no_schema, typo, option, text_and_regex, nested_wins = read([path])
    assert two.error_code == rq.INVALID_PARAMETER and "one structured output only, got guided_json and guided_regex" in two.error_message
    assert across.error_code == rq.INVALID_PARAMETER and "response_format and guided_choice" in across.error_message
    assert inside.error_code == rq.INVALID_PARAMETER and "json and regex" in inside.error_message
    assert text.error_code == array.error_code == rq.INVALID_STRUCTURED_OUTPUT == "invalid_structured_output"
    assert "guided_json is not valid JSON" in text.error_message and "JSON schema object" in array.error_message
    assert empty.error_code == no_schema.error_code == typo.error_code == option.error_code == rq.INVALID_PARAMETER
    assert "unknown key 'jsn' in structured_outputs" in typo.error_message
    assert "structured_outputs.whitespace_pattern" in option.error_message
    assert text_and_regex.sampling.structured == StructuredOutput("regex", "a+")  # {"type": "text"} constrains nothing
    assert nested_wins.sampling.structured == StructuredOutput("regex", "b+")


def test_structured_output_names_used_as_data_columns_stay_data(tmp_path, applied):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "response_format": "short"}])
    (r,) = read([path], mapping=ColumnMapping(prompt_template="{prompt} in {response_format}"))
    assert isinstance(r, Request) and r.prompt == "p in short" and r.sampling.structured is None
    (e,) = read([path])
    assert e.error_code == rq.INVALID_PARAMETER and "response_format must be an object" in e.error_message


def test_structured_output_in_parquet_and_over_job_defaults(tmp_path, applied):
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "guided_regex": [None, "x+", None],
                             "response_format": [None, None, json.dumps({"type": "text"})]}), path)
    defaults = SamplingParams(structured=StructuredOutput("choice", '["d"]'))
    default, regex, text = read([path], defaults=defaults)
    assert default.sampling is defaults and regex.sampling.structured == StructuredOutput("regex", "x+")
    assert text.error_code == rq.INVALID_PARAMETER  # a Parquet string is not an object
    (cleared,) = read([write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "response_format": {"type": "text"}}])],
                      defaults=defaults)
    assert cleared.sampling.structured is None


def test_guided_decoding_backend_that_keeps_the_meaning_is_accepted(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "guided_decoding_backend": b} for b in ("xgrammar", "outlines")])
    ok, other = read([path])
    assert isinstance(ok, Request) and other.error_code == rq.UNSUPPORTED_PARAMETER


# ------------------------------------------------------------------------------------- chat and system


def test_chat_wraps_prompts_and_template_renderings(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "q": "Q"}, {"messages": CHAT}, {"prompt_token_ids": [1, 2]}])
    wrapped, chat, ids = read([path], mapping=ColumnMapping(chat=True, system_prompt="S"))
    assert wrapped.messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "p"}] and wrapped.prompt is None
    assert chat.messages[0] == {"role": "system", "content": "S"}
    assert ids.error_code == rq.INVALID_PARAMETER and "--chat cannot wrap prompt_token_ids" in ids.error_message
    (t, *_) = read([path], mapping=ColumnMapping(prompt_template="Q: {q}", chat=True))
    assert t.messages == [{"role": "user", "content": "Q: Q"}]


def test_system_prompt_that_cannot_apply_is_never_dropped(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "q": "Q"}])
    with pytest.raises(BatchLLMError, match="add --chat"):
        read([path], mapping=ColumnMapping(prompt_template="{q}", system_prompt="S"))
    (raw,) = read([path], mapping=ColumnMapping(system_prompt="S"))
    assert raw.error_code == rq.INVALID_PARAMETER and "add --chat" in raw.error_message
    body = write_jsonl(tmp_path / "b.jsonl", [openai_line("c", url="/v1/completions", prompt="x")])
    (comp,) = read([body], mapping=ColumnMapping(system_prompt="S", chat=True))
    assert comp.error_code == rq.INVALID_PARAMETER and "/v1/completions" in comp.error_message


def test_chat_run_matches_a_messages_row(tiny, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "p", "prompt": "Hello"},
                                              {"custom_id": "m", "messages": [{"role": "user", "content": "Hello"}]}])
    run_job(JobConfig(inputs=[path], output=str(tmp_path / "out"), chat=True, **BASE), loaded=tiny)
    rows = {r["custom_id"]: r for r in read_results(str(tmp_path / "out")).to_pylist()}
    assert rows["p"]["token_ids"] == rows["m"]["token_ids"] and rows["p"]["prompt_tokens"] == rows["m"]["prompt_tokens"]
    assert rows["p"]["request_type"] == "chat"
    run_job(JobConfig(inputs=[path], output=str(tmp_path / "raw"), **BASE), loaded=tiny)
    raw = {r["custom_id"]: r for r in read_results(str(tmp_path / "raw")).to_pylist()}
    assert raw["p"]["prompt_tokens"] != rows["p"]["prompt_tokens"]  # without --chat the prompt is sent as it is


def test_chat_on_a_model_without_chat_template_is_one_error(tiny, tmp_path):
    tok = copy.copy(tiny.tokenizer)
    tok.chat_template = None
    bare = dataclasses.replace(tiny, tokenizer=tok)
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hello"}])
    with pytest.raises(BatchLLMError, match="--chat needs a chat template"):
        run_job(JobConfig(inputs=[path], output=str(tmp_path / "out"), chat=True, **BASE), loaded=bare)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ kept columns


def test_resolve_keep_columns_types_and_refusals(tmp_path):
    jl = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "a", "prompt": "p", "x": 1}, {"prompt": "q", "y": [1]}])
    pqa, pqb = str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")
    pq.write_table(pa.table({"prompt": ["a"], "x": pa.array([1], pa.int32()), "cat": pa.array(["u"]).dictionary_encode()}), pqa)
    pq.write_table(pa.table({"prompt": ["b"], "x": ["s"], "z": [None]}), pqb)
    reserved = OUTPUT_SCHEMA.names
    assert resolve_keep_columns([jl], "x, y", reserved=reserved) == [("x", None), ("y", None)]
    assert resolve_keep_columns([jl], "all", reserved=reserved) == [("prompt", None), ("x", None), ("y", None)]
    assert resolve_keep_columns([pqa], "x,cat", reserved=reserved) == [("x", pa.int32()), ("cat", pa.string())]
    assert resolve_keep_columns([pqa, pqb], "x,z", reserved=reserved) == [("x", None), ("z", pa.null())]  # types differ: JSON
    assert resolve_keep_columns([pqa, jl], "cat", reserved=reserved) == [("cat", None)]  # a JSON lines input: JSON
    for spec, message in [("text", "output column"), ("x,x", "named twice"), ("a,,b", "separated by commas"),
                          ("nope", "no input has a column 'nope'")]:
        with pytest.raises(BatchLLMError, match=message):
            resolve_keep_columns([pqa], spec, reserved=reserved)
    t = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"prompt": ["a"], "text": ["clash"]}), t)
    with pytest.raises(BatchLLMError, match="--keep-columns all: the input column 'text'"):
        resolve_keep_columns([t], "all", reserved=reserved)


def test_keep_columns_jsonl_as_json_text(tiny, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"custom_id": "a", "prompt": "Hello", "label": "pos", "meta": {"k": [1, 2]}},
        {"custom_id": "b", "prompt": "Hi", "label": 3},
        "{oops",
        {"custom_id": "d", "prompt": "x", "label": "neg", "echo": True},
    ])
    out = tmp_path / "out"
    run_job(JobConfig(inputs=[path], output=str(out), keep_columns="label,meta", **BASE), loaded=tiny)
    table = read_results(str(out))
    assert table.column_names == [*OUTPUT_SCHEMA.names, "label", "meta"]
    assert table.schema.field("label").type == pa.string()
    rows = {r["input_index"]: r for r in table.to_pylist()}
    assert rows[0]["label"] == '"pos"' and json.loads(rows[0]["meta"]) == {"k": [1, 2]}
    assert rows[1]["label"] == "3" and rows[1]["meta"] is None  # a row without the column: null
    assert rows[2]["error_code"] == rq.MALFORMED_JSON and rows[2]["label"] is None
    assert rows[3]["error_code"] == rq.UNSUPPORTED_PARAMETER and rows[3]["label"] == '"neg"'  # error rows keep them
    # the folder reads as a dataset with the kept columns
    direct = pq.read_table([str(p) for p in sorted(out.glob("shard-*.parquet"))])
    assert "label" in direct.column_names


def test_keep_columns_parquet_typed_and_resume(tiny, tmp_path):
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"custom_id": ["a", "b", "c"], "prompt": ["Hello", "Hi", "Hey"],
                             "score": pa.array([1.5, None, float("nan")], pa.float64()),
                             "tags": pa.array([["x"], [], None], pa.list_(pa.string()))}), path)
    out = tmp_path / "out"
    cfg = dict(inputs=[path], output=str(out), keep_columns="score,tags", shard_rows=1, **BASE)
    run_job(JobConfig(**cfg), loaded=tiny)
    table = read_results(str(out))
    assert table.schema.field("score").type == pa.float64() and table.schema.field("tags").type == pa.list_(pa.string())
    rows = {r["custom_id"]: r for r in table.to_pylist()}
    assert rows["a"]["score"] == 1.5 and rows["b"]["score"] is None and rows["c"]["score"] != rows["c"]["score"]  # NaN kept
    assert rows["a"]["tags"] == ["x"] and rows["b"]["tags"] == [] and rows["c"]["tags"] is None
    # the same job resumes (nothing left); other kept columns are another job
    summary = run_job(JobConfig(**cfg), loaded=tiny)
    assert summary.done_before == 3
    with pytest.raises(BatchLLMError, match="keep_columns"):
        run_job(JobConfig(**{**cfg, "keep_columns": "score"}), loaded=tiny)


def test_keep_columns_hf_dataset(tiny, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    folder = str(tmp_path / "ds")
    datasets.Dataset.from_dict({"prompt": ["Hello", "Hi"], "label": [0, 1], "src": ["w", "x"]}).save_to_disk(folder)
    run_job(JobConfig(inputs=[folder], output=str(tmp_path / "out"), keep_columns="all", **BASE), loaded=tiny)
    table = read_results(str(tmp_path / "out"))
    assert table.column_names[-3:] == ["prompt", "label", "src"] and table.schema.field("label").type == pa.int64()
    assert sorted(zip(table["label"].to_pylist(), table["src"].to_pylist())) == [(0, "w"), (1, "x")]


def test_greedy_outputs_unchanged_by_kept_columns(tiny, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": str(i), "prompt": f"Hello {i}", "x": i} for i in range(3)])
    run_job(JobConfig(inputs=[path], output=str(tmp_path / "a"), **BASE), loaded=tiny)
    run_job(JobConfig(inputs=[path], output=str(tmp_path / "b"), keep_columns="x", **BASE), loaded=tiny)
    a = {r["custom_id"]: r["token_ids"] for r in read_results(str(tmp_path / "a")).to_pylist()}
    b = {r["custom_id"]: r["token_ids"] for r in read_results(str(tmp_path / "b")).to_pylist()}
    assert a == b and read_results(str(tmp_path / "a")).column_names == OUTPUT_SCHEMA.names


def test_keep_columns_refused_with_replicas():
    with pytest.raises(BatchLLMError, match="--keep-columns does not work with --replicas"):
        JobConfig(inputs=["x"], output="o", keep_columns="a", replicas=2).validate()


# ----------------------------------------------------------------------------------------------- the CLI


def test_cli_flags_and_one_line_errors(tmp_path, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hello", "q": "Q"}])
    code, err = run_main(["run", path, "-o", str(tmp_path / "o1"), "-m", "dummy:tiny", "--device", "cpu",
                          "--keep-columns", "text", "-q"], capsys)
    assert code == 1 and err.strip().count("\n") == 0 and "error:" in err and "output column" in err
    code, err = run_main(["run", path, "-o", str(tmp_path / "o2"), "-m", "dummy:tiny", "--device", "cpu",
                          "--prompt-template", "{q}", "--system-prompt", "S", "-q"], capsys)
    assert code == 1 and err.strip().count("\n") == 0 and "add --chat" in err and "Traceback" not in err
    code, err = run_main(["run", path, "-o", str(tmp_path / "o3"), "-m", "dummy:tiny", "--device", "cpu", "--max-tokens", "2",
                          "--prompt-template", "{q}", "--system-prompt", "S", "--chat", "--keep-columns", "q", "-q"], capsys)
    assert code == 0, err
    (row,) = read_results(str(tmp_path / "o3")).to_pylist()
    assert row["request_type"] == "chat" and row["q"] == '"Q"' and row["error_code"] is None
