"""JobConfig: every option of a batch job, from CLI flags, a TOML job file, or both.

Precedence: a flag given on the command line > the job file > the built-in default. Per-row sampling
fields in the input override the job's sampling defaults (``sampling_defaults``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any

from batchllm.errors import BatchLLMError
from batchllm.io.storage import is_uri
from batchllm.sampling_params import MAX_TOKENS_LIMIT, STRUCTURED_FIELDS, SamplingParams, structured_output_from_fields

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


TASKS = ("generate", "score")


@dataclasses.dataclass
class JobConfig:
    # generate: completions into a job folder (pipeline.run_job); score: log-likelihoods of continuations and
    # texts into one output file (batchllm.score, what ``batchllm score`` runs; its input is one file)
    task: str = "generate"
    inputs: list[str] = dataclasses.field(default_factory=list)
    output: str | None = None
    model: str | None = None  # None: the built-in default (SmolLM2-135M-Instruct)
    tokenizer: str | None = None  # another tokenizer (an HF folder or hub name) than the model's
    chat_template: str | None = None  # a Jinja file or template text replacing the tokenizer's chat template
    served_model_name: str | None = None  # the model name outputs report (OpenAI export); None: the model's
    split: str | None = None  # the split of dataset-dict inputs (save_to_disk DatasetDict folders, hub datasets)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16, or vLLM's float (float32) and half (float16)
    # sampling defaults (vLLM's defaults; rows override)
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int = 0  # job seed: per-sample seeds derive from (seed, custom_id, sample index)
    # default structured output, with the request fields' names and values (a row's own fields replace it;
    # see sampling_params.structured_output_from_fields): job-file keys, e.g. ``guided_json = {...}``
    response_format: Any = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: Any = None
    guided_grammar: str | None = None
    structured_outputs: Any = None
    # column mapping
    id_column: str | None = None
    prompt_column: str | None = None
    messages_column: str | None = None
    prompt_template: str | None = None
    system_prompt: str | None = None
    chat: bool = False  # --chat: raw prompts (and templates' renderings) go through the chat template as a user message
    keep_columns: str | None = None  # --keep-columns: "A,B" or "all": input columns carried into the output rows
    # engine
    policy: str = "batchllm"
    attention: str = "auto"  # auto | torch | triton
    sampler: str = "auto"  # auto | torch | triton: where random rows are sampled (same tokens either way)
    page_size: int = 16
    max_num_batched_tokens: int | None = None  # per-step token budget; None: per-device default
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    kv_cache_tokens: int | None = None  # KV pool size in tokens; None: sized from free memory
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | fp8 / fp8_e4m3 (one byte per element: batchllm.engine.kv_cache)
    gpu_memory_utilization: float = 0.9  # fraction of the GPU's total memory the process may use (KV pool sizing)
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    # output: rows per Parquet shard (a shard is the unit of commit: a crash loses at most one shard's work)
    shard_rows: int = 10_000
    preview: int = 3  # completions printed after the run
    # scale-out (batchllm.distributed): engine replicas on Ray; neither changes outputs, so neither is
    # part of the job's fingerprint and a resume may use another replica count
    replicas: int = 1
    ray_address: str | None = None  # None: a local Ray instance when replicas > 1; "auto": the running cluster
    ray_start_timeout: float = 300.0  # seconds ray.init may take before the job fails with one line
    replica_start_timeout: float = 1800.0  # seconds replicas may take to start and load the model (downloads included)
    # task = "score": input tokens per rolling-likelihood window (None: what the model's context allows)
    max_length: int | None = None

    def sampling_defaults(self) -> SamplingParams:
        """The job's sampling defaults; BatchLLMError for a bad value, a malformed structured output included."""
        try:
            structured = structured_output_from_fields({k: getattr(self, k) for k in _STRUCTURED_KEYS
                                                         if getattr(self, k) is not None})
            return SamplingParams(
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                min_p=self.min_p,
                structured=structured,
            )
        except ValueError as e:
            raise BatchLLMError(f"bad sampling option: {e}") from None

    def validate(self) -> None:
        """Every key against ``SCHEMA`` (type and range), then the rules that span keys; one-line
        BatchLLMError naming the key, the value and what was expected."""
        if not self.inputs:
            raise BatchLLMError("no input file given")
        if not self.output:
            raise BatchLLMError("no output folder given (--output DIR)" if self.task == "generate"
                                else "no output file given (--output FILE: .jsonl, or .parquet)")
        for key in SCHEMA:
            check_value(key, getattr(self, key))
        self.sampling_defaults()
        if self.task == "score":
            if len(self.inputs) != 1:
                raise BatchLLMError(f"task score reads one input file, got {len(self.inputs)}")
            if self.distributed:
                raise BatchLLMError("task score runs in one process: drop --replicas / --ray-address")
        elif self.max_length is not None:
            raise BatchLLMError("max_length is an option of task score (rolling windows); this job generates")
        if self.keep_columns is not None and self.distributed:
            raise BatchLLMError("--keep-columns does not work with --replicas / --ray-address yet: run on one replica, "
                                "or join the input columns to the results afterwards (by input_file and input_index)")

    @property
    def distributed(self) -> bool:
        """Whether the engine runs on Ray replicas (``batchllm.distributed``) instead of in this process."""
        return self.replicas > 1 or self.ray_address is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "JobConfig":
        """The config a manifest's job spec describes (``batchllm resume``); keys this version does not
        know are ignored, so a folder written by an older batchllm still resumes."""
        return cls(**{k: v for k, v in spec.items() if k in _FIELDS})

    def with_absolute_paths(self) -> "JobConfig":
        """A copy whose input, output, model, tokenizer and chat-template paths are absolute, so the job spec
        stored in the manifest resumes from any working directory. Kept as given: URIs (``s3://...``,
        ``file://...``), hub dataset names that are no local path, and model / tokenizer specs that are
        not paths (hub names, ``dummy:``), and a chat template given as text."""
        from batchllm.io.readers import is_hub_dataset_name

        def existing(spec: str | None) -> str | None:
            if spec is None or spec.startswith("dummy:") or is_uri(spec) or not os.path.exists(os.path.expanduser(spec)):
                return spec
            return os.path.abspath(os.path.expanduser(spec))

        return dataclasses.replace(
            self,
            inputs=[p if is_uri(p) or is_hub_dataset_name(p) else os.path.abspath(os.path.expanduser(p)) for p in self.inputs],
            output=self.output if not self.output or is_uri(self.output) else os.path.abspath(os.path.expanduser(self.output)),
            model=existing(self.model),
            tokenizer=existing(self.tokenizer),
            chat_template=self.chat_template if _template_text(self.chat_template) else existing(self.chat_template),
        )

    def column_mapping_dict(self) -> dict[str, Any]:
        """How rows become requests and output rows (part of the job's fingerprint). ``chat`` and
        ``keep_columns`` appear only when set, so a job written before they existed resumes."""
        out = {k: getattr(self, k) for k in ("id_column", "prompt_column", "messages_column", "prompt_template", "system_prompt")}
        if self.chat:
            out["chat"] = True
        if self.keep_columns is not None:
            out["keep_columns"] = self.keep_columns
        return out


