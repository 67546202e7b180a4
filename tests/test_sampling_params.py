"""SamplingParams: strict coercion, aliases, validation, the shared-defaults fast path, and the
structured-output fields (StructuredOutput, conflicts, the engine switch)."""

import pytest

from batchllm import sampling_params
from batchllm.sampling_params import InvalidStructuredOutput, SamplingParams, StructuredOutput, structured_refusal


def test_row_fields_override_defaults_and_aliases():
    d = SamplingParams(max_tokens=64, temperature=0.0)
    p = SamplingParams.from_fields({"max_new_tokens": 5, "top_k": 3.0, "stop": "END", "seed": 7}, d)
    assert (p.max_tokens, p.temperature, p.top_k, p.stop, p.seed) == (5, 0.0, 3, ("END",), 7)
    assert SamplingParams.from_fields({"max_tokens": 9, "max_completion_tokens": 5}, d).max_tokens == 9
    assert SamplingParams.from_fields({"prompt": "x", "temperature": None}, d) is d  # nothing overridden: shared


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"n": True}, "n must be an integer"),
        ({"stop": [1]}, "stop"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"logprobs": 50}, "logprobs"),
    ],
)
def test_bad_values_raise_clear_errors(fields, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams.from_fields(fields)


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"max_tokens": 1e30}, r"max_tokens must be at most 16777216 .*got 1e\+30"),
        ({"max_tokens": 2**24 + 1}, "max_tokens must be at most"),
        ({"n": 10**7}, "n must be at most 1024"),
        ({"n": 1e7}, "n must be at most 1024"),
    ],
)
def test_max_tokens_1e30_and_n_1e7_are_refused_not_clamped(fields, match):
    # issue 13: max_tokens 1e30 was silently clamped, n = 1e7 ran for minutes; both are error rows now
    with pytest.raises(ValueError, match=match):
        SamplingParams.from_fields(fields)
    assert SamplingParams.from_fields({"max_tokens": 2**24, "n": 1024}).n == 1024  # the bounds themselves pass


# ------------------------------------------------------------------------------------ structured output


def test_structured_output_is_a_hashable_picklable_value_keeping_key_order():
    import pickle

    schema = {"type": "object", "properties": {"zeta": {"type": "string"}, "alpha": {"type": "integer"}}}
    a = SamplingParams.from_fields({"guided_json": schema})
    b = SamplingParams.from_fields({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}})
    assert a == b and hash(a) == hash(b) and pickle.loads(pickle.dumps(a)) == a
    assert a.structured == StructuredOutput("json", '{"type":"object","properties":{"zeta":{"type":"string"},'
                                                    '"alpha":{"type":"integer"}}}')
    assert a.structured.spec.index("zeta") < a.structured.spec.index("alpha")  # the output's key order
    assert SamplingParams.from_fields({"structured": StructuredOutput("regex", "a")}).structured is None  # not a field


@pytest.mark.parametrize("fields,error,match", [
    ({"guided_json": {}, "guided_choice": ["a"]}, ValueError, "guided_json and guided_choice"),
    ({"guided_decoding": {"regex": "a", "grammar": "root ::= \"a\""}}, ValueError, "regex and grammar"),
    ({"guided_choice": ["a", 1]}, ValueError, "list of strings"),
    ({"guided_regex": ""}, ValueError, "non-empty string"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, ValueError, "json_schema"),
    ({"response_format": {"type": "structural_tag"}}, ValueError, "text"),
    ({"structured_outputs": {"json_object": "yes"}}, ValueError, "true or false"),
    ({"structured_outputs": {"regex": "a", "backend": "outlines"}}, ValueError, "llguidance"),
    ({"guided_json": "[1, 2"}, InvalidStructuredOutput, "not valid JSON"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "x"}}}, InvalidStructuredOutput, "valid JSON"),
])
def test_structured_output_fields_that_cannot_run(fields, error, match):
    with pytest.raises(error, match=match):
        SamplingParams.from_fields(fields)


def test_structured_output_replaces_the_defaults_constraint():
    d = SamplingParams(structured=StructuredOutput("choice", '["a"]'))
    assert SamplingParams.from_fields({"guided_regex": "b+"}, d).structured == StructuredOutput("regex", "b+")
    assert SamplingParams.from_fields({"response_format": {"type": "text"}}, d).structured is None
    assert SamplingParams.from_fields({"structured_outputs": {"disable_any_whitespace": True}}, d).structured is None
    assert SamplingParams.from_fields({"temperature": 0}, d).structured == d.structured
    with pytest.raises(ValueError, match="kind"):
        StructuredOutput("yaml", "x")


def test_structured_refusal_follows_the_engine_switch(monkeypatch):
    p = SamplingParams.from_fields({"guided_choice": ["a", "b"]})
    monkeypatch.setattr(sampling_params, "STRUCTURED_OUTPUT_APPLIED", False)
    assert structured_refusal(SamplingParams()) is None
    assert "not yet applied" in structured_refusal(p)
    monkeypatch.setattr(sampling_params, "STRUCTURED_OUTPUT_APPLIED", True)
    assert structured_refusal(p) is None
