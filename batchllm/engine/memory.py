"""KV pool sizing on CUDA: what is left of the allowed memory after the weights, a profiled step and graphs.

    pool bytes = utilization * total
                 - weights                (torch memory allocated before profiling)
                 - peak activation        (max_memory_allocated over a warm-up forward at the step token
                                           budget, LM head and a softmax over the sampled rows included)
                 - graph reserve          (the same measurement for a decode step of the largest graph
                                           bucket: captured graphs keep a private pool of that size)
                 - non-torch memory       (CUDA context, cuBLAS / Triton workspaces and other processes:
                                           used device memory that torch's allocator does not hold)

``utilization`` is ``--gpu-memory-utilization`` (vLLM's meaning: the fraction of the GPU's total memory
this process may use). The warm-up forward runs on a one-page dummy KV cache with every slot -1, so it
writes no K/V and reads only page 0; it also compiles the step's Triton kernels once.

``dummy_step`` is device-agnostic and runs on the CPU in tests; only the measurement needs CUDA.
"""

from __future__ import annotations

import dataclasses

import torch

from batchllm.engine.attention import AttentionBackend, AttentionMetadata

GRAPH_SLACK_BYTES = 64 << 20  # graph objects and allocator rounding beyond the measured decode peak


def check_utilization(u: float) -> float:
    """``u`` if 0 < u <= 1, else ValueError naming the option."""
    if not (isinstance(u, (int, float)) and 0 < u <= 1):
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {u!r}")
    return float(u)


def cuda_pool_bytes(*, total: int, weights: int, peak_activation: int, graph_reserve: int, non_torch: int,
                    utilization: float) -> int:
    """The formula of the module docstring; may be negative (the caller reports it)."""
    return int(check_utilization(utilization) * total - weights - peak_activation - graph_reserve - non_torch)


@torch.inference_mode()
def dummy_step(model, backend: AttentionBackend, num_tokens: int, sample_rows: int, page_size: int,
               device: torch.device, dtype: torch.dtype) -> None:
    """One forward of a single ``num_tokens``-token prefill chunk, then the LM head and a float32 softmax
    (a stand-in for the sampler) over ``sample_rows`` rows. Writes nothing to any cache. ``dtype`` is the
    KV cache's (the model's, or float8_e4m3fn), so the warm-up compiles the kernels the job runs."""
    cfg = model.config
    t = num_tokens
    kv = torch.zeros(2, 1, page_size, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device)
    pages = -(-t // page_size)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, t], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([t], dtype=torch.int32, device=device),
        block_tables=torch.zeros(1, pages, dtype=torch.int32, device=device),
        slot_mapping=torch.full((t,), -1, dtype=torch.int64, device=device),
        num_decodes=1 if t == 1 else 0, query_lens_host=[t], seq_lens_host=[t], prefix_groups=None, has_padding=True,
    )
    ids = torch.zeros(t, dtype=torch.int32, device=device)
    positions = torch.arange(t, dtype=torch.int32, device=device)
    hidden = model(ids, positions, [kv] * cfg.num_layers, meta, backend)
    rows = min(sample_rows, t)
    logits = model.compute_logits(hidden[:rows])
    torch.softmax(logits, dim=-1)


@dataclasses.dataclass
class MemoryProfile:
    total: int
    weights: int
    peak_activation: int
    graph_reserve: int
    non_torch: int

    def pool_bytes(self, utilization: float) -> int:
        return cuda_pool_bytes(total=self.total, weights=self.weights, peak_activation=self.peak_activation,
                               graph_reserve=self.graph_reserve, non_torch=self.non_torch, utilization=utilization)


def profile_cuda(model, backend: AttentionBackend, *, max_tokens: int, sample_rows: int, graph_batch: int,
                 page_size: int, device: torch.device, dtype: torch.dtype) -> MemoryProfile:
    """Measure the terms of the formula on ``device`` (CUDA) with warm-up forwards."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated(device)

    def peak_of(tokens: int, rows: int) -> int:
        torch.cuda.reset_peak_memory_stats(device)
        dummy_step(model, backend, tokens, rows, page_size, device, dtype)
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - weights)

    peak = peak_of(max_tokens, sample_rows)
    graph = peak_of(graph_batch, graph_batch) + GRAPH_SLACK_BYTES if graph_batch > 0 else 0
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    non_torch = max(0, (total - free) - torch.cuda.memory_reserved(device))
    return MemoryProfile(total, weights, peak, graph, non_torch)
