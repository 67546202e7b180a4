"""A structural checker for OpenAI Batch API output and error file lines, written from the published API
reference (Batch: "The request output object"; Chat: "The chat completion object"; Completions (legacy):
"The completion object"; both bodies' ``usage``, "CompletionUsage"): per level the required keys and
their types. Optional keys of the reference that batchllm does not write (``service_tier``,
``message.annotations``, ``message.tool_calls``, ``message.audio``) are checked when present.

``check_output_line(obj)`` / ``check_error_line(obj)`` raise AssertionError naming the path of the first
mismatch, e.g. ``response.body.usage.completion_tokens_details.reasoning_tokens: expected int``.
"""

from __future__ import annotations

from typing import Any

# A spec is a type name, a tuple of alternatives, a dict (object: key -> spec; keys ending in "?" are
# optional), ["list", spec] (array of spec), ["enum", v1, v2, ...] or ["map", spec] (object: str -> spec).
INT, NUM, STR, NULL, BOOL = "int", "num", "str", "null", "bool"

USAGE = {
    "prompt_tokens": INT,
    "completion_tokens": INT,
    "total_tokens": INT,
    "prompt_tokens_details": {"cached_tokens": INT, "audio_tokens": INT},
    "completion_tokens_details": {"reasoning_tokens": INT, "audio_tokens": INT, "accepted_prediction_tokens": INT,
                                  "rejected_prediction_tokens": INT},
}
TOP_LOGPROB = {"token": STR, "logprob": NUM, "bytes": (["list", INT], NULL)}
CHAT_LOGPROBS = {"content": (["list", {**TOP_LOGPROB, "top_logprobs": ["list", TOP_LOGPROB]}], NULL),
                 "refusal": (["list", {**TOP_LOGPROB, "top_logprobs": ["list", TOP_LOGPROB]}], NULL)}
CHAT_COMPLETION = {
    "id": STR,
    "object": ["enum", "chat.completion"],
    "created": INT,
    "model": STR,
    "choices": ["list", {
        "index": INT,
        "message": {"role": STR, "content": (STR, NULL), "refusal": (STR, NULL), "annotations?": ["list", {}],
                    "tool_calls?": ["list", {}], "audio?": ({}, NULL)},
        "logprobs": (CHAT_LOGPROBS, NULL),
        "finish_reason": ["enum", "stop", "length", "tool_calls", "content_filter", "function_call"],
    }],
    "usage": USAGE,
    "system_fingerprint?": (STR, NULL),
    "service_tier?": (STR, NULL),
}
COMPLETION_LOGPROBS = {"tokens": ["list", STR], "token_logprobs": ["list", NUM], "top_logprobs": ["list", ["map", NUM]],
                       "text_offset": ["list", INT]}
TEXT_COMPLETION = {
    "id": STR,
    "object": ["enum", "text_completion"],
    "created": INT,
    "model": STR,
    "choices": ["list", {"index": INT, "text": STR, "logprobs": (COMPLETION_LOGPROBS, NULL),
                         "finish_reason": ["enum", "stop", "length", "content_filter"]}],
    "usage": USAGE,
    "system_fingerprint?": (STR, NULL),
}
OUTPUT_LINE = {
    "id": STR,
    "custom_id": STR,
    "response": {"status_code": INT, "request_id": STR, "body": {}},  # body: checked by its object type below
    "error": NULL,
}
ERROR_LINE = {
    "id": STR,
    "custom_id": (STR, NULL),  # null: a line that could not be parsed has no custom_id (batchllm's addition)
    "response": NULL,
    "error": {"code": STR, "message": STR},
}


def check(value: Any, spec: Any, path: str = "") -> None:
    where = path or "line"
    if isinstance(spec, tuple):
        problems = []
        for alt in spec:
            try:
                check(value, alt, path)
                return
            except AssertionError as e:
                problems.append(str(e))
        raise AssertionError(" | ".join(problems))
    if isinstance(spec, dict):
        assert isinstance(value, dict), f"{where}: expected an object, got {value!r}"
        for key, sub in spec.items():
            optional = key.endswith("?")
            name = key.rstrip("?")
            if name not in value:
                assert optional, f"{where}: required key {name!r} missing"
                continue
            check(value[name], sub, f"{path}.{name}" if path else name)
        return
    if isinstance(spec, list):
        kind, *args = spec
        if kind == "list":
            assert isinstance(value, list), f"{where}: expected an array, got {value!r}"
            for i, item in enumerate(value):
                check(item, args[0], f"{where}[{i}]")
        elif kind == "map":
            assert isinstance(value, dict), f"{where}: expected an object, got {value!r}"
            for k, v in value.items():
                assert isinstance(k, str), f"{where}: key {k!r} is not a string"
                check(v, args[0], f"{where}[{k!r}]")
        elif kind == "enum":
            assert value in args, f"{where}: expected one of {args}, got {value!r}"
        return
    ok = {
        INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
        NUM: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        STR: lambda v: isinstance(v, str),
        NULL: lambda v: v is None,
        BOOL: lambda v: isinstance(v, bool),
    }[spec]
    assert ok(value), f"{where}: expected {spec}, got {value!r}"


def check_output_line(obj: dict) -> None:
    """An output file line: a 200 response whose body is a chat.completion or a text_completion."""
    check(obj, OUTPUT_LINE)
    assert obj["response"]["status_code"] == 200, f"response.status_code: expected 200, got {obj['response']['status_code']}"
    body = obj["response"]["body"]
    check(body, CHAT_COMPLETION if body.get("object") == "chat.completion" else TEXT_COMPLETION, "response.body")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], "usage: total is not the sum"
    assert usage["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"], "usage: more cached than prompt tokens"
    assert [c["index"] for c in body["choices"]] == list(range(len(body["choices"]))), "choices: indexes not 0..n-1"


def check_error_line(obj: dict) -> None:
    check(obj, ERROR_LINE)
