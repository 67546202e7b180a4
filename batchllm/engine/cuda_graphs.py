"""CUDA graphs for decode-only steps: bucketed batch sizes, padded rows, static-shape forward.

A decode-only step of ``n`` sequences runs as the graph of the smallest bucket ``B >= n`` (1, 2, 4,
then multiples of 8 up to ``max_batch``, as vLLM does); rows ``n..B-1`` are padding. Everything a
graphed step reads lives at fixed device addresses (``StepBuffers(fixed=True)``, layout of bucket B)
and is refilled before each replay, and nothing in the captured region depends on a host value that
changes between replays:

* token ids, positions, sequence lengths, block tables (``B x W`` with ``W`` = the context limit in
  pages), slot mapping: device views; padded rows have position 0, length 1, a zero block-table row
  (page 0, read but never written) and slot -1, so neither KV store writes them;
* ``query_lens_host`` / ``seq_lens_host`` are fixed per bucket (1, and the full width ``W * page_size``)
  and ``prefix_groups`` is None: a graphed step uses plain paged decode. The prefix-shared path, whose
  work list depends on the groups, runs only in eager steps (``prefer_graph`` decides per step);
* a backend's work list (``decode_work``, ``kv_splits`` pieces per row, fixed per bucket: the
  backend's ``static_decode_splits``) is a device section filled on the host each step (its
  ``fill_static_decode_work``); the Triton backend's launch grid and merge lists depend on the bucket
  only;
* the graph ends at the final hidden states of all B rows; the caller runs the LM head eagerly on the
  first n. (Logits inside the graph would pin one B x vocab float32 output per bucket, all buckets
  alive at once: gigabytes for a 128k vocabulary, none of it reusable.)

Modes: ``cuda`` captures one graph per bucket (largest first, one shared memory pool) and replays it;
``static`` runs the same padded static-shape forward eagerly, so the bucketing, padding, buffer filling
and kernels of a graphed step are exercised on the CPU. A failed capture logs one warning and leaves
the runner eager; it never fails a job.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import logging
from collections.abc import Iterable

import torch

from batchllm.engine.attention_backend import (
    AttentionBackend,
    AttentionMetadata,
    PrefixGroupDescriptor,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_GRAPH_BATCH = 512
# A decode step whose prefix groups would spare at least this share of its KV reads runs eagerly on the
# prefix-shared path instead of the graph (plain decode reads every member's prefix). A guess until
# measured on a GPU (scripts/gpu_check.sh reports both paths' step times).
SHARED_READ_FRACTION_FOR_EAGER = 0.25


@dataclasses.dataclass
class StaticDecodeMetadata(AttentionMetadata):
    """Metadata of a graphed (static-shape) decode step of one bucket; host fields never change.

    Every row is one decode token, rows past the step's sequences are padding. ``decode_work`` (``kv_splits`` rows of ``WORK_FIELDS`` int32 per sequence) is the device work list a
    backend asked for through ``static_decode_splits``; None for backends that need none."""

    decode_work: torch.Tensor | None = None
    kv_splits: int = 0
    positions: torch.Tensor | None = None  # (B,) int32, the step's token positions (seq_lens - 1)


def capture_sizes(max_batch: int) -> list[int]:
    """Bucket sizes 1, 2, 4, 8, 16, 24, ... up to ``max_batch`` (included even off the grid)."""
    if max_batch < 1:
        return []
    sizes = [s for s in (1, 2, 4) if s <= max_batch] + list(range(8, max_batch + 1, 8))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def reachable_graph_batch(max_batch: int, reachable: int) -> int:
    """The largest bucket worth capturing when no decode step has more than ``reachable`` rows: the
    smallest bucket of ``capture_sizes(max_batch)`` holding ``min(reachable, max_batch)`` rows (0 when
    either is below 1). ``capture_sizes`` of the result is a prefix of ``capture_sizes(max_batch)``, so
    every reachable step runs in the bucket it would have had with every size captured."""
    if max_batch < 1 or reachable < 1:
        return 0
    return bucket_for(capture_sizes(max_batch), min(reachable, max_batch))


def bucket_for(sizes: list[int], n: int) -> int | None:
    """The smallest bucket holding ``n`` rows, or None when ``n`` exceeds the largest."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


