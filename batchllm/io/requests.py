"""The records that flow from the readers into the rest of the pipeline.

A reader turns every input row into exactly one of:
- ``Request``: a valid row, with exactly one of ``prompt`` / ``messages`` / ``prompt_token_ids`` set and
  its sampling parameters already validated;
- ``RowError``: a row that cannot run (malformed JSON, no prompt, a bad parameter...), carried to the
  output as an error record so the rest of the job goes on.

``input_index`` is the 0-based row index within ``input_file`` (for JSONL: the line number minus one,
counting blank lines, so a user can find the row with ``sed -n``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from batchllm.sampling_params import SamplingParams


@dataclasses.dataclass
class Request:
    custom_id: str
    input_file: str
    input_index: int
    sampling: SamplingParams
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    # The row's ids as read (a list of ints); ``io.tokenize`` replaces the list by ``token_ids``' array.
    prompt_token_ids: list[int] | np.ndarray | None = None
    # Filled by ``io.tokenize.tokenize``: an int32 array (never a Python list: 4 bytes a token, not ~36).
    token_ids: np.ndarray | None = None
    # --keep-columns: the row's values of the kept input columns (name -> value), carried to its output rows.
    kept: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        given = sum(x is not None for x in (self.prompt, self.messages, self.prompt_token_ids))
        if given != 1:
            raise ValueError("a request needs exactly one of prompt, messages, prompt_token_ids")


@dataclasses.dataclass
class RowError:
    input_file: str
    input_index: int
    error_code: str
    error_message: str
    custom_id: str | None = None
    kept: dict[str, Any] | None = None  # as Request.kept (every value None for a line that is not a JSON object)


# Error codes used in RowError.error_code; stable strings, documented in docs/user-guide.md.
MALFORMED_JSON = "malformed_json"
MISSING_PROMPT = "missing_prompt"
AMBIGUOUS_PROMPT = "ambiguous_prompt"
INVALID_PARAMETER = "invalid_parameter"
INVALID_MESSAGES = "invalid_messages"
DUPLICATE_CUSTOM_ID = "duplicate_custom_id"
PROMPT_TOO_LONG = "prompt_too_long"
TEMPLATE_ERROR = "template_error"
UNSUPPORTED_ENDPOINT = "unsupported_endpoint"
UNSUPPORTED_PARAMETER = "unsupported_parameter"  # a request field batchllm does not implement (sampling_params.UNSUPPORTED_FIELDS)
# a malformed JSON schema, regex, choice list or grammar (sampling_params.InvalidStructuredOutput, or the
# grammar engine's message when it compiles one: batchllm.engine.structured)
INVALID_STRUCTURED_OUTPUT = "invalid_structured_output"
TOKENIZATION_ERROR = "tokenization_error"
ENGINE_ERROR = "engine_error"  # scale-out: the request's group failed on every attempt (docs/scale-out.md)
