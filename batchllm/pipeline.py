"""The job driver: read -> tokenize -> plan -> engine -> write.

``run_job`` is what ``batchllm run`` and ``batchllm resume`` call. Each stage lives in its own package;
this module only wires them together, keeps the counters for the summary, and turns finished sequences
and rejected rows into output rows.

Durable jobs (``batchllm.jobs``): before the weights load, the job's fingerprint is checked against the
output folder's manifest (a new job, a resume, or a refusal naming what changed); rows the manifest
records as done are skipped while reading, so planning sees only the remaining requests; SIGINT /
SIGTERM stop admission after the current engine step, commit every complete request and raise
``JobInterrupted``; the status file (``.status.json``) follows the job throughout.

Scale-out (``--replicas N`` / ``--ray-address``): reading, tokenizing, planning and every manifest write
stay in this process; the engine stage runs on Ray replicas (``batchllm.distributed``), which get whole
prefix groups and write their shards for this process to commit. Ray is imported only then.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import time
import weakref
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from batchllm.config import DTYPE_ALIASES, JobConfig
from batchllm.engine.attention import get_backend
from batchllm.engine.cuda_graphs import DEFAULT_MAX_GRAPH_BATCH, graph_safe
from batchllm.engine.engine import LLMEngine, StepStats
from batchllm.engine.kv_cache import KVCache
from batchllm.engine.scheduler import SchedulerConfig
from batchllm.engine.sequence import Sequence
from batchllm.engine.sources import build_sources
from batchllm.errors import BatchLLMError
from batchllm.io import requests as rq
from batchllm.io.readers import ColumnMapping, input_identity, read_requests, resolve_keep_columns
from batchllm.io.requests import Request, RowError
from batchllm.io.writer import KEPT_JSON_METADATA, OUTPUT_SCHEMA, CommitError, ShardWriter, check_inputs_outside
from batchllm.jobs.folder import JobFolder, open_job_folder
from batchllm.jobs.manifest import build_fingerprint
from batchllm.jobs.recorder import ResultRecorder
from batchllm.jobs.signals import JobInterrupted, StopFlag, stop_on_signals
from batchllm.jobs.status import CANCELLED, COMPLETED, FAILED, StatusFile
from batchllm.models import loader
from batchllm.models.config import ModelConfig
from batchllm.models.llama import build_model
from batchllm.models.tokenizer import batch_encode_prompts, eos_token_ids, render_chat
from batchllm.plan.plan import Plan, build_plan, estimate_peak_kv_tokens
from batchllm.plan.stats import plan_stats

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise BatchLLMError("--device cuda was asked for but no CUDA device is available")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise BatchLLMError(f"unknown device {spec!r}: use auto, cpu or cuda") from None


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto`` (bfloat16 on CUDA, float32 on the CPU), a name of ``DTYPES``, or vLLM's spellings
    (``half``, ``float``: ``batchllm.config.DTYPE_ALIASES``)."""
    spec = DTYPE_ALIASES.get(spec, spec)
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec not in DTYPES:
        raise BatchLLMError(f"unknown dtype {spec!r}: use auto, float32 (float), bfloat16 or float16 (half)")
    return DTYPES[spec]


@dataclasses.dataclass
class JobSummary:
    requests: int = 0  # every request of the job, earlier runs included
    done_before: int = 0  # requests finished by earlier runs (resume)
    errors: int = 0  # rows that failed in this run
    samples: int = 0
    prompt_tokens: int = 0  # as the user sees them (every sample's prompt)
    cached_tokens: int = 0
    output_tokens: int = 0
    load_seconds: float = 0.0
    wall_seconds: float = 0.0
    prompt_tokens_computed: int = 0  # prefill work actually done (shared prefixes once, recomputation included)
    planned_saving: float | None = None  # what the plan promised (None for the streaming baseline)
    max_saving: float | None = None  # the most any prefix cache could save on these prompts
    num_steps: int = 0
    num_preemptions: int = 0
    batch_seqs: tuple[int, float, int] = (0, 0.0, 0)  # min / median / max sequences per step
    batch_tokens: tuple[int, float, int] = (0, 0.0, 0)
    errors_by_code: dict[str, int] = dataclasses.field(default_factory=dict)
    replicas: int = 1  # engine replicas (batchllm.distributed); 1: this process
    replica_failures: int = 0  # replicas lost during the run (their work was redone elsewhere)
    preview: list[dict] = dataclasses.field(default_factory=list)

    @property
    def achieved_saving(self) -> float:
        """1 - prompt tokens computed / prompt tokens as the user sees them."""
        return 1.0 - self.prompt_tokens_computed / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.wall_seconds if self.wall_seconds else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["output_tok_s"], d["total_tok_s"] = self.output_tok_s, self.total_tok_s
        d["achieved_saving"] = self.achieved_saving
        return d


def error_row(err: RowError) -> dict:
    return {
        "custom_id": err.custom_id,
        "input_file": err.input_file,
        "input_index": err.input_index,
        "error_code": err.error_code,
        "error_message": err.error_message,
        **(err.kept or {}),
    }