_FIELDS = {f.name for f in dataclasses.fields(JobConfig)}
# the structured-output request fields a job may default (guided_decoding, the older name of
# structured_outputs, is for rows only)
_STRUCTURED_KEYS = tuple(k for k in STRUCTURED_FIELDS if k in _FIELDS)


# ------------------------------------------------------------------------------------------ the schema


@dataclasses.dataclass(frozen=True)
class _Rule:
    """The type and range of one JobConfig key: ``kind`` is int | float | bool | str | paths | json (a
    table, a list or a string: a structured-output spec, checked by ``JobConfig.sampling_defaults``)."""

    kind: str
    optional: bool = False  # None allowed
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself not allowed
    choices: tuple[str, ...] = ()

    def expected(self) -> str:
        text = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                "paths": "a path or a list of paths (strings)", "json": "a table, a list or a string"}[self.kind]
        if self.choices:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        if self.lo is not None and self.hi is not None:
            text += f" in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}]"
        elif self.lo is not None:
            text += f" {'>' if self.lo_open else '>='} {_num(self.lo)}"
        elif self.hi is not None:
            text += f" <= {_num(self.hi)}"
        if self.optional:
            text += " (or left out)"
        return text

    def ok_type(self, value: Any) -> bool:
        """Whether a number is of this int / float rule's type (range aside)."""
        if isinstance(value, bool):
            return False
        if self.kind == "int":
            return isinstance(value, int)
        return isinstance(value, (int, float)) and math.isfinite(value)

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.kind == "paths":
            return (isinstance(value, list) and bool(value)
                    and all(isinstance(p, str) and p and "\0" not in p for p in value))
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "json":
            return isinstance(value, (dict, list, str))
        if self.kind == "str":
            if not isinstance(value, str) or "\0" in value:
                return False
            return not self.choices or value in self.choices
        if isinstance(value, bool):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if self.kind == "float" and (not isinstance(value, (int, float)) or not math.isfinite(value)):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or value <= self.hi


