"""SamplingParams: strict coercion, aliases, validation, and the shared-defaults fast path."""

import pytest

from batchllm.sampling_params import SamplingParams


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