def completion_row(req: Request, seq: Sequence) -> dict:
    row = {
        "custom_id": req.custom_id,
        "input_file": req.input_file,
        "input_index": req.input_index,
        "sample_index": seq.sample_index,
        "text": seq.text,
        "finish_reason": seq.finish_reason,
        "prompt_tokens": seq.prompt_len,
        "completion_tokens": len(seq.output_ids),
        "cached_tokens": seq.num_cached,
        "token_ids": seq.output_ids,
        "request_type": "chat" if req.messages is not None else "completion",
        **(req.kept or {}),  # --keep-columns
    }
    if seq.logprobs is not None:
        row["logprobs"] = seq.logprobs
        row["top_logprobs"] = [[{"token_id": t, "logprob": lp} for t, lp in alts] for alts in seq.top_logprobs]
    return row


_TOKEN_CHARS: "weakref.WeakKeyDictionary[object, int]" = weakref.WeakKeyDictionary()


def max_token_chars(tok) -> int:
    """The most characters of text one token of ``tok`` can stand for: its longest vocabulary entry (added
    and special tokens included), at least 1. Cached per tokenizer.

    Vocabulary strings are never shorter than the text they decode to (byte-level BPE spells each byte as
    one character, SentencePiece spells a space as one "▁"), so a prompt of more than
    ``max_token_chars(tok) * (n - 1)`` characters has at least ``n`` tokens: ``max_prompt_chars`` uses
    this to refuse a prompt that cannot fit before it is tokenized.
    """
    try:
        return _TOKEN_CHARS[tok]
    except (KeyError, TypeError):
        pass
    longest = 1
    try:
        vocab = tok.get_vocab()
        longest = max([longest, *map(len, vocab)])
        for t in getattr(tok, "all_special_tokens", []):
            longest = max(longest, len(t))
    except Exception as e:  # noqa: BLE001  (no vocabulary to inspect: no character bound)
        log.debug("no vocabulary for the character bound: %s", e)
        longest = 1 << 20
    try:
        _TOKEN_CHARS[tok] = longest
    except TypeError:  # not weak-referenceable
        pass
    return longest


def max_prompt_chars(tok, max_model_len: int) -> int:
    """Characters beyond which a prompt certainly has ``max_model_len`` tokens or more (too long)."""
    return max_token_chars(tok) * max(0, max_model_len - 1)


def tokenize(requests: list[Request], tok, max_model_len: int, vocab_size: int) -> tuple[list[Request], list[RowError]]:
    """Fill ``token_ids`` of every request; rows that cannot be tokenized or are too long become errors.

    Lengths are checked before any encoding: a raw prompt or a rendered chat longer than
    ``max_prompt_chars`` characters, or more token ids than the context, is a ``prompt_too_long`` error
    without being tokenized (a 30 MB prompt would otherwise cost gigabytes in the tokenizer). Raw prompts
    are encoded in one batched call (the Rust tokenizer parallelises it); chat rows are rendered through
    the chat template one by one.
    """
    errors: list[RowError] = []
    limit = max_prompt_chars(tok, max_model_len)

    def too_long(r: Request, what: str, n: int, unit: str) -> None:
        errors.append(RowError(
            r.input_file, r.input_index, rq.PROMPT_TOO_LONG,
            f"{what} has {n:,} {unit}; the model context (max-model-len) is {max_model_len} tokens"
            + (f", at most {limit:,} characters with this tokenizer" if unit == "characters" else ""), r.custom_id, kept=r.kept))
        r.token_ids = None

    raw = []
    for r in requests:
        if r.prompt is None:
            continue
        if len(r.prompt) > limit:
            too_long(r, "prompt", len(r.prompt), "characters")
        else:
            raw.append(r)
    for r, ids in zip(raw, batch_encode_prompts(tok, [r.prompt for r in raw]) if raw else []):
        r.token_ids = np.asarray(ids, dtype=np.int32)
    for r in requests:
        try:
            if r.messages is not None:
                text = render_chat(tok, r.messages)
                if len(text) > limit:
                    too_long(r, "the chat prompt", len(text), "characters")
                    continue
                r.token_ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
            elif r.prompt_token_ids is not None:
                if len(r.prompt_token_ids) >= max_model_len:
                    too_long(r, "prompt", len(r.prompt_token_ids), "tokens")
                    continue
                ids = np.asarray(r.prompt_token_ids, dtype=np.int64)
                if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
                    raise ValueError(f"prompt_token_ids must be in [0, {vocab_size})")
                r.token_ids = ids.astype(np.int32)
        except Exception as e:  # a template or tokenizer failure concerns this row only
            code = rq.TEMPLATE_ERROR if r.messages is not None else rq.INVALID_PARAMETER
            errors.append(RowError(r.input_file, r.input_index, code, f"{type(e).__name__}: {e}", r.custom_id, kept=r.kept))
            r.token_ids = None
    ok: list[Request] = []
    for r in requests:
        if r.token_ids is None:
            continue
        n = len(r.token_ids)
        if n == 0:
            errors.append(RowError(r.input_file, r.input_index, rq.MISSING_PROMPT, "the prompt is empty", r.custom_id, kept=r.kept))
        elif n >= max_model_len:
            errors.append(
                RowError(
                    r.input_file, r.input_index, rq.PROMPT_TOO_LONG,
                    f"prompt has {n} tokens; the model context (max-model-len) is {max_model_len}", r.custom_id, kept=r.kept,
                )
            )
        else:
            ok.append(r)
    return ok, errors