def _num(x: float) -> str:
    if isinstance(x, float) and not x.is_integer():
        return f"{x:g}"
    x = int(x)
    for k in range(16, 64):  # the sanity bounds read better as powers of two
        if abs(x) in (1 << k, (1 << k) - 1):
            return f"{'-' if x < 0 else ''}2**{k}{' - 1' if abs(x) != 1 << k else ''}"
    return str(x)


_INT64 = 2**63 - 1
# vLLM's dtype spellings, accepted wherever a dtype is (``build.resolve_dtype`` maps them)
DTYPE_ALIASES = {"half": "float16", "float": "float32"}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16", *DTYPE_ALIASES)
# --kv-cache-dtype, vLLM's spellings: "fp8" is e4m3 (``build.resolve_kv_cache_dtype`` maps them)
KV_CACHE_DTYPE_CHOICES = ("auto", "fp8", "fp8_e4m3")
_PATH, _OPT_STR = _Rule("str"), _Rule("str", optional=True)
# Every key of a job (job files, flags, the job spec a manifest stores); JobConfig.validate checks them all.
SCHEMA: dict[str, _Rule] = {
    "task": _Rule("str", choices=TASKS),
    "inputs": _Rule("paths"),
    "output": _Rule("str", optional=True),
    "model": _OPT_STR,
    "tokenizer": _OPT_STR,
    "chat_template": _OPT_STR,
    "served_model_name": _OPT_STR,
    "split": _OPT_STR,
    "device": _Rule("str"),
    "dtype": _Rule("str", choices=DTYPE_CHOICES),
    "max_tokens": _Rule("int", lo=1, hi=MAX_TOKENS_LIMIT),
    "temperature": _Rule("float", lo=0),
    "top_p": _Rule("float", lo=0, hi=1, lo_open=True),
    "top_k": _Rule("int", lo=-1, hi=_INT64),
    "min_p": _Rule("float", lo=0, hi=1),
    "seed": _Rule("int", lo=-_INT64 - 1, hi=_INT64),
    "response_format": _Rule("json", optional=True),
    "guided_json": _Rule("json", optional=True),
    "guided_regex": _OPT_STR,
    "guided_choice": _Rule("json", optional=True),
    "guided_grammar": _OPT_STR,
    "structured_outputs": _Rule("json", optional=True),
    "id_column": _OPT_STR,
    "prompt_column": _OPT_STR,
    "messages_column": _OPT_STR,
    "prompt_template": _OPT_STR,
    "system_prompt": _OPT_STR,
    "chat": _Rule("bool"),
    "keep_columns": _OPT_STR,
    "policy": _Rule("str", choices=("batchllm", "fcfs-lru")),
    "attention": _Rule("str", choices=("auto", "torch", "triton")),
    "sampler": _Rule("str", choices=("auto", "torch", "triton")),
    "page_size": _Rule("int", lo=1, hi=1 << 16),
    "max_num_batched_tokens": _Rule("int", optional=True, lo=1, hi=1 << 31),
    "max_num_seqs": _Rule("int", optional=True, lo=1, hi=1 << 31),
    "max_model_len": _Rule("int", optional=True, lo=1, hi=1 << 31),
    "kv_cache_tokens": _Rule("int", optional=True, lo=1, hi=1 << 40),
    "kv_cache_dtype": _Rule("str", choices=KV_CACHE_DTYPE_CHOICES),
    "gpu_memory_utilization": _Rule("float", lo=0, hi=1, lo_open=True),
    "enforce_eager": _Rule("bool"),
    "shard_rows": _Rule("int", lo=1, hi=1 << 31),
    "preview": _Rule("int", lo=0, hi=1 << 31),
    "replicas": _Rule("int", lo=1, hi=1 << 16),
    "ray_address": _OPT_STR,
    "ray_start_timeout": _Rule("float", lo=0, hi=86400, lo_open=True),
    "replica_start_timeout": _Rule("float", lo=0, hi=7 * 86400, lo_open=True),
    "max_length": _Rule("int", optional=True, lo=1, hi=1 << 31),
}


