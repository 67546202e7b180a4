"""Per-request sampling parameters, with vLLM's names and semantics.

A row of the input file may carry any of these fields (flat or under ``sampling_params``); the job's
defaults (CLI flags, job file) fill in what a row leaves out. ``SamplingParams.from_fields`` is the one
place that validates them: a bad value raises ``ValueError`` with a message fit for an error record.
``UNSUPPORTED_FIELDS`` / ``unsupported_field``: the request fields of vLLM's and OpenAI's APIs that
batchllm does not implement, and which of their values change nothing (the readers make any other value
an ``unsupported_parameter`` error record).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

# Aliases accepted for max_tokens (transformers' and OpenAI's chat API names).
MAX_TOKENS_ALIASES = ("max_new_tokens", "max_completion_tokens")

_GREEDY_EPS = 1e-5

# Upper bounds that no real job reaches but that stop a typo (max_tokens = 1e30, n = 1e7) from running for
# hours or being silently clamped: a bad row becomes an invalid_parameter error record instead.
MAX_TOKENS_LIMIT = 1 << 24  # 16,777,216 tokens: beyond any model's context
MAX_N = 1024  # samples per request


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What to generate for one request; see vLLM's ``SamplingParams`` for the meaning of each field.

    ``seed`` is None unless the row or the job gives one; the engine then derives a per-sample seed from
    (job seed, custom_id, sample index), so sampled text never depends on batch composition or order.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.max_tokens > MAX_TOKENS_LIMIT:
            raise ValueError(f"max_tokens must be at most {MAX_TOKENS_LIMIT} (more than any model's context), got {_big(self.max_tokens)}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled), 0 (disabled) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.n > MAX_N:
            raise ValueError(f"n must be at most {MAX_N} samples per request, got {_big(self.n)}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a string or a list of non-empty strings")

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], defaults: "SamplingParams | None" = None) -> "SamplingParams":
        """Build from a row's fields over ``defaults``; unknown keys are ignored, bad values raise ValueError.

        Values are coerced strictly: a temperature of ``"hot"`` or a max_tokens of ``1.5`` is an error,
        never silently truncated. A row that overrides nothing gets ``defaults`` itself (the object is
        frozen, so a million such rows share one), which keeps reading fast.
        """
        base = defaults if defaults is not None else _DEFAULTS
        overrides: dict[str, Any] = {}
        for alias in MAX_TOKENS_ALIASES:
            if fields.get(alias) is not None and fields.get("max_tokens") is None:
                overrides["max_tokens"] = _coerce("max_tokens", fields[alias])
        for name in _FIELD_NAMES:
            value = fields.get(name)
            if value is not None:
                overrides[name] = _coerce(name, value)
        if not overrides:
            return base
        return dataclasses.replace(base, **overrides)  # __post_init__ validates the combination


_INT_FIELDS = {"max_tokens", "top_k", "n", "min_tokens"}
_OPTIONAL_INT_FIELDS = {"seed", "logprobs"}
_FLOAT_FIELDS = {"temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"}


def _coerce(name: str, value: Any) -> Any:
    if name in _INT_FIELDS or name in _OPTIONAL_INT_FIELDS:
        if value is None and name in _OPTIONAL_INT_FIELDS:
            return None
        if name == "logprobs" and isinstance(value, bool):
            # OpenAI chat: logprobs=true with top_logprobs; true alone means the sampled token only.
            return 0 if value else None
        return _as_int(name, value)
    if name in _FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)
    if name == "ignore_eos":
        if not isinstance(value, bool):
            raise ValueError(f"ignore_eos must be true or false, got {value!r}")
        return value
    if name == "stop":
        if isinstance(value, str):
            return (value,)
        if isinstance(value, (list, tuple)):
            if not all(isinstance(s, str) for s in value):
                raise ValueError(f"stop must be a string or a list of strings, got {value!r}")
            return tuple(value)
        raise ValueError(f"stop must be a string or a list of strings, got {value!r}")
    if name == "stop_token_ids":
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of integers, got {value!r}")
        return tuple(_as_int(name, v) for v in value)
    return value


def _big(value: Any) -> str:
    """A number for an error message, in scientific notation when it is huge (int(1e30) has 31 digits)."""
    return f"{value:.3g}" if isinstance(value, (int, float)) and abs(value) >= 1e12 else str(value)


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:  # numpy integer scalars from Parquet
        import numbers

        if isinstance(value, numbers.Integral):
            return int(value)
    except ImportError:  # pragma: no cover
        pass
    raise ValueError(f"{name} must be an integer, got {value!r}")


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(SamplingParams))
_DEFAULTS = SamplingParams()


# ------------------------------------------------------------------------------ fields batchllm lacks


def _equals(*neutral: Any) -> Callable[[Any], bool]:
    return lambda v: any(type(v) is type(x) and v == x for x in neutral)


def _number(x: float) -> Callable[[Any], bool]:
    return lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and v == x


# Request fields of vLLM's and OpenAI's APIs that batchllm does not implement: name -> (a test for the
# value that changes nothing, or None when every value changes the output; why / what to do instead).
# A field given with any other value makes the row an ``unsupported_parameter`` error record: running it
# without the field would give unconstrained, unranked or otherwise different text than the user asked
# for, silently. Null always means "not given". ``best_of`` is checked against the row's n separately.
_NO_STRUCTURED = "batchllm has no structured output (constrained decoding)"
_NO_TOOLS = "batchllm passes no tools to the chat template and parses no tool calls"
UNSUPPORTED_FIELDS: dict[str, tuple[Callable[[Any], bool] | None, str]] = {
    "response_format": (lambda v: v == {"type": "text"}, _NO_STRUCTURED + '; {"type": "text"} is accepted'),
    "guided_json": (None, _NO_STRUCTURED),
    "guided_regex": (None, _NO_STRUCTURED),
    "guided_choice": (None, _NO_STRUCTURED),
    "guided_grammar": (None, _NO_STRUCTURED),
    "guided_decoding": (None, _NO_STRUCTURED),
    "guided_decoding_backend": (None, _NO_STRUCTURED),
    "guided_whitespace_pattern": (None, _NO_STRUCTURED),
    "structured_outputs": (None, _NO_STRUCTURED),
    "use_beam_search": (_equals(False), "batchllm has no beam search"),
    "length_penalty": (_number(1.0), "length_penalty applies to beam search, which batchllm lacks"),
    "best_of": (None, "batchllm returns every sample it generates; use n"),
    "lora_request": (None, "batchllm serves no LoRA adapters"),
    "prompt_logprobs": (None, "batchllm returns logprobs of generated tokens only (logprobs)"),
    "echo": (_equals(False), "batchllm does not echo the prompt into the output"),
    "logit_bias": (_equals({}), "batchllm has no logit bias"),
    "allowed_token_ids": (None, "batchllm cannot restrict the vocabulary"),
    "bad_words": (_equals([]), "batchllm cannot ban words"),
    "logits_processors": (_equals([]), "batchllm runs no custom logits processors"),
    "tools": (_equals([]), _NO_TOOLS),
    "tool_choice": (_equals("none", "auto"), _NO_TOOLS + '; "none" and "auto" are accepted'),
    "functions": (_equals([]), _NO_TOOLS),
    "function_call": (_equals("none", "auto"), _NO_TOOLS + '; "none" and "auto" are accepted'),
    "include_stop_str_in_output": (_equals(False), "stop strings are always cut from the text"),
    "skip_special_tokens": (_equals(True), "special tokens are always skipped in the text"),
    "spaces_between_special_tokens": (_equals(True), "the detokenizer's spacing is fixed"),
    "truncate_prompt_tokens": (None, "batchllm never truncates a prompt (a prompt too long is an error record)"),
    "add_generation_prompt": (_equals(True), "chat prompts always end with the generation prompt"),
    "continue_final_message": (_equals(False), "chat prompts always start a new assistant message"),
    "chat_template": (None, "the job's model's chat template is used for every row"),
    "chat_template_kwargs": (None, "the chat template gets no extra arguments"),
    "return_tokens_as_token_ids": (_equals(False), "output rows carry token_ids beside the text"),
    "stream": (_equals(False), "a batch job does not stream"),
    "stream_options": (None, "a batch job does not stream"),
    "suffix": (_equals(""), "batchllm has no insertion (suffix) mode"),
    "top_logprobs": (None, "in a native row give logprobs: K instead (top_logprobs is the OpenAI chat name)"),
    "reasoning_effort": (None, "batchllm has no reasoning controls"),
    "output_kind": (None, "batchllm writes final outputs only"),
    "detokenize": (_equals(True), "outputs are always detokenized"),
    "extra_args": (None, "batchllm takes no extra sampling arguments"),
}

# In a native row's flat fields, which share the row with data columns, only names that are clearly
# request parameters count (a column called e.g. "documents" or "user" is data).
FLAT_UNSUPPORTED = frozenset(UNSUPPORTED_FIELDS) - {"output_kind", "detokenize", "extra_args"}

# Fields an OpenAI batch body may carry that change nothing about the output: accepted and not used.
# ``model``: the job's model runs every row; ``priority``, ``service_tier``: batchllm plans the order itself.
NEUTRAL_BODY_FIELDS = frozenset({"model", "user", "metadata", "store", "service_tier", "request_id", "priority",
                                 "cache_salt", "parallel_tool_calls"})


def unsupported_field(fields: Mapping[str, Any], n: int, names: Any = None, chat: bool = False) -> tuple[str, str] | None:
    """(field, message) for the first field of ``fields`` (among ``names``, default every one of
    ``UNSUPPORTED_FIELDS``) that batchllm does not implement and that is given with a value that changes
    the output; None when there is none. ``n``: the row's samples (``best_of`` equal to n is accepted).
    ``chat``: the row is a chat (``top_logprobs`` is then implemented and not checked here)."""
    for name in UNSUPPORTED_FIELDS if names is None else names:
        if name not in fields or name not in UNSUPPORTED_FIELDS:
            continue
        value = fields[name]
        if value is None or (isinstance(value, float) and value != value):
            continue
        neutral, why = UNSUPPORTED_FIELDS[name]
        if name == "top_logprobs" and chat:
            continue
        if name == "best_of":
            if isinstance(value, int) and not isinstance(value, bool) and value == n:
                continue
            why = f"best_of must equal n ({n}) or be left out: {why}"
        elif neutral is not None and neutral(value):
            continue
        return name, f"{name} = {_shown(value)} is not supported by batchllm ({why})"
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