def read_and_tokenize(
    cfg: JobConfig,
    tokenizer,
    mcfg: ModelConfig,
    max_model_len: int,
    on_error: Callable[[RowError], None],
    folder: JobFolder | None = None,
    stop: StopFlag | None = None,
    keep: dict[str, bool] | None = None,
) -> list[Request]:
    """READ + TOKENIZE: every valid request with its token ids; every bad row goes to ``on_error``.

    With a resumed ``folder``, rows it records as done are left out: unread when the earlier run got past
    its read phase (``JobFolder.skip_masks``), else read and dropped. ``keep``: the kept input columns
    (``kept_columns``), whose values the records carry. Records carry the input paths the
    job first recorded (``input_files``), so every shard of a job names its inputs the same way.
    """
    mapping = ColumnMapping(cfg.id_column, cfg.prompt_column, cfg.messages_column, cfg.prompt_template, cfg.system_prompt, cfg.chat)
    skip = folder.skip_masks(cfg.inputs) if folder is not None and folder.resuming else None
    done = folder.done if folder is not None and folder.resuming and skip is None else None
    file_ids = {p: i for i, p in enumerate(cfg.inputs)}
    names = (folder.manifest.get("input_files") if folder is not None and folder.resuming else None) or cfg.inputs
    requests: list[Request] = []
    limit = max_prompt_chars(tokenizer, max_model_len)
    rows = read_requests(cfg.inputs, mapping, cfg.sampling_defaults(), skip=skip, max_prompt_chars=limit, keep=keep, split=cfg.split)
    for k, item in enumerate(rows):
        fid = file_ids[item.input_file]
        if done is not None and done.contains(fid, item.input_index):
            continue
        item.input_file = names[fid]
        if isinstance(item, RowError):
            on_error(item)
        else:
            requests.append(item)
        if stop is not None and stop and k % 1024 == 0:
            break  # run_job notices the flag and stops before planning
    requests, errors = tokenize(requests, tokenizer, max_model_len, mcfg.vocab_size)
    for e in errors:
        on_error(e)
    return requests


def job_stats(cfg: JobConfig, kv_dtype_bytes: int = 2) -> dict:
    """``batchllm stats``: how much prefix sharing the job's prompts offer and what the plan gets.

    Loads only the model's config and tokenizer, never its weights. ``peak_kv_gb`` is the plan's peak KV
    memory for this model when requests run to their max_tokens with no memory limit (coarse model:
    ``estimate_peak_kv_tokens``).
    """
    src = loader.resolve_model(cfg.model)
    mcfg = loader.load_config(src)
    tok = loader.load_tokenizer(src, cfg.tokenizer, cfg.chat_template)
    max_model_len = model_max_len(cfg, mcfg)
    errors: dict[str, int] = {}
    requests = read_and_tokenize(cfg, tok, mcfg, max_model_len, lambda e: errors.__setitem__(e.error_code, errors.get(e.error_code, 0) + 1))
    if not requests:
        raise BatchLLMError("no valid request in the input")
    expected = np.array([r.sampling.max_tokens * r.sampling.n for r in requests], dtype=np.float64)
    lens = np.array([len(r.token_ids) for r in requests], dtype=np.int64)
    plan = build_plan([r.token_ids for r in requests], expected, policy="batchllm", page_size=cfg.page_size)
    out = plan_stats(plan, lens)
    kv = estimate_peak_kv_tokens(plan, lens, expected)
    out.update(
        model=src.display_name,
        row_errors=sum(errors.values()),
        errors_by_code=errors,
        expected_output_tokens=int(expected.sum()),
        peak_kv_tokens=kv.peak_kv_tokens,
        peak_kv_gb=kv.peak_kv_tokens * mcfg.kv_bytes_per_token(kv_dtype_bytes) / 1e9,
        peak_running=kv.peak_running,
    )
    return out


def make_plan(requests: list[Request], policy: str, max_model_len: int | None = None, page_size: int = 16) -> Plan | None:
    """The BatchLLM plan (global prefix groups, decode-first DFS order), or None for the streaming
    baseline, which sees requests in input order and relies on its prefix cache instead.

    Expected output per request: ``max_tokens`` (capped by what the context leaves) times ``n``."""
    if policy == "fcfs-lru" or not requests:
        return None
    cap = max_model_len or np.iinfo(np.int64).max
    expected = np.array(
        [min(r.sampling.max_tokens, max(1, cap - len(r.token_ids))) * r.sampling.n for r in requests], dtype=np.float64
    )
    return build_plan([r.token_ids for r in requests], expected, policy="batchllm", page_size=page_size)


def default_token_budget(device: torch.device) -> int:
    """Tokens per engine step when the job does not set one: vLLM's defaults for offline batch use
    (its ``LLM`` class, ``EngineArgs`` batch defaults), so both policies, and the fcfs-lru baseline in
    particular, run with the budget vLLM would use on the same machine: 4096 on a CPU, 16384 on a GPU
    with at least 70 GB (H100, H200; A100s excepted: vLLM measured a regression there), else 8192."""
    if device.type != "cuda":
        return 4096
    props = torch.cuda.get_device_properties(device)
    big = props.total_memory >= 70 * 2**30 and "a100" not in props.name.lower()
    return 16384 if big else 8192