def check_value(key: str, value: Any, where: str = "") -> None:
    """BatchLLMError naming the key, the value and what was expected, unless ``value`` fits ``SCHEMA[key]``:
    ``key = VALUE (a TYPE): expected TYPE ...`` for a wrong type, ``key must be RANGE, got VALUE`` for a value of
    the right type out of range."""
    rule = SCHEMA[key]
    if rule.ok(value):
        return
    big = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) >= 1e12
    shown = f"{value:.3g}" if big else repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    if rule.kind in ("int", "float") and rule.ok_type(value):
        if rule.lo is not None and (value <= rule.lo if rule.lo_open else value < rule.lo) and rule.hi is None:
            want = f"{'greater than' if rule.lo_open else 'at least'} {_num(rule.lo)}"
        elif rule.hi is not None and value > rule.hi and rule.lo is None:
            want = f"at most {_num(rule.hi)}"
        elif rule.lo is not None and rule.hi is not None and not rule.lo_open and value < rule.lo and rule.kind == "int":
            want = f"at least {_num(rule.lo)}"
        elif rule.lo is not None and rule.hi is not None and value > rule.hi and rule.kind == "int":
            want = f"at most {_num(rule.hi)}"
        else:
            want = "in " + rule.expected().split(" in ", 1)[-1]
        raise BatchLLMError(f"{where}{key} must be {want}, got {shown}")
    kind = "" if value is None else f" ({_type_name(value)})"
    raise BatchLLMError(f"{where}{key} = {shown}{kind}: expected {rule.expected()}")


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}.get(
        type(value), type(value).__name__)


def read_toml(path: str, what: str) -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file is a one-line BatchLLMError naming ``what`` it is."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise BatchLLMError(f"{what} not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise BatchLLMError(f"{what} {path} is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise BatchLLMError(f"{what} {path} is not UTF-8 text (TOML must be UTF-8): {e.reason} at byte {e.start}") from None
    except OSError as e:  # a folder, no permission...
        raise BatchLLMError(f"cannot read {what} {path}: {e.strerror or e}") from None


def load_job_file(path: str) -> dict[str, Any]:
    """Read a TOML job file into JobConfig field values (``input`` may stand for ``inputs``).

    Unknown keys are an error, so a typo never silently falls back to a default. Sections ``[sampling]``,
    ``[engine]``, ``[columns]`` and ``[output]`` may group keys; they are flattened.
    """
    data = read_toml(path, "job file")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key in ("sampling", "engine", "columns", "output_options", "job"):
            flat.update(value)
        else:
            flat[key] = value
    if "input" in flat:
        if "inputs" in flat:
            raise BatchLLMError(f"job file {path}: give input or inputs, not both")
        flat["inputs"] = flat.pop("input")
    if isinstance(flat.get("inputs"), str):
        flat["inputs"] = [flat["inputs"]]
    unknown = sorted(set(flat) - _FIELDS)
    if unknown:
        raise BatchLLMError(f"job file {path}: unknown key(s) {', '.join(unknown)}")
    for key, value in flat.items():  # types and ranges before anything uses a value
        check_value(key, value, where=f"job file {path}: ")
    # paths in a job file are relative to the file, so a job runs the same from any working directory
    base = os.path.dirname(os.path.abspath(path))
    if "inputs" in flat:
        flat["inputs"] = [p if is_uri(p) else _relative_or_name(base, p, _input_file_exts()) for p in flat["inputs"]]
    for key in ("output", "model", "tokenizer", "chat_template"):
        if (isinstance(flat.get(key), str) and not flat[key].startswith("dummy:") and flat[key] not in ("default", "smollm2")
                and not is_uri(flat[key]) and not (key == "chat_template" and _template_text(flat[key]))):
            named = key in ("model", "tokenizer")  # may be a hub repo id; output and chat_template are paths
            flat[key] = _relative_or_name(base, flat[key], _MODEL_FILE_EXTS) if named else _relative_to(base, flat[key])
    return flat


def _template_text(spec: str | None) -> bool:
    """Whether a chat_template value is template text rather than a file (as ``loader.read_chat_template``
    decides)."""
    return spec is not None and ("{{" in spec or "{%" in spec)


_MODEL_FILE_EXTS = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _input_file_exts() -> tuple[str, ...]:
    from batchllm.io.readers import _FILE_EXTS

    return _FILE_EXTS


def _relative_or_name(base: str, spec: str, file_exts: tuple[str, ...]) -> str:
    """A job file's input / model / tokenizer path relative to the file; a spec that names nothing there
    and reads as a Hugging Face hub name (``org/name``, not ending in one of ``file_exts``) is kept as it
    is."""
    from batchllm.io.readers import looks_like_repo_id

    resolved = _relative_to(base, spec)
    if not os.path.exists(resolved) and looks_like_repo_id(spec) and not spec.lower().endswith(file_exts):
        return spec
    return resolved


def _relative_to(base: str, path: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def merge(job_file_values: dict[str, Any], flag_values: dict[str, Any]) -> JobConfig:
    """Flags that were given (not None) override job-file values, which override defaults."""
    values = dict(job_file_values)
    for k, v in flag_values.items():
        if v is None or (k == "inputs" and not v):
            continue
        values[k] = v
    return JobConfig(**values)
