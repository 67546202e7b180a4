"""Per-request sampling parameters, with vLLM's names and semantics.

A row of the input file may carry any of these fields (flat or under ``sampling_params``); the job's
defaults (CLI flags, job file) fill in what a row leaves out. ``SamplingParams.from_fields`` is the one
place that validates them: a bad value raises ``ValueError`` with a message fit for an error record.
``UNSUPPORTED_FIELDS`` / ``unsupported_field``: the request fields of vLLM's and OpenAI's APIs that
batchllm does not implement, and which of their values change nothing (the readers make any other value
an ``unsupported_parameter`` error record).

Structured output (``STRUCTURED_FIELDS``): OpenAI's ``response_format``, vLLM's ``guided_json`` /
``guided_regex`` / ``guided_choice`` / ``guided_grammar`` and its ``structured_outputs`` object (and the
older name of that object, ``guided_decoding``) become one ``StructuredOutput`` on ``SamplingParams``
(``structured_output_from_fields``). ``STRUCTURED_OUTPUT_APPLIED`` says whether the engine applies it;
while it does not, ``structured_refusal`` makes such a row an ``unsupported_parameter`` error record
rather than letting it run unconstrained.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Mapping

# Aliases accepted for max_tokens (transformers' and OpenAI's chat API names).
MAX_TOKENS_ALIASES = ("max_new_tokens", "max_completion_tokens")

_GREEDY_EPS = 1e-5

# Upper bounds that no real job reaches but that stop a typo (max_tokens = 1e30, n = 1e7) from running for
# hours or being silently clamped: a bad row becomes an invalid_parameter error record instead.
MAX_TOKENS_LIMIT = 1 << 24  # 16,777,216 tokens: beyond any model's context
MAX_N = 1024  # samples per request


# Whether the engine constrains decoding with ``SamplingParams.structured``. The one switch that the engine's
# wiring of batchllm.engine.structured flips: until then a row that asks for structured output is refused
# (``structured_refusal``), never run unconstrained.
STRUCTURED_OUTPUT_APPLIED = True

# Request fields that ask for structured output, with vLLM's and OpenAI's names.
STRUCTURED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                     "structured_outputs", "guided_decoding")
# The constraint keys of vLLM's ``structured_outputs`` object (``StructuredOutputsParams``; ``guided_decoding``
# is its older name, ``GuidedDecodingParams``) and what each becomes.
_OBJECT_KINDS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar", "json_object": "json"}
# Keys of that object that only tune a constraint: (test for a value that batchllm honours, why).
_OBJECT_OPTIONS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "disable_any_whitespace": (lambda v: isinstance(v, bool), "must be true or false"),
    "disable_fallback": (lambda v: isinstance(v, bool), "must be true or false (batchllm has one grammar engine)"),
    "disable_additional_properties": (lambda v: v is False, "batchllm applies additionalProperties as the schema gives it"),
    "whitespace_pattern": (lambda v: False, "batchllm allows JSON's whitespace or none (disable_any_whitespace)"),
    "structural_tag": (lambda v: False, "batchllm has no structural tags"),
    "backend": (lambda v: v in ("auto", "guidance", "llguidance", "xgrammar"), "batchllm constrains with llguidance"),
}
# Any JSON object (OpenAI's json_object mode; vLLM's json_object).
_ANY_OBJECT_SCHEMA = '{"type":"object"}'


class InvalidStructuredOutput(ValueError):
    """A structured-output request whose schema, regex, choice list or grammar is malformed (an
    ``invalid_structured_output`` error record), as opposed to a misshapen request field (``ValueError``:
    ``invalid_parameter``)."""


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """A constraint on a request's output text, in a form that hashes by content (the engine compiles each
    distinct one once per job) and pickles (it travels to Ray replicas).

    ``kind``, ``spec``:
      ``"json"``: ``spec`` is a JSON schema's compact JSON text (key order kept: it orders the output's keys);
        OpenAI's ``json_object`` mode is the schema ``{"type":"object"}``.
      ``"regex"``: a regular expression the whole output matches (Rust ``regex`` syntax, as vLLM's backends).
      ``"choice"``: the JSON text of a list of strings; the output is exactly one of them.
      ``"grammar"``: a context-free grammar as vLLM's ``guided_grammar`` takes it: EBNF in the GBNF dialect of
        llama.cpp and xgrammar (vLLM's default backend; ``root ::= ...``), or Lark (vLLM's guidance backend).
    ``any_whitespace``: JSON may carry whitespace between tokens (vLLM's default); False (vLLM's
    ``disable_any_whitespace``) allows none, which keeps small models from padding with whitespace.
    """

    kind: str
    spec: str
    any_whitespace: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("json", "regex", "choice", "grammar"):
            raise ValueError(f"structured output kind must be json, regex, choice or grammar, got {self.kind!r}")
        if not isinstance(self.spec, str):
            raise ValueError(f"structured output spec must be text, got {type(self.spec).__name__}")


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
    # vLLM's prompt_logprobs: per prompt position, the log-probability and rank of the prompt's token and
    # the k most likely tokens (0: the prompt's token only); None: off. (``batchllm.execute`` explains.)
    prompt_logprobs: int | None = None
    # Set from the structured-output request fields (STRUCTURED_FIELDS), never from a field of this name.
    structured: StructuredOutput | None = None

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
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise ValueError(f"prompt_logprobs must be between 0 and 20, got {self.prompt_logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a string or a list of non-empty strings")

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], defaults: "SamplingParams | None" = None) -> "SamplingParams":
        """Build from a row's fields over ``defaults``; unknown keys are ignored, bad values raise ValueError.

        Values are coerced strictly: a temperature of ``"hot"`` or a max_tokens of ``1.5`` is an error,
        never silently truncated. A row that overrides nothing gets ``defaults`` itself (the object is
        frozen, so a million such rows share one), which keeps reading fast. Structured-output fields
        (``STRUCTURED_FIELDS``) replace the defaults' constraint (``response_format: {"type": "text"}``
        clears it); a malformed schema, regex, choice list or grammar raises ``InvalidStructuredOutput``.
        """
        base = defaults if defaults is not None else _DEFAULTS
        overrides: dict[str, Any] = {}
        for alias in MAX_TOKENS_ALIASES:
            if fields.get(alias) is not None and fields.get("max_tokens") is None:
                overrides["max_tokens"] = _coerce("max_tokens", fields[alias])
        for name in SAMPLING_FIELD_NAMES:
            value = fields.get(name)
            if value is not None:
                overrides[name] = _coerce(name, value)
        structured = {k: fields[k] for k in STRUCTURED_FIELDS if fields.get(k) is not None}
        if structured:
            overrides["structured"] = structured_output_from_fields(structured)
        if not overrides:
            return base
        return dataclasses.replace(base, **overrides)  # __post_init__ validates the combination


_INT_FIELDS = {"max_tokens", "top_k", "n", "min_tokens"}
_OPTIONAL_INT_FIELDS = {"seed", "logprobs", "prompt_logprobs"}
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


# The request fields that set SamplingParams' fields of the same name (``structured`` has its own fields).
SAMPLING_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name != "structured")
_DEFAULTS = SamplingParams()


# ------------------------------------------------------------------------------------ structured output


def structured_output_from_fields(fields: Mapping[str, Any]) -> StructuredOutput | None:
    """The one constraint that ``fields`` (non-null values of ``STRUCTURED_FIELDS``) ask for; None when they
    ask for none (``response_format: {"type": "text"}``, an empty ``structured_outputs``).

    Semantics are vLLM's and OpenAI's: ``response_format`` ``{"type": "json_object"}`` (any JSON object),
    ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`` (the schema
    is enforced whatever ``strict`` says, as in vLLM), ``{"type": "text"}`` (no constraint);
    ``guided_json`` (a schema, as an object or its JSON text), ``guided_regex``, ``guided_choice`` (a list
    of strings), ``guided_grammar`` (see ``StructuredOutput``); ``structured_outputs`` / ``guided_decoding``:
    an object with one of ``json``, ``regex``, ``choice``, ``grammar``, ``json_object: true``, and
    optionally ``disable_any_whitespace``. More than one constraint is a ``ValueError`` (vLLM refuses
    it too), as is a field of the wrong shape; a malformed constraint is ``InvalidStructuredOutput``.
    """
    found: list[tuple[str, StructuredOutput]] = []
    whitespace = True
    for name in STRUCTURED_FIELDS:
        value = fields.get(name)
        if value is None:
            continue
        if name == "response_format":
            so = _response_format(value)
        elif name in ("structured_outputs", "guided_decoding"):
            so, whitespace = _structured_object(name, value)
        else:
            so = _constraint(name, name.removeprefix("guided_"), value)
        if so is not None:
            found.append((name, so))
    if len(found) > 1:
        raise ValueError("a request can ask for one structured output only, got "
                         + " and ".join(name for name, _ in found))
    if not found:
        return None
    so = found[0][1]
    return so if whitespace else dataclasses.replace(so, any_whitespace=False)


def structured_refusal(params: SamplingParams) -> str | None:
    """The error message for a request whose structured output the engine does not apply yet
    (``STRUCTURED_OUTPUT_APPLIED`` is False); None when it has none or the engine applies it."""
    if params.structured is None or STRUCTURED_OUTPUT_APPLIED:
        return None
    return (f"structured output ({params.structured.kind}) is not yet applied by batchllm's engine; the row "
            "would run unconstrained, so it is refused")


def _response_format(value: Any) -> StructuredOutput | None:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ValueError(f"response_format must be an object with a type, got {_shown(value)}")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json", _ANY_OBJECT_SCHEMA)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or spec.get("schema") is None:
            raise ValueError('response_format of type json_schema needs "json_schema": {"name": ..., "schema": {...}}, '
                             f"got {_shown(value)}")
        return _constraint("response_format.json_schema.schema", "json", spec["schema"])
    raise ValueError(f'response_format type must be "text", "json_object" or "json_schema", got {kind!r}')


def _structured_object(name: str, value: Any) -> tuple[StructuredOutput | None, bool]:
    """(constraint, any_whitespace) of a ``structured_outputs`` / ``guided_decoding`` object."""
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be an object, got {_shown(value)}")
    given = {k: v for k, v in value.items() if v is not None and not (k == "json_object" and v is False)}
    unknown = sorted(k for k in given if k not in _OBJECT_KINDS and k not in _OBJECT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in {name} (it takes {', '.join(_OBJECT_KINDS)})")
    for key in sorted(set(given) & set(_OBJECT_OPTIONS)):
        ok, why = _OBJECT_OPTIONS[key]
        if not ok(given[key]):
            raise ValueError(f"{name}.{key} = {_shown(given[key])} is not supported: {why}")
    kinds = [k for k in _OBJECT_KINDS if k in given]
    if len(kinds) > 1:
        raise ValueError(f"{name} can hold one of {', '.join(_OBJECT_KINDS)}, got {' and '.join(kinds)}")
    whitespace = not given.get("disable_any_whitespace", False)
    if not kinds:
        return None, whitespace
    key = kinds[0]
    if key == "json_object":
        if given[key] is not True:
            raise ValueError(f"{name}.json_object must be true or false, got {_shown(given[key])}")
        return StructuredOutput("json", _ANY_OBJECT_SCHEMA), whitespace
    return _constraint(f"{name}.{key}", _OBJECT_KINDS[key], given[key]), whitespace


def _constraint(where: str, kind: str, value: Any) -> StructuredOutput:
    """One constraint of ``kind`` from a request value; ``where`` names the field in error messages."""
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise InvalidStructuredOutput(f"{where} is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise InvalidStructuredOutput(f"{where} must be a JSON schema object, got {_shown(value)}")
        return StructuredOutput("json", json.dumps(value, ensure_ascii=False, separators=(",", ":")))
    if kind == "choice":
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) for c in value):
            raise ValueError(f"{where} must be a non-empty list of strings, got {_shown(value)}")
        return StructuredOutput("choice", json.dumps(list(value), ensure_ascii=False))
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} must be a non-empty string, got {_shown(value)}")
    return StructuredOutput(kind, value)


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
_NO_TOOLS = "batchllm passes no tools to the chat template and parses no tool calls"
UNSUPPORTED_FIELDS: dict[str, tuple[Callable[[Any], bool] | None, str]] = {
    "guided_decoding_backend": (_equals("auto", "guidance", "llguidance", "xgrammar"),
                                "batchllm constrains decoding with llguidance"),
    "guided_whitespace_pattern": (None, "batchllm allows JSON's whitespace or none (disable_any_whitespace)"),
    "use_beam_search": (_equals(False), "batchllm has no beam search"),
    "length_penalty": (_number(1.0), "length_penalty applies to beam search, which batchllm lacks"),
    "best_of": (None, "batchllm returns every sample it generates; use n"),
    "lora_request": (None, "batchllm serves no LoRA adapters"),
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
