"""Turns a ``ScheduledStep`` into model inputs, runs the forward pass, and returns the logits to sample.

Inputs are written by numpy into persistent host buffers (pinned on CUDA) and reach the device in one
copy per step (``input_buffers.StepBuffers``); the step's tensors are views of one device buffer. The
runner itself never synchronises with the device: the engine's one synchronisation per step is the
read-back of the sampled tokens.

Only the last token of each sequence that completes its pending tokens this step goes through the LM
head: prefill chunks that stop mid-prompt and shared prefixes need no logits.

Prompt log-probabilities (a ``prompt_logprobs.PromptLogprobs``, when the runner is given one): the hidden
states of the prompt positions each item computes in a step also go through the LM head, and their
log-softmax rows go to the collector; so a prefix computed once serves every member's prompt
log-probabilities, and the plan's shared work stays what it was.

Decode-only steps may run as CUDA graphs (``cuda_graphs.DecodeGraphs``): padded to a bucket size,
on inputs at fixed addresses; the LM head then runs eagerly on the real rows. Mixed and prefill steps,
steps larger than the largest bucket, and decode steps that gain more from the prefix-shared path
(``cuda_graphs.prefer_graph``) run eagerly.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from batchllm.engine import cuda_graphs
from batchllm.engine.attention_backend import (
    AttentionBackend,
    AttentionMetadata,
    PrefixGroupDescriptor,
)
from batchllm.engine.input_buffers import StepBuffers, step_layout
from batchllm.engine.kv_cache import KVCache
from batchllm.engine.prompt_logprobs import PromptLogprobs
from batchllm.engine.scheduler import ScheduledStep
from batchllm.engine.sequence import Sequence, SharedPrefix

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the hidden states to sample from
    samplers: list[Sequence]  # the sequences those rows belong to, same order
    bucket: int | None = None  # a graphed decode step's bucket size: rows len(samplers).. are padding


class ModelRunner:
    """Prepares and runs steps for one model and KV cache.

    ``graphs``: "off" (every step eager), "static" (decode-only steps run padded to their bucket on the
    same static-shape path a CUDA graph captures, but eagerly: for CPU tests), "cuda" (capture and
    replay; needs a CUDA device and a graph-safe backend, else it degrades to "off" with one log line),
    "auto" ("cuda" on a CUDA device, else "off"). ``max_model_len`` sets the block-table width of graphed
    steps; without it graphs are off.
    """

    def __init__(self, model: torch.nn.Module, kv: KVCache, backend: AttentionBackend, device: torch.device, *,
                 graphs: str = "off", max_model_len: int | None = None,
                 max_graph_batch: int = cuda_graphs.DEFAULT_MAX_GRAPH_BATCH):
        self.model, self.kv, self.backend, self.device = model, kv, backend, torch.device(device)
        self.prompt_logprobs: PromptLogprobs | None = None  # set by a caller that scores prompts
        self.page_size = kv.page_size
        self.buffers = StepBuffers(self.device)
        self.graphs: cuda_graphs.DecodeGraphs | None = None
        mode = self._resolve_mode(graphs, max_model_len)
        if mode != "off":
            self._init_graphs(mode, max_model_len, max_graph_batch)

    # -- graphs ------------------------------------------------------------------------------------
    def _resolve_mode(self, graphs: str, max_model_len: int | None) -> str:
        if graphs not in ("off", "static", "cuda", "auto"):
            raise ValueError(f"graphs must be off, static, cuda or auto; got {graphs!r}")
        if graphs == "auto":
            graphs = "cuda" if self.device.type == "cuda" else "off"
        if graphs == "off" or max_model_len is None:
            return "off"
        if graphs == "cuda":
            if self.device.type != "cuda":
                log.info("CUDA graphs need a CUDA device; running eagerly")
                return "off"
            if not cuda_graphs.graph_safe(self.backend):
                log.info("the %s attention backend is not CUDA-graph safe; decode steps run eagerly", self.backend.name)
                return "off"
        return graphs

    def _init_graphs(self, mode: str, max_model_len: int, max_graph_batch: int) -> None:
        cfg = self.model.config
        width = -(-max_model_len // self.page_size)
        layouts, splits = {}, {}
        for b in cuda_graphs.capture_sizes(max_graph_batch):
            s = self.backend.static_decode_splits(b, cfg.num_kv_heads, self.device)
            layouts[b] = step_layout(b, b, width, b, b * s * 6)
            splits[b] = s
        if not layouts:
            return
        self.graph_buffers = StepBuffers(self.device, max(lay.nbytes for lay in layouts.values()), fixed=True)
        self.graphs = cuda_graphs.DecodeGraphs(self.model, self.kv.layers, self.backend, self.graph_buffers, layouts,
                                               splits, width, self.page_size, mode)
        if mode == "cuda" and not self.graphs.capture(self._upload_dummy):
            self.graphs = None

    def _upload_dummy(self, b: int) -> None:
        """An all-padding step in bucket ``b`` (what capture runs): nothing is written to the KV cache."""
        lay = self.graphs.layouts[b]
        h = self.graph_buffers.host(lay)
        _fill_padding(h, 0, b)
        h["logits_indices"][:] = np.arange(b)
        self._fill_work(h, b)
        self.graph_buffers.upload(lay)

    def _fill_work(self, h: dict[str, np.ndarray], b: int) -> None:
        s = self.graphs.splits[b]
        if s:
            self.backend.fill_static_decode_work(h["work"].reshape(-1, 6), h["seq_lens"], s, self.page_size)

    def _graph_bucket(self, step: ScheduledStep, groups: list[PrefixGroupDescriptor]) -> int | None:
        """The bucket a step runs in, or None for eager: decode-only steps in which every row samples."""
        if self.graphs is None or step.num_decodes != len(step.items):
            return None
        b = self.graphs.bucket_for(len(step.items))
        if b is None:
            return None
        for item, q in zip(step.items, step.num_tokens):
            if q != 1 or not isinstance(item, Sequence) or item.num_computed + 1 != item.total_len:
                return None
        if groups and not cuda_graphs.prefer_graph((it.total_len for it in step.items), groups):
            return None
        return b

    # -- inputs ------------------------------------------------------------------------------------
    def prepare(self, step: ScheduledStep) -> StepInputs:
        groups = prefix_groups_for_step(step.items, step.num_decodes)
        b = self._graph_bucket(step, groups)
        if b is not None:
            return self._prepare_graphed(step, b)
        return self._prepare_eager(step, groups)

    def _prepare_eager(self, step: ScheduledStep, groups: list[PrefixGroupDescriptor]) -> StepInputs:
        n = len(step.items)
        width = max(len(it.pages) for it in step.items)
        samples = sum(1 for it, q in zip(step.items, step.num_tokens)
                      if isinstance(it, Sequence) and it.num_computed + q == it.total_len)
        lay = step_layout(step.total_tokens, n, width, samples)
        h = self.buffers.host(lay)
        samplers = _fill_step(h, step, self.page_size)
        v = self.buffers.upload(lay)
        meta = AttentionMetadata(
            query_start_loc=v["query_start_loc"],
            seq_lens=v["seq_lens"],
            block_tables=v["block_tables"],
            slot_mapping=v["slot_mapping"],
            num_decodes=step.num_decodes,
            query_lens_host=list(step.num_tokens),
            seq_lens_host=h["seq_lens"].tolist(),
            prefix_groups=groups,
        )
        return StepInputs(v["input_ids"], v["positions"], meta, v["logits_indices"], samplers)

    def _prepare_graphed(self, step: ScheduledStep, b: int) -> StepInputs:
        lay = self.graphs.layouts[b]
        h = self.graph_buffers.host(lay)
        n = len(step.items)
        samplers = _fill_step(h, step, self.page_size)
        _fill_padding(h, n, b)
        h["logits_indices"][n:] = np.arange(n, b)
        self._fill_work(h, b)
        self.graph_buffers.upload(lay)
        v = self.graphs.views[b]
        return StepInputs(v["input_ids"], v["positions"], self.graphs.metas[b], v["logits_indices"], samplers, bucket=b)

    # -- run ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, step: ScheduledStep) -> tuple[torch.Tensor | None, list[Sequence]]:
        """Forward the step; returns (fp32 logits of the sampling rows or None, the sampling sequences)."""
        inp = self.prepare(step)
        if inp.bucket is not None:
            hidden = self.graphs.run(inp.bucket)[: len(inp.samplers)]
            return self.model.compute_logits(hidden), inp.samplers
        hidden = self.model(inp.input_ids, inp.positions, self.kv.layers, inp.meta, self.backend)
        if self.prompt_logprobs is not None:
            self._score_prompts(step, hidden)
        if not inp.samplers:
            return None, []
        return self.model.compute_logits(hidden[inp.logits_indices]), inp.samplers


    def _score_prompts(self, step: ScheduledStep, hidden: torch.Tensor) -> None:
        """Hand ``self.prompt_logprobs`` the log-softmax rows of the prompt positions it scores in ``step``
        (one LM-head pass over all of them; ``hidden`` rows are the step's tokens in item order)."""
        pl = self.prompt_logprobs
        spans: list[tuple[Sequence | SharedPrefix, int, int, int]] = []  # item, first position, first row, rows
        index: list[np.ndarray] = []
        row = n = 0
        for item, q in zip(step.items, step.num_tokens):
            start = item.num_computed
            lo, hi = pl.positions(item, start, q)
            if hi > lo:
                spans.append((item, lo, n, hi - lo))
                index.append(np.arange(row + lo - start, row + hi - start))
                n += hi - lo
            row += q
        if not spans:
            return
        rows = torch.as_tensor(np.concatenate(index), device=hidden.device)
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[rows]), dim=-1)
        for item, lo, first, count in spans:
            pl.add(item, lo, logprobs[first : first + count])


