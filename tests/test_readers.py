"""Tests for batchllm.io.readers: every input format, the row rules, column mapping and row accounting."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchllm.errors import BatchLLMError
from batchllm.io import requests as rq
from batchllm.io.readers import ColumnMapping, count_rows, detect_format, read_requests
from batchllm.io.requests import Request, RowError
from batchllm.sampling_params import SamplingParams


def write_jsonl(path, lines):
    """Write ``lines`` (dicts as JSON, strings verbatim) one per line; returns the path as a string."""
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return str(path)


def read(paths, **kwargs):
    return list(read_requests(paths, **kwargs))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep datasets' Arrow cache for CSV / JSON conversions inside the test's folder."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return datasets


# ------------------------------------------------------------------------------------------ native JSONL


def test_native_jsonl_prompt_kinds_aliases_and_nested_sampling(tmp_path):
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"custom_id": "a", "prompt": "Hello", "max_new_tokens": 7},
            {
                "custom_id": "b",
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}
                ],
                "max_completion_tokens": 9,
                "temperature": 0.5,
            },
            {
                "custom_id": "c",
                "prompt_token_ids": [1, 2, 3],
                "temperature": 0.9,
                "sampling_params": {"temperature": 0.0, "max_new_tokens": 3},
            },
            {"prompt": "p", "temperature": None, "stop": "###", "logprobs": True},
        ],
    )
    defaults = SamplingParams(max_tokens=50, temperature=0.3)
    a, b, c, d = read([path], defaults=defaults)
    assert (a.custom_id, a.prompt, a.sampling.max_tokens, a.sampling.temperature) == ("a", "Hello", 7, 0.3)
    assert (
        b.messages == [{"role": "user", "content": "x\ny"}]
        and b.sampling.max_tokens == 9
        and b.sampling.temperature == 0.5
    )
    # nested overrides flat; the nested alias still maps to max_tokens
    assert c.prompt_token_ids == [1, 2, 3] and c.sampling.temperature == 0.0 and c.sampling.max_tokens == 3
    # null = not given; default custom_id is the line index with one input file
    assert (
        d.custom_id == "3"
        and d.sampling.temperature == 0.3
        and d.sampling.stop == ("###",)
        and d.sampling.logprobs == 0
    )
    assert a.input_file == path and [r.input_index for r in (a, b, c, d)] == [0, 1, 2, 3]


def test_rows_without_sampling_fields_share_the_defaults(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    defaults = SamplingParams(max_tokens=5)
    (r,) = read([path], defaults=defaults)
    assert r.sampling is defaults


def test_malformed_lines_among_good_ones_keep_indices(tmp_path):
    long_bad = '{"prompt": "' + "z" * 500
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [{"prompt": "ok"}, "{not json", "", "   ", "[1, 2]", long_bad, '"str"', {"prompt": "ok2"}],
    )
    out = read([path])
    assert [(type(r).__name__, r.input_index) for r in out] == [
        ("Request", 0),
        ("RowError", 1),
        ("RowError", 4),
        ("RowError", 5),
        ("RowError", 6),
        ("Request", 7),
    ]
    assert all(r.error_code == rq.MALFORMED_JSON for r in out[1:5])
    assert "{not json" in out[1].error_message
    assert "array" in out[2].error_message
    assert out[3].error_message.endswith("...") and len(out[3].error_message) < 300
    assert out[5].custom_id == "7"


def test_invalid_utf8_line_is_malformed(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff\xfe"}\n')
    out = read([str(path)])
    assert isinstance(out[0], Request) and out[1].error_code == rq.MALFORMED_JSON


@pytest.mark.parametrize(
    "row, code, fragment",
    [
        ({"custom_id": "x"}, rq.MISSING_PROMPT, "none of"),
        (
            {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
            rq.AMBIGUOUS_PROMPT,
            "'prompt' and 'messages'",
        ),
        ({"prompt": "a", "prompt_token_ids": [1]}, rq.AMBIGUOUS_PROMPT, "prompt_token_ids"),
        ({"prompt": ""}, rq.MISSING_PROMPT, "empty"),
        ({"prompt": 5}, rq.INVALID_PARAMETER, "string"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
            rq.INVALID_MESSAGES,
            "unknown role 'robot' in message 2",
        ),
        ({"messages": [{"content": "a"}]}, rq.INVALID_MESSAGES, "message 1 has no role"),
        ({"messages": []}, rq.INVALID_MESSAGES, "non-empty"),
        ({"messages": "hi"}, rq.INVALID_MESSAGES, "non-empty list"),
        ({"messages": ["hi"]}, rq.INVALID_MESSAGES, "message 1 is not an object"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
            rq.INVALID_MESSAGES,
            "'image_url' is not supported",
        ),
        ({"messages": [{"role": "user", "content": 3}]}, rq.INVALID_MESSAGES, "content must be"),
        ({"prompt_token_ids": [1, -2]}, rq.INVALID_PARAMETER, "non-negative"),
        ({"prompt_token_ids": []}, rq.INVALID_PARAMETER, "non-empty"),
        ({"prompt_token_ids": [1, True]}, rq.INVALID_PARAMETER, "non-negative"),
        ({"prompt": "a", "temperature": "hot"}, rq.INVALID_PARAMETER, "temperature"),
        ({"prompt": "a", "max_tokens": 1.5}, rq.INVALID_PARAMETER, "max_tokens"),
        (
            {"prompt": "a", "sampling_params": {"temprature": 0}},
            rq.INVALID_PARAMETER,
            "unknown sampling parameter 'temprature'",
        ),
        ({"prompt": "a", "sampling_params": [1]}, rq.INVALID_PARAMETER, "sampling_params must be an object"),
        ({"prompt": "a", "custom_id": ["x"]}, rq.INVALID_PARAMETER, "custom_id"),
        ({"prompt": "a", "custom_id": ""}, rq.INVALID_PARAMETER, "custom_id"),
    ],
)
def test_row_errors(tmp_path, row, code, fragment):
    (out,) = read([write_jsonl(tmp_path / "in.jsonl", [row])])
    assert isinstance(out, RowError) and out.error_code == code, out
    assert fragment in out.error_message


def test_message_extras_and_tool_calls_pass_through(tmp_path):
    msgs = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "t1"}]},
        {"role": "tool", "content": "r", "tool_call_id": "t1", "name": None},
    ]
    (r,) = read([write_jsonl(tmp_path / "in.jsonl", [{"messages": msgs}])])
    assert r.messages[2] == {"role": "assistant", "content": None, "tool_calls": [{"id": "t1"}]}
    assert r.messages[3] == {"role": "tool", "content": "r", "tool_call_id": "t1"}


def test_legacy_dict_of_lists_messages_and_null_unknown_nested_keys(tmp_path):
    row = {
        "messages": {"role": ["system", "user"], "content": ["s", "u"]},
        "sampling_params": {"best_of": None, "n": 2},
    }
    (r,) = read([write_jsonl(tmp_path / "in.jsonl", [row])])
    assert r.messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}] and r.sampling.n == 2


def test_error_keeps_known_custom_id(tmp_path):
    (e,) = read([write_jsonl(tmp_path / "in.jsonl", [{"custom_id": 12, "prompt": "a", "top_p": 2}])])
    assert e.custom_id == "12" and e.error_code == rq.INVALID_PARAMETER and "top_p" in e.error_message


# ----------------------------------------------------------------------------------------------- Parquet


def test_parquet_nullable_and_list_columns(tmp_path):
    msg_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string()), ("name", pa.string())]))
    table = pa.table(
        {
            "custom_id": pa.array([10, 11, 12, 13, 14], pa.int64()),
            "prompt": pa.array(["p0", None, None, "p3", None]),
            "messages": pa.array([None, [{"role": "user", "content": "hi", "name": None}], None, None, None], msg_type),
            "prompt_token_ids": pa.array([None, None, [5, 6], None, None], pa.list_(pa.int64())),
            "temperature": pa.array([0.5, float("nan"), None, 0.1, 0.2]),
            "max_tokens": pa.array([None, 4, None, None, None], pa.int64()),
            "sampling_params": pa.array(
                [None, None, {"top_k": 5, "seed": None}, None, None],
                pa.struct([("top_k", pa.int64()), ("seed", pa.int64())]),
            ),
            "unused": pa.array(["x"] * 5),
        }
    )
    path = str(tmp_path / "in.parquet")
    pq.write_table(table, path, row_group_size=2)
    out = read([path], batch_rows=2)
    assert [r.custom_id for r in out] == ["10", "11", "12", "13", "14"]
    assert out[0].prompt == "p0" and out[0].sampling.temperature == 0.5
    assert out[1].messages == [{"role": "user", "content": "hi"}] and out[1].sampling.temperature == 1.0
    assert out[1].sampling.max_tokens == 4
    assert out[2].prompt_token_ids == [5, 6] and out[2].sampling.top_k == 5 and out[2].sampling.seed is None
    assert out[3].prompt == "p3"
    assert out[4].error_code == rq.MISSING_PROMPT and out[4].input_index == 4
    assert count_rows([path]) == 5


def test_parquet_mapped_column_missing_raises(tmp_path):
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"text": ["a"]}), path)
    with pytest.raises(BatchLLMError, match="no column 'question'"):
        read([path], mapping=ColumnMapping(prompt_column="question"))
    with pytest.raises(BatchLLMError, match="no column 'ctx'"):
        read([path], mapping=ColumnMapping(prompt_template="{text} {ctx}"))


def test_corrupt_parquet_raises(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(BatchLLMError, match="cannot read"):
        read([str(path)])
    with pytest.raises(BatchLLMError, match="cannot read"):
        count_rows([str(path)])


# ------------------------------------------------------------------------------------------ OpenAI batch


def openai_line(cid, url="/v1/chat/completions", method="POST", **body):
    return {"custom_id": cid, "method": method, "url": url, "body": {"model": "gpt-x", **body}}


def test_openai_batch_chat_completions_and_errors(tmp_path):
    chat = [{"role": "user", "content": "hi"}]
    path = write_jsonl(
        tmp_path / "batch.jsonl",
        [
            openai_line(
                "c1", messages=chat, max_completion_tokens=11, temperature=0, logprobs=True, top_logprobs=3, seed=4
            ),
            openai_line("c2", url="/v1/completions", prompt="Once", max_tokens=5, logprobs=2, stop=["\n"]),
            openai_line("c3", url="/v1/completions", prompt=[1, 2, 3]),
            openai_line("c4", url="/v1/completions", prompt=["a", "b"]),
            openai_line("c5", url="/v1/embeddings", input="x"),
            openai_line("c6", method="GET", messages=chat),
            openai_line("c7", messages=chat, logprobs=True),
            openai_line("c8", messages=chat, top_logprobs=2),
            openai_line(None, messages=chat),
            {"custom_id": "c10", "method": "POST", "url": "/v1/chat/completions"},
            openai_line("c11"),
            openai_line("c12", messages=chat, top_k=3, repetition_penalty=1.1),
        ],
    )
    assert detect_format(path) == "openai"
    out = read([path])
    c1, c2, c3 = out[:3]
    assert c1.messages == chat and c1.sampling.max_tokens == 11 and c1.sampling.logprobs == 3 and c1.sampling.seed == 4
    assert c1.sampling.temperature == 0.0
    assert (
        c2.prompt == "Once"
        and c2.sampling.logprobs == 2
        and c2.sampling.stop == ("\n",)
        and c2.sampling.max_tokens == 5
    )
    assert c3.prompt_token_ids == [1, 2, 3]
    codes = {r.custom_id: r.error_code for r in out if isinstance(r, RowError)}
    assert codes == {
        "c4": rq.INVALID_PARAMETER,
        "c5": rq.UNSUPPORTED_ENDPOINT,
        "c6": rq.UNSUPPORTED_ENDPOINT,
        "c8": rq.INVALID_PARAMETER,
        None: rq.INVALID_PARAMETER,
        "c10": rq.INVALID_PARAMETER,
        "c11": rq.MISSING_PROMPT,
    }
    assert out[6].sampling.logprobs == 0
    assert out[11].sampling.top_k == 3 and out[11].sampling.repetition_penalty == 1.1


def test_openai_detection_skips_a_malformed_first_line(tmp_path):
    path = write_jsonl(
        tmp_path / "b.jsonl", ["", "{oops", openai_line("a", messages=[{"role": "user", "content": "x"}])]
    )
    assert detect_format(path) == "openai"
    err, ok = read([path])
    assert err.input_index == 1 and err.error_code == rq.MALFORMED_JSON and ok.custom_id == "a" and ok.input_index == 2


def test_openai_rejects_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [openai_line("a", messages=[{"role": "user", "content": "x"}])])
    with pytest.raises(BatchLLMError, match="OpenAI"):
        read([path], mapping=ColumnMapping(prompt_template="{x}"))


def test_system_prompt_prepends_to_chats_and_refuses_raw_prompts(tmp_path):
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"messages": [{"role": "user", "content": "q"}]},
            {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "q"}]},
            {"prompt": "raw"},
        ],
    )
    a, b, c = read([path], mapping=ColumnMapping(system_prompt="S"))
    assert a.messages[0] == {"role": "system", "content": "S"} and len(a.messages) == 2
    assert b.messages[0]["content"] == "own" and len(b.messages) == 2
    # a raw prompt cannot take a system message (without --chat): an error record, never silently dropped
    assert isinstance(c, RowError) and c.error_code == rq.INVALID_PARAMETER and "add --chat" in c.error_message


# ---------------------------------------------------------------------------------------------- datasets


def test_hf_save_to_disk_dataset_and_dict(tmp_path, hf_cache):
    datasets = hf_cache
    ds = datasets.Dataset.from_dict(
        {"prompt": ["a", "b", None], "messages": [None, None, [{"role": "user", "content": "m"}]]}
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    assert detect_format(str(tmp_path / "ds")) == "hf-disk"
    out = read([str(tmp_path / "ds")], batch_rows=2)
    assert [r.prompt for r in out[:2]] == ["a", "b"] and out[2].messages == [{"role": "user", "content": "m"}]
    assert count_rows([str(tmp_path / "ds")]) == 3

    datasets.DatasetDict({"test": ds, "train": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    # several splits: no silent "train" (issue 15); --split picks one
    with pytest.raises(BatchLLMError, match="splits test, train: choose one with --split"):
        read([str(tmp_path / "dd")])
    assert [r.prompt for r in read([str(tmp_path / "dd")], split="train")] == ["a"]
    datasets.DatasetDict({"test": ds.select([1])}).save_to_disk(str(tmp_path / "one"))
    assert [r.prompt for r in read([str(tmp_path / "one")])] == ["b"]
    datasets.DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(BatchLLMError, match="splits a, b"):
        read([str(tmp_path / "two")])


def test_csv_and_json_array_through_datasets(tmp_path, hf_cache):
    csv = tmp_path / "in.csv"
    csv.write_text("id,question,temperature,max_tokens\nq1,What is 2+2?,0.5,\nq2,Why?,,8\n")
    template = ColumnMapping(id_column="id", prompt_template="Q: {question}\nA:")
    assert detect_format(str(csv)) == "hf-file" and count_rows([str(csv)]) is None
    a, b = read([str(csv)], mapping=template)
    assert (a.custom_id, a.prompt, a.sampling.temperature, a.sampling.max_tokens) == (
        "q1",
        "Q: What is 2+2?\nA:",
        0.5,
        256,
    )
    assert (b.custom_id, b.sampling.temperature, b.sampling.max_tokens) == ("q2", 1.0, 8)

    # an id column with a gap loads as floats: integral floats read as integers; the gap is a null id, an
    # error row (issue 13: defaulting it to the row index could collide with another row's id)
    gaps = tmp_path / "gaps.csv"
    gaps.write_text("custom_id,prompt\n5,a\n,b\n7,c\n")
    five, gap, seven = read([str(gaps)])
    assert (five.custom_id, seven.custom_id) == ("5", "7")
    assert isinstance(gap, RowError) and gap.error_code == rq.INVALID_PARAMETER and "null" in gap.error_message

    arr = tmp_path / "in.json"
    arr.write_text(json.dumps([{"prompt": "x"}, {"prompt": "y"}]))
    assert detect_format(str(arr)) == "hf-file"
    assert [(r.custom_id, r.prompt) for r in read([str(arr)])] == [("0", "x"), ("1", "y")]
    arr.write_text(json.dumps([{"prompt": "x"}, {"prompt": "y", "custom_id": "k"}]))  # datasets fills the gap with null
    x, y = read([str(arr)])
    assert x.error_code == rq.INVALID_PARAMETER and (y.custom_id, y.prompt) == ("k", "y")


# ------------------------------------------------------------------------------ column mapping, template


def test_column_mapping_renames_sources(tmp_path):
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"uid": "u1", "text": "t", "prompt": "ignored data?"},
            {"uid": "u2", "conv": [{"role": "user", "content": "c"}]},
        ],
    )
    a, b = read([path], mapping=ColumnMapping(id_column="uid", prompt_column="text", messages_column="conv"))
    assert (a.custom_id, a.prompt) == ("u1", "t")
    assert (b.custom_id, b.messages) == ("u2", [{"role": "user", "content": "c"}])


def test_prompt_template_renders_and_reports_missing_fields(tmp_path):
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [{"q": "why", "n_shots": 3}, {"n_shots": 1}, {"q": None, "n_shots": 1}, {"q": "x", "n_shots": "many"}],
    )
    mapping = ColumnMapping(prompt_template="[{n_shots:>2}] {q!r}")
    ok, missing, null, badspec = read([path], mapping=mapping)
    assert ok.prompt == "[ 3] 'why'" and ok.sampling.n == 1  # n_shots is data, not a sampling field
    assert missing.error_code == rq.TEMPLATE_ERROR and "'q'" in missing.error_message
    assert null.error_code == rq.TEMPLATE_ERROR and "null" in null.error_message
    assert badspec.prompt == "[many] 'x'"


@pytest.mark.parametrize("template", ["{x.__class__}", "{x[0]}", "{}", "{0}", "{x:{y.z}}", "{x", "}{"])
def test_prompt_template_rejects_non_plain_fields(tmp_path, template):
    path = write_jsonl(tmp_path / "in.jsonl", [{"x": "a", "y": "b"}])
    with pytest.raises(BatchLLMError, match="template"):
        read([path], mapping=ColumnMapping(prompt_template=template))


def test_prompt_template_conflicts_with_prompt_columns(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"x": "a"}])
    with pytest.raises(BatchLLMError, match="cannot be combined"):
        read([path], mapping=ColumnMapping(prompt_template="{x}", messages_column="m"))


def test_template_with_format_spec_error_is_a_row_error(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"x": "text"}, {"x": 4}])
    bad, good = read([path], mapping=ColumnMapping(prompt_template="{x:d}"))
    assert bad.error_code == rq.TEMPLATE_ERROR and good.prompt == "4"


# ------------------------------------------------------------------------------------ ids and duplicates


def test_duplicate_ids_across_files_and_default_ids(tmp_path):
    f1 = write_jsonl(tmp_path / "one.jsonl", [{"custom_id": "x", "prompt": "a"}, {"prompt": "b"}])
    f2 = write_jsonl(
        tmp_path / "two.jsonl",
        ["", {"custom_id": "x", "prompt": "c"}, {"custom_id": "one.jsonl:1", "prompt": "d"}, {"prompt": "e"}],
    )
    out = read([f1, f2])
    assert [r.custom_id for r in out] == ["x", "one.jsonl:1", "x", "one.jsonl:1", "two.jsonl:3"]
    assert [type(r).__name__ for r in out] == ["Request", "Request", "RowError", "RowError", "Request"]
    assert out[2].error_code == rq.DUPLICATE_CUSTOM_ID and out[2].input_file == f2 and out[2].input_index == 1
    # the id of a failed row is still taken: the first occurrence keeps its fate
    f3 = write_jsonl(tmp_path / "three.jsonl", [{"custom_id": "y"}, {"custom_id": "y", "prompt": "ok"}])
    first, second = read([f3])
    assert first.error_code == rq.MISSING_PROMPT and second.error_code == rq.DUPLICATE_CUSTOM_ID


def test_a_single_path_string_is_one_file(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    assert [r.custom_id for r in read(path)] == ["0"]


# ------------------------------------------------------------------------------ detection and job errors


def test_detect_format_and_job_level_errors(tmp_path):
    assert detect_format(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}])) == "jsonl"
    assert detect_format(write_jsonl(tmp_path / "a.ndjson", [{"prompt": "x"}])) == "jsonl"
    assert detect_format(write_jsonl(tmp_path / "lines.json", [{"prompt": "x"}])) == "jsonl"
    pq.write_table(pa.table({"prompt": ["x"]}), str(tmp_path / "a.parquet"))
    assert detect_format(str(tmp_path / "a.parquet")) == "parquet"
    with pytest.raises(BatchLLMError, match="not found"):
        detect_format(str(tmp_path / "nope.jsonl"))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(BatchLLMError, match="unknown input format"):
        detect_format(str(tmp_path / "a.txt"))
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(BatchLLMError, match="empty"):
        read([str(tmp_path / "empty.jsonl")])
    (tmp_path / "folder").mkdir()
    with pytest.raises(BatchLLMError, match="not a datasets"):
        detect_format(str(tmp_path / "folder"))
    with pytest.raises(BatchLLMError, match="no input"):
        read([])
    # every path is checked before the first row is yielded
    with pytest.raises(BatchLLMError, match="not found"):
        read_requests([str(tmp_path / "a.jsonl"), str(tmp_path / "missing.parquet")])


def test_count_rows(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}, "", "{bad", {"prompt": "y"}])
    pq.write_table(pa.table({"prompt": ["x"] * 7}), str(tmp_path / "b.parquet"))
    assert count_rows([a]) == 3 == len(read([a]))
    assert count_rows([a, str(tmp_path / "b.parquet")]) == 10


# -------------------------------------------------------------------------------- property: alignment

_KINDS = ["ok", "messages", "malformed", "blank", "missing", "badparam", "array"]


def _line(kind, i):
    return {
        "ok": {"prompt": f"p{i}", "max_tokens": 1 + i % 5},
        "messages": {"messages": [{"role": "user", "content": f"m{i}"}]},
        "malformed": '{"prompt": ',
        "blank": "",
        "missing": {"custom_id": f"id{i}"},
        "badparam": {"prompt": "x", "temperature": -1},
        "array": "[]",
    }[kind]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(_KINDS), min_size=1, max_size=30))
def test_every_non_blank_line_yields_one_record_at_its_line(tmp_path, kinds):
    if all(k == "blank" for k in kinds):
        kinds = kinds + ["ok"]
    path = write_jsonl(tmp_path / "prop.jsonl", [_line(k, i) for i, k in enumerate(kinds)])
    out = read([path])
    expected = [(i, k) for i, k in enumerate(kinds) if k != "blank"]
    assert [r.input_index for r in out] == [i for i, _ in expected]
    for r, (i, k) in zip(out, expected):
        assert isinstance(r, Request) == (k in ("ok", "messages"))
        if isinstance(r, Request):
            assert r.custom_id == str(i)
    assert count_rows([path]) == len(out)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    temps=st.lists(st.one_of(st.none(), st.just(math.nan), st.floats(0, 2)), min_size=1, max_size=20),
    batch_rows=st.integers(1, 7),
)
def test_parquet_batches_keep_order_and_nulls(tmp_path, temps, batch_rows):
    path = str(tmp_path / "prop.parquet")
    pq.write_table(
        pa.table({"prompt": [f"p{i}" for i in range(len(temps))], "temperature": pa.array(temps, pa.float64())}), path
    )
    out = read([path], batch_rows=batch_rows, defaults=SamplingParams(temperature=0.7))
    assert [r.prompt for r in out] == [f"p{i}" for i in range(len(temps))]
    for r, t in zip(out, temps):
        assert r.sampling.temperature == (0.7 if t is None or math.isnan(t) else t)