def prefer_graph(seq_lens: Iterable[int], groups: Iterable[PrefixGroupDescriptor], min_group_size: int = 2) -> bool:
    """Whether a decode step should take the graph (plain decode) rather than the eager prefix-shared path:
    yes unless its groups' shared prefixes make up ``SHARED_READ_FRACTION_FOR_EAGER`` of its KV reads."""
    total = sum(seq_lens)
    saved = sum((g.seq_end - g.seq_start - 1) * g.prefix_len for g in groups if g.seq_end - g.seq_start >= min_group_size)
    return saved < SHARED_READ_FRACTION_FOR_EAGER * max(total, 1)


def graph_safe(backend: AttentionBackend) -> bool:
    """Whether ``backend`` may be captured (``AttentionBackend.supports_cuda_graphs``). The torch
    reference may not (its padded store indexes by a mask, its static decode gathers every row's full
    width); it still runs graph steps in ``static`` mode."""
    return backend.supports_cuda_graphs()


class DecodeGraphs:
    """The bucketed static decode steps of one model runner.

    ``views[B]`` / ``metas[B]``: the device views and metadata of bucket B (fixed addresses); the runner
    fills the host side of ``layouts[B]`` and uploads it before calling ``run(B)``.
    """

    def __init__(self, model, kv_layers: list[torch.Tensor], backend: AttentionBackend, buffers, layouts: dict,
                 splits: dict[int, int], width: int, page_size: int, mode: str):
        if mode not in ("static", "cuda"):
            raise ValueError(f"graph mode must be 'static' or 'cuda', got {mode!r}")
        self.model, self.kv_layers, self.backend = model, kv_layers, backend
        self.buffers, self.layouts, self.splits = buffers, layouts, splits
        self.mode = mode
        self.sizes = sorted(layouts)
        self.views: dict[int, dict[str, torch.Tensor]] = {}
        self.metas: dict[int, StaticDecodeMetadata] = {}
        for b in self.sizes:
            v = buffers.views(layouts[b])
            self.views[b] = v
            self.metas[b] = StaticDecodeMetadata(
                query_start_loc=v["query_start_loc"], seq_lens=v["seq_lens"], block_tables=v["block_tables"],
                slot_mapping=v["slot_mapping"], num_decodes=b, query_lens_host=[1] * b,
                seq_lens_host=[width * page_size] * b, prefix_groups=None, has_padding=True,
                decode_work=v["work"].view(-1, 6) if splits[b] else None, kv_splits=splits[b],
                positions=v["positions"],
            )
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.replays = 0

    def bucket_for(self, n: int) -> int | None:
        return bucket_for(self.sizes, n)

    @torch.inference_mode()
    def forward(self, b: int) -> torch.Tensor:
        """The static forward of bucket ``b``: the final hidden states of all b rows."""
        v, meta = self.views[b], self.metas[b]
        meta.prefix_groups = None  # a caller may have annotated the step's metadata; the graph has no groups
        return self.model(v["input_ids"], v["positions"], self.kv_layers, meta, self.backend)

    def run(self, b: int) -> torch.Tensor:
        """Hidden states (b, hidden) of the step whose inputs were just uploaded into bucket ``b``'s layout.

        In ``cuda`` mode the returned tensor is the graph's output buffer: consume it before the next step."""
        self.replays += 1
        g = self._graphs.get(b)
        if g is None:
            return self.forward(b)
        g.replay()
        return self._outputs[b]

    def capture(self, fill_dummy) -> bool:
        """Capture every bucket (CUDA mode); ``fill_dummy(b)`` uploads an all-padding step into bucket b.

        Returns False (graphs dropped, one warning logged) if anything fails; the runner then stays eager."""
        if self.mode != "cuda":
            return False
        try:
            pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            for b in reversed(self.sizes):  # largest first: the smaller graphs reuse its pool memory
                fill_dummy(b)
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up: Triton compiles and static plans are built outside capture
                    self.forward(b)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self.forward(b)
                self._graphs[b], self._outputs[b] = graph, out
            torch.cuda.synchronize()
            return True
        except Exception as e:  # noqa: BLE001  (any failure: fall back to eager, never fail the job)
            log.warning("CUDA graph capture failed, decode steps run eagerly: %s: %s", type(e).__name__, e)
            self._graphs.clear()
            self._outputs.clear()
            with contextlib.suppress(Exception):  # the error may have left the stream unusable; nothing more to do
                torch.cuda.synchronize()
            return False

    @property
    def captured(self) -> bool:
        return bool(self._graphs)
