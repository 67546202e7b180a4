"""A model and an engine from a job configuration: device and dtype, memory probes, KV pool sizing,
model loading, scheduler limits, the engine.

Used by the single-process job (``batchllm.pipeline``), each Ray replica (``batchllm.distributed.replica``)
and the bench's shared engine (``batchllm.bench.engines``), so all three size and build the same engine
for the same ``JobConfig``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable

import torch

from batchllm.config import DTYPE_ALIASES, JobConfig
from batchllm.engine.attention import get_backend
from batchllm.engine.cuda_graphs import DEFAULT_MAX_GRAPH_BATCH, graph_safe
from batchllm.engine.engine import LLMEngine
from batchllm.engine.kv_cache import KVCache
from batchllm.engine.scheduler import SchedulerConfig
from batchllm.errors import BatchLLMError
from batchllm.models import hf_folder, kv_scales, loader
from batchllm.models.config import ModelConfig
from batchllm.models.llama import build_model
from batchllm.models.tokenizer import eos_token_ids

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


def resolve_kv_cache_dtype(spec: str, dtype: torch.dtype) -> torch.dtype:
    """--kv-cache-dtype: ``auto`` is the model's ``dtype``, also for a checkpoint with calibrated FP8 KV
    scales (as vLLM for compressed-tensors: ``batchllm.models.kv_scales``); ``fp8`` and ``fp8_e4m3``
    (vLLM's spellings) are ``float8_e4m3fn``, one byte per element (``batchllm.engine.kv_cache``)."""
    if spec == "auto":
        return dtype
    if spec in ("fp8", "fp8_e4m3"):
        return torch.float8_e4m3fn
    raise BatchLLMError(f"unknown KV cache dtype {spec!r}: use auto, fp8 or fp8_e4m3")



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
    """Number of KV pages of ``dtype`` (the KV cache's: ``resolve_kv_cache_dtype``): from
    --kv-cache-tokens, else from memory.

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
    # the checkpoint's calibrated FP8 KV scales, set on the model's layers (used with --kv-cache-dtype fp8)
    kv_scheme: kv_scales.KVCacheScheme | None = None


def load_model(cfg: JobConfig, src: loader.ModelSource | None = None, tokenizer=None) -> LoadedModel:
    """Config, tokenizer and weights of ``cfg.model`` (``src`` / ``tokenizer`` when already resolved), and the
    FP8 KV scales of a Hugging Face folder that has them (``batchllm.models.kv_scales``)."""
    src = src or loader.resolve_model(cfg.model)
    mcfg = loader.load_config(src)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tok = tokenizer if tokenizer is not None else loader.load_tokenizer(src, cfg.tokenizer, cfg.chat_template)
    model = build_model(mcfg, loader.iter_weights(src, mcfg, dtype, device), dtype, device)
    return LoadedModel(mcfg, model, tok, device, dtype, src, load_kv_scales(model, src, mcfg))


def load_kv_scales(model: torch.nn.Module, src: loader.ModelSource, mcfg: ModelConfig) -> kv_scales.KVCacheScheme | None:
    """Set every attention layer's FP8 KV scales from ``src`` when it is a Hugging Face folder whose
    config.json declares a ``kv_cache_scheme``; returns that scheme (None: the scales stay 1.0)."""
    if src.kind != "hf":
        return None
    folder = Path(src.path)
    found = kv_scales.read_kv_scales(folder, hf_folder.safetensors_files(folder), mcfg.num_layers, mcfg.num_kv_heads)
    if found is None:
        return None
    scheme, scales = found
    for layer, (k_scale, v_scale) in zip(model.layers, scales):
        layer.self_attn.set_kv_scales(k_scale, v_scale)
    return scheme


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
    kv_dtype = resolve_kv_cache_dtype(cfg.kv_cache_dtype, lm.dtype)
    if lm.kv_scheme is not None and kv_dtype != torch.float8_e4m3fn:
        log.info("%s carries calibrated FP8 KV cache scales (kv_cache_scheme, strategy %s); they apply with "
                 "--kv-cache-dtype fp8, this job's KV cache is %s", lm.source.display_name, lm.kv_scheme.strategy,
                 str(kv_dtype).removeprefix("torch."))
    pages = kv_pool_pages(cfg, mcfg, lm.device, kv_dtype, budget, model=lm.model, backend=backend,
                          sample_rows=min(budget, max_num_seqs or budget), graph_batch=graph_batch if uses_graphs else 0)
    max_model_len = fit_to_pool(pages, cfg.page_size, max_model_len)
    kv = KVCache(mcfg, pages, cfg.page_size, kv_dtype, lm.device)
    sched_cfg = scheduler_config(cfg, budget, max_model_len)
    engine = LLMEngine(
        lm.model, lm.tokenizer, kv, backend, sched_cfg, lm.device, mcfg.vocab_size, prefix_caching=prefix_caching,
        graphs=graphs, max_graph_batch=graph_batch, sampler_backend=cfg.sampler,
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
