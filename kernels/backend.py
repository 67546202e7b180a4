"""``TritonAttention``: the attention backend built on ``batchllm.kernels`` (registered as "triton").

Per step it plans once (host-side numpy, reused by every layer of the step) and per layer it stores the
new K/V and runs the planned launches: with ``meta.prefix_groups`` the prefix-shared path (Hydragen /
BatchLLM: members' queries stacked against their shared prefix, own parts as paged attention, exact
log-sum-exp merge), else plain paged attention. Works on CUDA tensors, and on CPU tensors under
Triton's interpreter (slow; for tests).
"""

from __future__ import annotations

import torch
from batchllm.kernels.kv_store import store_kv
from batchllm.kernels.paged_attention import AttentionPlan, AttentionTuning, run_plan
from batchllm.kernels.prefix_attention import plan_prefix_shared_attention

from batchllm.engine.attention import (
    AttentionBackend,
    AttentionMetadata,
    register_backend,
)


class TritonAttention(AttentionBackend):
    """Paged / prefix-shared attention in Triton.

    The plan is cached for the metadata object it was built from: the engine builds one
    ``AttentionMetadata`` per step and calls ``forward`` once per layer with it, so a step pays for
    planning (and the upload of the work lists) once. Metadata must not be mutated after the first
    ``forward`` of its step.
    """

    name = "triton"

    def __init__(self, tuning: AttentionTuning | None = None, min_group_size: int = 2):
        self.tuning = tuning or AttentionTuning()
        self.min_group_size = min_group_size
        self._meta: AttentionMetadata | None = None
        self._key: tuple | None = None
        self._plan: AttentionPlan | None = None

    def store_kv(self, k, v, kv_cache, meta):
        store_kv(k, v, kv_cache, meta.slot_mapping)

    def plan(self, meta: AttentionMetadata, num_heads: int, num_kv_heads: int, head_dim: int,
             device: torch.device) -> AttentionPlan:
        key = (num_heads, num_kv_heads, head_dim, device)
        if self._meta is not meta or self._key != key:
            self._plan = plan_prefix_shared_attention(
                meta.query_lens_host, meta.seq_lens_host, meta.prefix_groups,
                num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, device=device,
                tuning=self.tuning, min_group_size=self.min_group_size,
            )
            self._meta, self._key = meta, key
        return self._plan

    def forward(self, q, kv_cache, meta, scale):
        if q.dim() != 3 or kv_cache.dim() != 5:
            raise ValueError(f"q must be (T, heads, d) and kv_cache (2, pages, page_size, kv_heads, d); got "
                             f"{tuple(q.shape)}, {tuple(kv_cache.shape)}")
        plan = self.plan(meta, q.shape[1], kv_cache.shape[3], q.shape[2], q.device)
        out, _ = run_plan(q, kv_cache, meta.block_tables, plan, scale)
        return out


register_backend("triton", TritonAttention)