def _fill_step(h: dict[str, np.ndarray], step: ScheduledStep, page_size: int) -> list[Sequence]:
    """Write the step's real rows into host views ``h`` (sized for at least this step); returns the
    sequences that sample, in the order of ``h['logits_indices']``."""
    ids, pos_arr, qsl, seq_lens, bt = h["input_ids"], h["positions"], h["query_start_loc"], h["seq_lens"], h["block_tables"]
    logits = h["logits_indices"]
    samplers: list[Sequence] = []
    qsl[0] = 0
    pos = 0
    for i, (item, q) in enumerate(zip(step.items, step.num_tokens)):
        start = item.num_computed
        is_seq = isinstance(item, Sequence)
        if q == 1:  # decodes: no slicing or arange for one token
            if not is_seq:
                ids[pos] = item.token_ids[start]
            elif start >= item.prompt_len:
                ids[pos] = item.output_ids[start - item.prompt_len]
            else:
                ids[pos] = item.prompt_ids[start]
            pos_arr[pos] = start
        else:
            ids[pos : pos + q] = item.token_slice(start, start + q) if is_seq else item.token_ids[start : start + q]
            pos_arr[pos : pos + q] = np.arange(start, start + q)
        pages = item.pages
        bt[i, : len(pages)] = pages
        bt[i, len(pages) :] = 0
        seq_lens[i] = start + q
        pos += q
        qsl[i + 1] = pos
        if is_seq and start + q == item.total_len:
            logits[len(samplers)] = pos - 1
            samplers.append(item)
    # slot of every new token: page_of(position) * page_size + position % page_size
    n = len(step.items)
    seq_of_token = np.repeat(np.arange(n), step.num_tokens)
    p = pos_arr[:pos].astype(np.int64)
    h["slot_mapping"][:pos] = bt[seq_of_token, p // page_size].astype(np.int64) * page_size + p % page_size
    return samplers


def _fill_padding(h: dict[str, np.ndarray], n: int, b: int) -> None:
    """Rows ``n..b-1`` of a one-token-per-row step become padding: position 0, length 1, block-table row
    0 (page 0 is read, never written), slot -1 (no KV store)."""
    h["input_ids"][n:b] = 0
    h["positions"][n:b] = 0
    h["seq_lens"][n:b] = 1
    h["block_tables"][n:b] = 0
    h["slot_mapping"][n:b] = -1
    h["query_start_loc"][n : b + 1] = np.arange(n, b + 1)


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
