"""Turns a ``ScheduledStep`` into model inputs, runs the forward pass, and returns the logits to sample.

Inputs are built with numpy on the host and moved to the device in one copy per tensor (pinned when on
CUDA). Only the last token of each sequence that completes its pending tokens this step goes through
the LM head: prefill chunks that stop mid-prompt and shared prefixes need no logits.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from batchllm.engine.attention import AttentionBackend, AttentionMetadata, PrefixGroupDescriptor
from batchllm.engine.kv_cache import KVCache
from batchllm.engine.scheduler import ScheduledStep
from batchllm.engine.sequence import Sequence


@dataclasses.dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the hidden states to sample from
    samplers: list[Sequence]  # the sequences those rows belong to, same order


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv: KVCache, backend: AttentionBackend, device: torch.device):
        self.model, self.kv, self.backend, self.device = model, kv, backend, device
        self.page_size = kv.page_size
        self._pin = device.type == "cuda"

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(arr)
        if self._pin:
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def prepare(self, step: ScheduledStep) -> StepInputs:
        ps = self.page_size
        n = len(step.items)
        total = step.total_tokens
        input_ids = np.empty(total, dtype=np.int64)
        positions = np.empty(total, dtype=np.int64)
        qsl = np.zeros(n + 1, dtype=np.int32)
        seq_lens = np.empty(n, dtype=np.int32)
        max_pages = max(len(it.pages) for it in step.items)
        block_tables = np.zeros((n, max_pages), dtype=np.int32)
        logits_rows: list[int] = []
        samplers: list[Sequence] = []
        pos = 0
        for i, (item, q) in enumerate(zip(step.items, step.num_tokens)):
            start = item.num_computed
            if isinstance(item, Sequence):
                toks = item.token_slice(start, start + q)
            else:
                toks = item.token_ids[start : start + q]
            input_ids[pos : pos + q] = toks
            positions[pos : pos + q] = np.arange(start, start + q)
            block_tables[i, : len(item.pages)] = item.pages
            seq_lens[i] = start + q
            pos += q
            qsl[i + 1] = pos
            if isinstance(item, Sequence) and start + q == item.total_len:
                logits_rows.append(pos - 1)
                samplers.append(item)
        # slot of every new token: page_of(position) * page_size + position % page_size
        seq_of_token = np.repeat(np.arange(n), step.num_tokens)
        slot_mapping = block_tables[seq_of_token, positions // ps].astype(np.int64) * ps + positions % ps
        meta = AttentionMetadata(
            query_start_loc=self._to_device(qsl),
            seq_lens=self._to_device(seq_lens),
            block_tables=self._to_device(block_tables),
            slot_mapping=self._to_device(slot_mapping),
            num_decodes=step.num_decodes,
            query_lens_host=list(step.num_tokens),
            seq_lens_host=seq_lens.tolist(),
            prefix_groups=prefix_groups_for_step(step.items, step.num_decodes),
        )
        return StepInputs(
            input_ids=self._to_device(input_ids),
            positions=self._to_device(positions),
            meta=meta,
            logits_indices=self._to_device(np.asarray(logits_rows, dtype=np.int64)),
            samplers=samplers,
        )

    @torch.inference_mode()
    def run(self, step: ScheduledStep) -> tuple[torch.Tensor | None, list[Sequence]]:
        """Forward the step; returns (fp32 logits of the sampling rows or None, the sampling sequences)."""
        inp = self.prepare(step)
        hidden = self.model(inp.input_ids, inp.positions, self.kv.layers, inp.meta, self.backend)
        if not inp.samplers:
            return None, []
        return self.model.compute_logits(hidden[inp.logits_indices]), inp.samplers


def prefix_groups_for_step(items, num_decodes: int) -> list[PrefixGroupDescriptor]:
    """Runs of consecutive sequences of the step that belong to one (computed) shared prefix.

    Decodes come first, so a group with both decoding and prefilling members yields two descriptors.
    ``prefix_len`` is the whole prefix, partial last page included: every member's copy of that page
    holds the same prefix tokens.
    """
    groups: list[PrefixGroupDescriptor] = []
    start = 0
    for i in range(1, len(items) + 1):
        prev = items[i - 1].prefix if isinstance(items[i - 1], Sequence) else None
        cur = items[i].prefix if i < len(items) and isinstance(items[i], Sequence) else None
        if i < len(items) and cur is prev and i != num_decodes:
            continue
        if prev is not None and prev.ready:
            groups.append(PrefixGroupDescriptor(start, i, prev.length))
        start = i
    return groups