def kv_pool_pages(cfg: JobConfig, mcfg: ModelConfig, device: torch.device, dtype: torch.dtype, max_tokens_step: int,
                  *, model: torch.nn.Module | None = None, backend=None, sample_rows: int | None = None,
                  graph_batch: int = 0) -> int:
    """Number of KV pages: from --kv-cache-tokens, else from memory.

    On CUDA with ``model`` and ``backend``: ``--gpu-memory-utilization`` x total memory, less the weights,
    the peak activation of a warm-up forward at ``max_tokens_step`` tokens (LM head over ``sample_rows``
    rows), the graph pool reserve for decode steps of ``graph_batch`` rows (0: no graphs) and non-torch
    memory (``batchllm.engine.memory``). On CUDA without a model, an analytic activation estimate stands
    in for the profile. On the CPU: a quarter of the memory the process may still use (the smallest of
    MemAvailable, its cgroup limits and its rlimits: ``_available_ram``), at most 4 GiB."""
    page_bytes = KVCache.bytes_per_page(mcfg, cfg.page_size, dtype)
    if cfg.kv_cache_tokens is not None:
        return max(1, -(-cfg.kv_cache_tokens // cfg.page_size))
    if device.type == "cuda":
        from batchllm.engine import memory

        u = float(cfg.gpu_memory_utilization)  # validated by JobConfig.validate
        prof = None
        if model is not None and backend is not None:
            try:
                prof = memory.profile_cuda(model, backend, max_tokens=max_tokens_step, sample_rows=sample_rows or max_tokens_step,
                                           graph_batch=graph_batch, page_size=cfg.page_size, device=device, dtype=dtype)
            except torch.cuda.OutOfMemoryError:
                raise BatchLLMError(f"out of GPU memory in a warm-up step of {max_tokens_step} tokens: lower "
                                    "--max-num-batched-tokens") from None
            except Exception as exc:  # noqa: BLE001  (a profiling failure must not lose the job: size analytically)
                log.warning("KV pool sizing: the warm-up profile failed (%s: %s); using the analytic estimate", type(exc).__name__, exc)
                torch.cuda.empty_cache()
        if prof is not None:
            budget = prof.pool_bytes(u)
            detail = (f"{u:.2f} x {prof.total / 2**30:.1f} GiB total - weights {prof.weights / 2**30:.1f} GiB - peak activation "
                      f"{prof.peak_activation / 2**30:.1f} GiB - graphs {prof.graph_reserve / 2**30:.1f} GiB - other "
                      f"{prof.non_torch / 2**30:.1f} GiB")
        else:
            free, total = torch.cuda.mem_get_info(device)
            # activations of one step: a few hidden-sized and one FFN-sized buffer per token, plus logits
            act = max_tokens_step * (8 * mcfg.hidden_size + 4 * mcfg.intermediate_size) * 4 + 256 * mcfg.vocab_size * 4
            budget = free - (1 - u) * total - act
            detail = "free memory less activations"
        if budget // page_bytes < 1:
            raise BatchLLMError(f"not enough GPU memory left for the KV cache ({detail}): raise --gpu-memory-utilization, "
                                "lower --max-num-batched-tokens, or set --kv-cache-tokens")
    else:
        avail = _available_ram()
        budget = min(0.25 * avail, 4 << 30)
    pages = int(budget // page_bytes)
    if pages < 1:
        raise BatchLLMError("not enough memory left for the KV cache after loading the model")
    return pages


def _available_ram() -> int:
    """Bytes this process may still allocate: the smallest of the machine's MemAvailable, what its cgroup
    memory limits leave (v2 every level up, or v1) and what its address-space / data rlimits leave."""
    candidates = [_meminfo_available(), *_cgroup_headroom(), *_rlimit_headroom()]
    known = [c for c in candidates if c is not None]
    return max(0, min(known)) if known else 8 << 30


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _cgroup_headroom() -> list[int]:
    """limit - usage for each memory cgroup the process is in (cgroup v2: its own and every ancestor's)."""
    out: list[int] = []
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, path = parts
        if hier == "0" and controllers == "":  # v2 unified hierarchy
            rel = path.strip("/")
            while True:
                base = os.path.join("/sys/fs/cgroup", rel)
                limit, used = _read_int(os.path.join(base, "memory.max")), _read_int(os.path.join(base, "memory.current"))
                if limit is not None:
                    out.append(limit - (used or 0))
                if not rel:
                    break
                rel = os.path.dirname(rel)
        elif "memory" in controllers.split(","):  # v1
            for base in (os.path.join("/sys/fs/cgroup/memory", path.strip("/")), "/sys/fs/cgroup/memory"):
                limit = _read_int(os.path.join(base, "memory.limit_in_bytes"))
                if limit is not None and limit < 1 << 60:  # v1 writes "no limit" as a huge number
                    out.append(limit - (_read_int(os.path.join(base, "memory.usage_in_bytes")) or 0))
                    break
    return out


def _rlimit_headroom() -> list[int]:
    """RLIMIT_AS - VmSize and RLIMIT_DATA - VmData (``ulimit -v`` / ``ulimit -d``), where a limit is set."""
    try:
        import resource
    except ImportError:  # pragma: no cover (not POSIX)
        return []
    status: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmSize", "VmData"):
                    status[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    out = []
    for limit_name, used_key in (("RLIMIT_AS", "VmSize"), ("RLIMIT_DATA", "VmData")):
        limit = getattr(resource, limit_name, None)
        if limit is None:
            continue
        soft, _ = resource.getrlimit(limit)
        if soft != resource.RLIM_INFINITY and soft > 0:
            out.append(soft - status.get(used_key, 0))
    return out


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    source: loader.ModelSource


def load_model(cfg: JobConfig, src: loader.ModelSource | None = None, tokenizer=None) -> LoadedModel:
    """Config, tokenizer and weights of ``cfg.model`` (``src`` / ``tokenizer`` when already resolved)."""
    src = src or loader.resolve_model(cfg.model)
    mcfg = loader.load_config(src)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tok = tokenizer if tokenizer is not None else loader.load_tokenizer(src, cfg.tokenizer, cfg.chat_template)
    model = build_model(mcfg, loader.iter_weights(src, mcfg, dtype, device), dtype, device)
    return LoadedModel(mcfg, model, tok, device, dtype, src)


# make_engine's signature: (cfg, loaded model, max_model_len) -> (engine, EOS ids)
EngineFactory = Callable[[JobConfig, LoadedModel, int], tuple[LLMEngine, frozenset[int]]]


def policy_limits(cfg: JobConfig) -> tuple[int | None, float, bool]:
    """(max_num_seqs, growth_reserve, prefix_caching) of ``cfg.policy``: the streaming baseline caps running
    sequences (vLLM's max_num_seqs default, 256), keeps no growth reserve and caches pages by hash."""
    baseline = cfg.policy == "fcfs-lru"
    max_num_seqs = cfg.max_num_seqs if cfg.max_num_seqs is not None else (256 if baseline else None)
    return max_num_seqs, 0.0 if baseline else 1.0, baseline


def fit_to_pool(pages: int, page_size: int, max_model_len: int) -> int:
    """The context a pool of ``pages`` pages can hold: a sequence can never outgrow the pool, and a group
    member also holds a private copy of its prefix's partial last page while the prefix keeps the
    original (one page of headroom). BatchLLMError when the pool holds no token at all."""
    pool_tokens = (pages - 1) * page_size
    if pool_tokens < 1:
        raise BatchLLMError(f"the KV pool ({pages} page(s) of {page_size} tokens) is too small: raise --kv-cache-tokens")
    return min(max_model_len, pool_tokens)


def scheduler_config(cfg: JobConfig, budget: int, max_model_len: int) -> SchedulerConfig:
    """The scheduler's limits for ``cfg.policy`` (``policy_limits``) under a step token budget."""
    max_num_seqs, growth_reserve, _ = policy_limits(cfg)
    return SchedulerConfig(page_size=cfg.page_size, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                           max_model_len=max_model_len, growth_reserve=growth_reserve)


def make_engine(cfg: JobConfig, lm: LoadedModel, max_model_len: int) -> tuple[LLMEngine, frozenset[int]]:
    """The engine for ``cfg`` on a loaded model (KV pool, scheduler limits, backend) and its EOS ids.

    Used by the single-process run and by each Ray replica (``batchllm.distributed.replica``). A KV
    cache sized from free memory is allocated here, and CUDA graphs are captured here (unless
    --enforce-eager), so build one engine per process and reuse it.
    """
    mcfg = lm.config
    budget = cfg.max_num_batched_tokens or default_token_budget(lm.device)
    max_num_seqs, _, prefix_caching = policy_limits(cfg)
    backend = get_backend(resolve_attention(cfg.attention, lm.device))
    graphs = "off" if cfg.enforce_eager else "auto"
    graph_batch = min(DEFAULT_MAX_GRAPH_BATCH, budget, max_num_seqs or DEFAULT_MAX_GRAPH_BATCH)
    uses_graphs = not cfg.enforce_eager and lm.device.type == "cuda" and graph_safe(backend)
    # the sampled rows of a step: at most one per running sequence, at most one per token of the budget
    pages = kv_pool_pages(cfg, mcfg, lm.device, lm.dtype, budget, model=lm.model, backend=backend,
                          sample_rows=min(budget, max_num_seqs or budget), graph_batch=graph_batch if uses_graphs else 0)
    max_model_len = fit_to_pool(pages, cfg.page_size, max_model_len)
    kv = KVCache(mcfg, pages, cfg.page_size, lm.dtype, lm.device)
    sched_cfg = scheduler_config(cfg, budget, max_model_len)
    engine = LLMEngine(
        lm.model, lm.tokenizer, kv, backend, sched_cfg, lm.device, mcfg.vocab_size, prefix_caching=prefix_caching,
        graphs=graphs, max_graph_batch=graph_batch,
    )
    return engine, frozenset(eos_token_ids(lm.tokenizer, mcfg))


def resolve_attention(spec: str, device: torch.device) -> str:
    """--attention: ``auto`` is the Triton backend on CUDA and the torch reference elsewhere (Triton runs
    on CPU tensors only under its interpreter); ``torch`` and ``triton`` are taken as given."""
    if spec == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return spec


def model_max_len(cfg: JobConfig, mcfg: ModelConfig) -> int:
    """The context limit of the job: --max-model-len capped by the model's."""
    return min(cfg.max_model_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings)


ProgressHook = Callable[[str, dict], None]


def run_job(cfg: JobConfig, progress: ProgressHook | None = None, loaded: LoadedModel | None = None, *, overwrite: bool = False,
            engine_factory: EngineFactory | None = None) -> JobSummary:
    """Run a whole job, or what is left of it; ``progress(event, info)`` gets 'ray_starting' (scale-out), 'resumed', 'read',
    'loaded', 'planned', 'step' and 'done' (no 'loaded' / 'planned' when nothing is left to generate).

    ``overwrite`` deletes a previous job's results in the output folder instead of resuming it.
    ``engine_factory`` builds the single-process engine in place of ``make_engine`` (same signature and
    contract: a fresh engine state for this run); ``batchllm bench`` passes one that reuses its KV cache
    and decode graphs across runs. Raises
    ``JobInterrupted`` after a SIGINT / SIGTERM (complete requests committed), ``CommitError`` when the
    output cannot be written (committed shards stay valid), ``BatchLLMError`` for other job-level failures.
    """
    cfg.validate()
    cfg = cfg.with_absolute_paths()
    if len(set(cfg.inputs)) != len(cfg.inputs):  # rows are keyed by (input position, row index)
        raise BatchLLMError("the same input file is given twice")
    check_inputs_outside(cfg.output, cfg.inputs)  # before the folder is opened, let alone claimed
    emit = progress or (lambda event, info: None)
    summary = JobSummary()
    mapping = ColumnMapping(cfg.id_column, cfg.prompt_column, cfg.messages_column, cfg.prompt_template, cfg.system_prompt, cfg.chat)
    read_requests(cfg.inputs, mapping, cfg.sampling_defaults(), split=cfg.split)  # unreadable inputs fail now, before any loading

    cluster = None
    if cfg.distributed:  # Ray first: the replicas' device (GPU or CPU) decides the dtype, part of the job's identity
        from batchllm.distributed.driver import RayCluster

        emit("ray_starting", {"address": cfg.ray_address, "replicas": cfg.replicas})
        cluster = RayCluster(cfg)
    try:
        return _run_job(cfg, emit, summary, loaded, overwrite, cluster, engine_factory)
    finally:
        if cluster is not None:
            cluster.close()


def _run_job(cfg, emit, summary, loaded, overwrite, cluster, engine_factory=None) -> JobSummary:
    # JOB FOLDER: identity first (tokenizer and weights' identity only, not the weights), then new / resume / refuse
    src = loader.resolve_model(cfg.model)
    if cluster is not None:
        dtype = cluster.dtype = resolve_dtype(cfg.dtype, torch.device(cluster.device))
    else:
        device = resolve_device(cfg.device)
        dtype = loaded.dtype if loaded is not None else resolve_dtype(cfg.dtype, device)
    overridden = cfg.tokenizer is not None or cfg.chat_template is not None  # --tokenizer / --chat-template
    tok = loaded.tokenizer if loaded is not None and not overridden else loader.load_tokenizer(src, cfg.tokenizer, cfg.chat_template)
    if cfg.chat and not getattr(tok, "chat_template", None):
        raise BatchLLMError(f"--chat needs a chat template and {src.display_name}'s tokenizer has none: drop --chat (prompts "
                            "are then sent as raw text) or use a model that ships a chat template")
    extra_fields = output_fields(cfg)  # --keep-columns: checked before the folder is touched
    fingerprint = job_fingerprint(cfg, src, tok, dtype)
    folder = open_job_folder(cfg.output, fingerprint, overwrite=overwrite)
    try:
        writer = ShardWriter(cfg.output, cfg.shard_rows, job_spec=cfg.to_dict(), manifest=folder.manifest,
                             fingerprint=fingerprint, input_files=cfg.inputs, lock=folder.lock,
                             extra_fields=extra_fields)
    except BaseException:
        folder.lock.release()
        raise
    m = writer.manifest
    status = StatusFile(cfg.output, m["job_id"], m["created_at"], m["input_files"], src.display_name)
    recorder = ResultRecorder(writer, status)
    summary.done_before = recorder.done_before
    if folder.resuming:
        emit("resumed", {"done": recorder.done_before, "output": cfg.output})
    recorder.update_status(stage="loading", force=True)
    try:
        with stop_on_signals() as stop:
            _run(cfg, emit, summary, loaded, src, tok, folder, writer, recorder, stop, cluster, engine_factory)
    except JobInterrupted:
        status.finish(CANCELLED)
        raise
    except CommitError as e:
        owned = writer.holds_folder()  # a run that lost the folder leaves its status to the new holder
        writer.abandon()
        if owned:
            status.finish(FAILED, str(e))
        raise CommitError(f"{e}; fix that, then resume with: batchllm resume {cfg.output}") from None
    except BaseException as e:
        owned = writer.holds_folder()
        writer.abandon()
        if owned:
            status.finish(FAILED, str(e) or type(e).__name__)
        raise
    status.finish(COMPLETED)
    emit("done", {})
    return summary


def output_fields(cfg: JobConfig) -> list[pa.Field]:
    """--keep-columns: the output columns after ``OUTPUT_SCHEMA``'s, one per kept input column, typed as in
    the input or JSON text (a string column with ``KEPT_JSON_METADATA``): ``readers.resolve_keep_columns``.
    Empty without the option; a bad one raises BatchLLMError."""
    if not cfg.keep_columns:
        return []
    mapping = ColumnMapping(cfg.id_column, cfg.prompt_column, cfg.messages_column, cfg.prompt_template, cfg.system_prompt, cfg.chat)
    kept = resolve_keep_columns(cfg.inputs, cfg.keep_columns, mapping, OUTPUT_SCHEMA.names, split=getattr(cfg, "split", None))
    return [pa.field(name, pa.string(), metadata=KEPT_JSON_METADATA) if t is None else pa.field(name, t) for name, t in kept]


def kept_columns(fields: list[pa.Field]) -> dict[str, bool]:
    """The reader's ``keep`` for ``output_fields``: column name -> stored as JSON text."""
    return {f.name: all((f.metadata or {}).get(k) == v for k, v in KEPT_JSON_METADATA.items()) for f in fields}


def job_fingerprint(cfg: JobConfig, src: loader.ModelSource, tok, dtype: torch.dtype) -> dict:
    """What changes this job's outputs (``batchllm.jobs.manifest.build_fingerprint``); ``cfg`` with
    absolute paths. Inputs are identified through ``readers.input_identity``: a local path as the
    manifest module does, a URI through its filesystem, a hub dataset by its cached data, ``--split``
    included."""
    fp = build_fingerprint(
        weights=loader.weights_fingerprint(src), model_name=src.display_name, tokenizer=tok,
        sampling=dataclasses.asdict(cfg.sampling_defaults()), seed=cfg.seed, columns=cfg.column_mapping_dict(),
        max_model_len=cfg.max_model_len, dtype=str(dtype).removeprefix("torch."), inputs=[],
    )
    fp["inputs"] = [input_identity(p, cfg.split) for p in cfg.inputs]
    return fp


def _run(cfg, emit, summary, loaded, src, tok, folder, writer, recorder, stop, cluster=None, engine_factory=None) -> None:
    """READ + TOKENIZE (remaining rows only) -> LOAD -> PLAN -> ENGINE -> WRITE, inside the signal handlers.

    The weights load only once there is something to generate: rerunning a finished job costs no load.
    """
    mcfg = loaded.config if loaded is not None else loader.load_config(src)
    max_model_len = model_max_len(cfg, mcfg)
    t0 = time.perf_counter()
    recorder.update_status(stage="reading", force=True)
    requests = read_and_tokenize(cfg, tok, mcfg, max_model_len, lambda e: record_error(summary, recorder, e), folder, stop,
                                  keep=kept_columns(writer.extra_fields))
    read_seconds = time.perf_counter() - t0
    _check_stop(stop, cfg, writer)
    # Commit the read phase's error records now: from here on a resume may skip finished rows unread
    # (every duplicate custom_id is then a committed error row; see batchllm.jobs.folder).
    writer.flush()
    writer.write_manifest(read_complete=True)
    summary.requests = recorder.done_before + len(requests) + summary.errors
    recorder.status.set_counts(total=summary.requests)

    plan = make_plan(requests, cfg.policy, max_model_len, cfg.page_size)
    if plan is not None:
        summary.planned_saving, summary.max_saving = plan.saving(), plan.max_saving()
    total_samples = sum(r.sampling.n for r in requests)
    emit("read", {"requests": len(requests), "errors": summary.errors, "model": src.display_name})
    if not requests:  # nothing (left) to generate
        _close_run(writer, recorder, summary)
        return
    if cluster is not None:  # the engine runs on Ray replicas; this process plans, commits and reports
        from batchllm.distributed.driver import run_distributed

        t0 = time.perf_counter() - read_seconds
        stopped = run_distributed(cluster, cfg, requests, plan, emit=emit, summary=summary, writer=writer, recorder=recorder,
                                  stop=stop, model_name=src.display_name)
        summary.wall_seconds = time.perf_counter() - t0 - summary.load_seconds  # reading counts, starting replicas not
        _close_run(writer, recorder, summary)
        if stopped:
            raise JobInterrupted(stop.signum, cfg.output, writer.rows_written)
        return
    t_load = time.perf_counter()
    lm = loaded or load_model(cfg, src=src, tokenizer=tok)  # the tokenizer the fingerprint saw
    if lm.tokenizer is not tok:  # a preloaded model under --tokenizer / --chat-template: the job's tokenizer decodes
        lm = dataclasses.replace(lm, tokenizer=tok)
    summary.load_seconds = time.perf_counter() - t_load
    emit("loaded", {"model": lm.source.display_name, "device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch.")})
    planned_budget = token_budget(requests, max_model_len)
    emit("planned", {"requests": len(requests), "samples": total_samples, "errors": summary.errors, "done_before": summary.done_before,
                     "token_budget": planned_budget})
    _check_stop(stop, cfg, writer)
    t0 = time.perf_counter() - read_seconds  # wall time counts reading, not the weights' load

    engine, eos = (engine_factory or make_engine)(cfg, lm, max_model_len)
    if engine.cfg.max_model_len < max_model_len:
        # the KV pool is smaller than the context: prompts that can never fit become row errors
        fits = engine.cfg.max_model_len
        kept = []
        for r in requests:
            if len(r.token_ids) < fits:
                kept.append(r)
                continue
            record_error(summary, recorder, RowError(
                r.input_file, r.input_index, rq.PROMPT_TOO_LONG,
                f"prompt has {len(r.token_ids)} tokens; the KV cache holds at most {fits} tokens per sequence "
                "(raise --kv-cache-tokens or lower --max-model-len)", r.custom_id, kept=r.kept))
        if len(kept) < len(requests):
            requests = kept
            plan = make_plan(requests, cfg.policy, engine.cfg.max_model_len, cfg.page_size)
            if not requests:
                _close_run(writer, recorder, summary)
                return

    def on_finish(seq: Sequence) -> None:
        req = requests[seq.request_index]
        recorder.sample(seq.request_index, req.sampling.n, completion_row(req, seq))
        summary.samples += 1
        summary.prompt_tokens += seq.prompt_len
        summary.cached_tokens += seq.num_cached
        summary.output_tokens += len(seq.output_ids)
        if len(summary.preview) < cfg.preview:
            summary.preview.append({"custom_id": req.custom_id, "prompt": _prompt_preview(req), "text": seq.text})
        progress["released"] += max(0, _sample_budget(req, max_len) - len(seq.output_ids))  # stopped early

    # Progress over the output token budget (each sample's max_tokens): it moves with every generated
    # token, so it advances while requests run even when all of them run at once; a sample that stops
    # early releases the rest of its budget, and requests the KV pool cannot hold (above) release theirs.
    max_len = engine.cfg.max_model_len
    progress = {"released": planned_budget - token_budget(requests, max_len), "done": 0}

    def on_step(stats: StepStats) -> None:
        released, progress["released"] = progress["released"], 0
        prompt = stats.num_tokens - stats.num_decodes  # prompt tokens computed (prefill chunks, shared prefixes)
        progress["done"] += stats.new_output_tokens + released
        emit("step", {"finished": stats.num_finished, "new_tokens": stats.new_output_tokens, "prompt_tokens": prompt,
                      "released": released})
        recorder.engine_step(stats.new_output_tokens, prompt, progress["done"] / planned_budget if planned_budget else None)
        recorder.update_status()
        if stop:
            raise _Stopped  # out of engine.run: nothing more is admitted, complete requests are committed below

    recorder.status.generation_started(recorder.done_before)
    recorder.update_status(stage="generating", force=True)
    stopped = False
    try:
        engine.run(build_sources(requests, plan, eos, cfg.seed, cfg.page_size), on_finish, on_step)
    except _Stopped:
        stopped = True
    summary.wall_seconds = time.perf_counter() - t0
    _batch_stats(summary, engine.step_stats)
    if engine.scheduler is not None:
        summary.num_preemptions = engine.scheduler.num_preemptions
        summary.prompt_tokens_computed = engine.scheduler.prompt_tokens_computed
    _close_run(writer, recorder, summary)
    if stopped:
        raise JobInterrupted(stop.signum, cfg.output, writer.rows_written)


def _close_run(writer: ShardWriter, recorder: ResultRecorder, summary: JobSummary) -> None:
    """Commit what is buffered with the run's summary, and bring the status file up to date."""
    writer.close(summary=summary.to_dict())
    recorder.update_status(force=True)


class _Stopped(Exception):
    """Internal: a stop signal arrived; raised from the engine's step callback to leave its loop."""


def _check_stop(stop: StopFlag, cfg: JobConfig, writer: ShardWriter) -> None:
    """Between stages: on a stop signal, commit what is complete and raise JobInterrupted."""
    if stop:
        writer.close()
        raise JobInterrupted(stop.signum, cfg.output, writer.rows_written)


def record_error(summary: JobSummary, recorder: ResultRecorder, err: RowError) -> None:
    summary.errors += 1
    summary.errors_by_code[err.error_code] = summary.errors_by_code.get(err.error_code, 0) + 1
    recorder.error(error_row(err))


def _prompt_preview(req: Request) -> str:
    if req.messages is not None:
        return str(req.messages[-1].get("content", ""))
    if req.prompt is not None:
        return req.prompt
    return f"<{len(req.prompt_token_ids)} token ids>"


def _sample_budget(req: Request, max_model_len: int) -> int:
    """The most output tokens one sample of ``req`` can get: max_tokens, or what the context leaves."""
    return max(1, min(req.sampling.max_tokens, max_model_len - len(req.token_ids)))


def token_budget(requests: list[Request], max_model_len: int) -> int:
    """The job's output token budget, the unit of the progress bar: every sample's ``_sample_budget``."""
    return sum(r.sampling.n * _sample_budget(r, max_model_len) for r in requests)


def _batch_stats(summary: JobSummary, steps: list[StepStats]) -> None:
    summary.num_steps = len(steps)
    if steps:
        seqs = [s.num_seqs for s in steps]
        toks = [s.num_tokens for s in steps]
        summary.batch_seqs = (min(seqs), float(statistics.median(seqs)), max(seqs))
        summary.batch_tokens = (min(toks), float(statistics.median(toks)), max(toks))
