"""``TritonAttention``: the attention backend built on ``batchllm.kernels`` (``get_backend("triton")``).

Per step it plans once (host-side numpy, reused by every layer of the step) and per layer it stores the
new K/V and runs the planned launches: with ``meta.prefix_groups`` the prefix-shared path (Hydragen /
BatchLLM: members' queries stacked against their shared prefix, own parts as paged attention, exact
log-sum-exp merge), else plain paged attention. Works on CUDA tensors, and on CPU tensors under
Triton's interpreter (slow; for tests).

Graphed decode steps (``batchllm.engine.cuda_graphs``) bring a ``StaticDecodeMetadata``: then nothing is
planned on the host. The work list is a device section the runner refills each step
(``fill_static_decode_work``: ``kv_splits`` key ranges per row, a count fixed per bucket), the launch grid
and the merge lists depend on the bucket only, and positions come from the step's device inputs, so
the same launches are valid in every replay of a captured graph.
"""

from __future__ import annotations

import numpy as np
import torch
from batchllm.kernels.kv_store import store_kv
from batchllm.kernels.paged_attention import (
    WORK_FIELDS,
    AttentionPlan,
    AttentionTuning,
    WorkLaunch,
    check_heads,
    num_sms,
    resolve_merge_heads,
    resolve_tiles,
    run_plan,
)
from batchllm.kernels.prefix_attention import plan_prefix_shared_attention

from batchllm.engine.attention_backend import AttentionBackend, AttentionMetadata
from batchllm.engine.cuda_graphs import StaticDecodeMetadata

# at most this many key ranges per decode row in a graphed step: each is a program even when empty
MAX_STATIC_SPLITS = 16
_NO_LIMIT = 2**31 - 1


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
        self._static_plans: dict[tuple, AttentionPlan] = {}

    def store_kv(self, k, v, kv_cache, meta, kv_scales=None):
        store_kv(k, v, kv_cache, meta.slot_mapping, kv_scales)

    def plan(self, meta: AttentionMetadata, num_heads: int, num_kv_heads: int, head_dim: int,
             device: torch.device, dtype: torch.dtype | None = None) -> AttentionPlan:
        key = (num_heads, num_kv_heads, head_dim, device, dtype)
        if self._meta is not meta or self._key != key:
            self._plan = plan_prefix_shared_attention(
                meta.query_lens_host, meta.seq_lens_host, meta.prefix_groups,
                num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, device=device,
                tuning=self.tuning, min_group_size=self.min_group_size, dtype=dtype,
            )
            self._meta, self._key = meta, key
        return self._plan

    def forward(self, q, kv_cache, meta, scale, kv_scales=None):
        if q.dim() != 3 or kv_cache.dim() != 5:
            raise ValueError(f"q must be (T, heads, d) and kv_cache (2, pages, page_size, kv_heads, d); got "
                             f"{tuple(q.shape)}, {tuple(kv_cache.shape)}")
        if isinstance(meta, StaticDecodeMetadata):
            plan = self.static_plan(meta, q.shape[1], kv_cache.shape[3], q.shape[2], q.device, q.dtype)
        else:
            plan = self.plan(meta, q.shape[1], kv_cache.shape[3], q.shape[2], q.device, q.dtype)
        out, _ = run_plan(q, kv_cache, meta.block_tables, plan, scale, kv_scales=kv_scales)
        return out

    # -- graphed decode steps ----------------------------------------------------------------------
    def supports_cuda_graphs(self) -> bool:
        """True: the store skips slot -1 in-kernel, and graphed decode plans read only device tensors."""
        return True

    def static_decode_splits(self, bucket: int, num_kv_heads: int, device: torch.device) -> int:
        """Key ranges per row of a graphed decode step of ``bucket`` rows: enough programs for about
        ``programs_per_sm`` per SM (flash-decoding), at most ``MAX_STATIC_SPLITS``; 1 when splitting is off."""
        if self.tuning.kv_chunk == 0:
            return 1
        target = self.tuning.programs_per_sm * num_sms(torch.device(device))
        return int(min(MAX_STATIC_SPLITS, max(1, -(-target // (bucket * num_kv_heads)))))

    def fill_static_decode_work(self, work: np.ndarray, seq_lens: np.ndarray, splits: int, page_size: int) -> None:
        """Fill the host work list (rows x splits, WORK_FIELDS) of a graphed decode step.

        Row i, piece s reads keys ``[s * chunk, (s + 1) * chunk)`` (the last piece to the end; the kernel
        stops at the query position), with one chunk size for the step from its longest sequence. Pieces
        past a row's length are empty programs whose partial a merge weighs as nothing. Padding rows
        (length 1) read key 0 of page 0 and their output is discarded."""
        b = seq_lens.shape[0]
        if work.shape != (b * splits, WORK_FIELDS):
            raise ValueError(f"work must be ({b * splits}, {WORK_FIELDS}), got {work.shape}")
        row = np.repeat(np.arange(b), splits)
        piece = np.tile(np.arange(splits), b)
        work[:, 0] = row
        work[:, 1] = 1
        work[:, 2] = row
        if splits == 1:
            work[:, 3] = 0
            work[:, 4] = _NO_LIMIT
            work[:, 5] = -1
            return
        longest = int(seq_lens.max()) if b else 1
        chunk = self.tuning.kv_chunk or max(self.tuning.min_kv_chunk, -(-longest // splits))
        chunk = -(-chunk // page_size) * page_size
        work[:, 3] = piece * chunk
        work[:, 4] = np.where(piece == splits - 1, _NO_LIMIT, (piece + 1) * chunk)
        work[:, 5] = row * splits + piece

    def static_plan(self, meta: StaticDecodeMetadata, num_heads: int, num_kv_heads: int, head_dim: int,
                    device: torch.device, dtype: torch.dtype | None = None) -> AttentionPlan:
        """The plan of a graphed decode step: views of the metadata's device sections plus merge lists that
        depend on the bucket only. Built once per bucket (before capture) and reused by every replay."""
        if meta.decode_work is None or meta.positions is None:
            raise ValueError("a static decode step needs decode_work and positions (see static_decode_splits)")
        b, splits = meta.num_seqs, meta.kv_splits
        key = (meta.decode_work.data_ptr(), meta.positions.data_ptr(), b, splits, num_heads, num_kv_heads, head_dim,
               device, dtype)
        plan = self._static_plans.get(key)
        if plan is not None:
            return plan
        g = check_heads(num_heads, num_kv_heads)
        _, narrow = resolve_tiles(head_dim, g, self.tuning, dtype)
        merge_dst = merge_start = merge_src = None
        if splits > 1:  # made on the device: no host copy, and fixed for the bucket
            merge_dst = torch.arange(b, dtype=torch.int32, device=device)
            merge_start = torch.arange(0, b * splits + 1, splits, dtype=torch.int32, device=device)
            merge_src = torch.arange(b * splits, dtype=torch.int32, device=device)
        plan = AttentionPlan(b, num_heads, num_kv_heads, meta.positions, [WorkLaunch(meta.decode_work, narrow)],
                             b * splits if splits > 1 else 0, merge_dst, merge_start, merge_src,
                             resolve_merge_heads(num_heads, self.tuning))
        self._static_plans[key] = plan
        return plan
