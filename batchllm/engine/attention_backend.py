"""The attention-backend interface: what one engine step hands a backend, and what a backend does.

Every engine step is one flat batch of tokens: decode tokens of running sequences first (one query
each), then prefill chunks (several queries each, causal inside the chunk, attending to the sequence's
paged history). ``AttentionMetadata`` describes that batch; a backend (``AttentionBackend``) stores the
step's K/V into the paged cache and computes attention for all queries. The backends are
``batchllm.engine.attention.TorchAttention`` (the reference and the CPU path) and the Triton kernels'
``batchllm.kernels.backend.TritonAttention``; ``batchllm.engine.attention.get_backend`` names them.

KV cache layout, one tensor per layer::

    kv_cache[layer] : (2, num_pages, page_size, num_kv_heads, head_dim)    # [0] = K, [1] = V
    slot s          = page * page_size + offset            (slot_mapping holds one per new token)
    block_tables[i] = the pages of sequence i, in order; entries past its length are padding (0)

A sequence's tokens ``[0, seq_len)`` live at ``block_tables[i][t // page_size]``, offset
``t % page_size``. Pages may be shared between sequences (a prefix group's prefix); sharing is visible
only through the page tables, so a backend needs no extra information to be correct.
``prefix_groups`` lets a backend exploit sharing (prefix-shared attention): read a shared prefix once for
all members. Both backends do.

An FP8 cache (``float8_e4m3fn``, ``batchllm.engine.kv_cache``) holds ``x / scale`` per layer and KV head:
``store_kv`` and ``forward`` take the layer's ``kv_scales``, a float32 (4, num_kv_heads) device tensor
(rows ``k_scale``, ``v_scale``, ``1 / k_scale``, ``1 / v_scale``: ``kv_cache.kv_scales``); None is scale 1.
A cache in the model's dtype holds the values themselves and the backends ignore the scales.

This module imports nothing of batchllm: the engine and the kernels both build on it.
"""

from __future__ import annotations

import abc
import dataclasses

import numpy as np
import torch


@dataclasses.dataclass
class PrefixGroupDescriptor:
    """Consecutive sequences ``seq_start:seq_end`` of the step have identical K/V at positions
    ``[0, prefix_len)`` and each has seq_len >= prefix_len. A backend may read the prefix through
    ``block_tables[seq_start]`` alone; ``prefix_len`` counts tokens and may end inside a page (each
    member's private copy of the partial last prefix page holds the same prefix tokens)."""

    seq_start: int
    seq_end: int
    prefix_len: int


@dataclasses.dataclass
class AttentionMetadata:
    """One step's attention inputs. Device tensors plus the few host-side sizes backends branch on.

    Sequences are ordered decodes first: ``query_lens[i] == 1`` for ``i < num_decodes``.
    """

    query_start_loc: torch.Tensor  # (S+1,) int32: query tokens of seq i are [qsl[i], qsl[i+1])
    seq_lens: torch.Tensor  # (S,) int32: KV length of seq i after this step (history + new tokens)
    block_tables: torch.Tensor  # (S, max_pages) int32
    slot_mapping: torch.Tensor  # (T,) int64: cache slot of each new token; -1 = padding, not stored
    num_decodes: int
    query_lens_host: list[int]
    seq_lens_host: list[int]
    prefix_groups: list[PrefixGroupDescriptor] | None = None
    has_padding: bool = False  # some slot_mapping entries are -1 (padded rows); known on the host: no sync

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)


class AttentionBackend(abc.ABC):
    """Stores new K/V into the paged cache and computes attention for one layer of one step.

    ``store_kv`` and ``forward`` are required. The other methods are the hooks of graphed decode steps
    (``batchllm.engine.cuda_graphs``), with defaults for a backend that is never captured: the runner
    and the graphs call them on every backend, and nothing looks a hook up by name.
    """

    name: str = "abstract"

    @abc.abstractmethod
    def store_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                 kv_scales: torch.Tensor | None = None) -> None:
        """Write ``k``, ``v`` of shape (T, num_kv_heads, head_dim) into ``kv_cache`` at ``meta.slot_mapping``;
        an fp8 cache gets ``k / k_scale`` and ``v / v_scale`` of ``kv_scales`` (see the module docstring)."""

    @abc.abstractmethod
    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of ``q`` (T, num_heads, head_dim) over each sequence's cached K/V; returns (T, num_heads, head_dim).

        Must be called after ``store_kv`` for the same step (a query attends to its own token), with the
        same ``kv_scales`` (an fp8 cache's keys read as ``stored * k_scale``, values ``stored * v_scale``).
        """

    # -- graphed decode steps (cuda_graphs) ----------------------------------------------------------
    def supports_cuda_graphs(self) -> bool:
        """Whether decode steps with this backend may be captured in CUDA graphs: its decode path reads
        only device tensors (no host value that changes between replays), skips slot -1 in its KV store,
        and syncs with the host nowhere. Default False: "cuda" graph mode degrades to eager steps (the
        padded "static" mode still runs, eagerly)."""
        return False

    def static_decode_splits(self, bucket: int, num_kv_heads: int, device: torch.device) -> int:
        """Key ranges per row of the device work list a graphed decode step of ``bucket`` rows needs
        (``StaticDecodeMetadata.decode_work``: ``bucket * splits`` rows of 6 int32, refilled by
        ``fill_static_decode_work`` before every replay). Default 0: no work list."""
        return 0

    def fill_static_decode_work(self, work: np.ndarray, seq_lens: np.ndarray, splits: int, page_size: int) -> None:
        """Fill the host side ``work`` (``len(seq_lens) * splits`` rows, 6 int32 each) of a graphed decode
        step's work list from the step's sequence lengths. Called only when ``static_decode_splits``
        returned ``splits > 0``, so the default (a backend with no work list) raises NotImplementedError."""
        raise NotImplementedError(f"the {self.name} attention backend asked for no decode work list "
                                  "(static_decode_splits returned 0), so there is none to fill")
