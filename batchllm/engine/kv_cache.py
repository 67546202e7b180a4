"""The paged KV cache: one preallocated pool of fixed-size pages and its reference-counted allocator.

``PagePool`` is pure bookkeeping (numpy, no torch): a stack of free page ids gives O(1) allocate and
free, and a per-page reference count lets several sequences share a page (a prefix group's prefix, or
a cached page in the streaming baseline). ``KVCache`` holds the tensors, one per layer, in the layout
documented in ``batchllm.engine.attention``.

Invariant, checked by ``check_integrity`` in every engine test:
``free pages + pages with refcount > 0 == total``, no page both free and referenced, no page twice free.

FP8 KV (``--kv-cache-dtype fp8``, vLLM's flag): the pool is ``float8_e4m3fn``, one byte per element, so
the same memory holds twice the tokens of a 16-bit pool. Each layer has a scale per KV head for K and for
V, as vLLM's FP8 KV cache: a value ``x`` is stored as ``e4m3(x / scale)`` and read back as
``stored * scale``. The scales come from the checkpoint when it was calibrated for an FP8 KV cache
(compressed-tensors' ``kv_cache_scheme``: ``k_scale`` / ``v_scale`` per layer, or per KV head;
``batchllm.models.kv_scales``), else they are 1.0 (vLLM's default without calibration).
``quantize_fp8`` saturates at +-448 and rounds to nearest even (3 mantissa bits: relative error <= 1/16;
normal down to 2**-6, subnormal steps of 2**-9). A layer's scales travel as one small device tensor
(``kv_scales``: the store multiplies by the reciprocals, the reads by the scales), so a graphed decode
step reads them on the device like any weight. Why fixed scales rather than dynamic per-page ones: a
page is written token by token and shared (prefix groups, the prefix cache, page copies), so a scale
would have to be fixed before the first token of a page anyway; a checkpoint's calibrated scale is
fixed for the whole run, and without one K/V of the models measured (tests/test_kv_fp8.py) sit well
inside e4m3's range at scale 1.
"""

from __future__ import annotations

import numpy as np
import torch

from batchllm.models.config import ModelConfig


FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def quantize_fp8(x: torch.Tensor, inv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` as ``float8_e4m3fn``: ``x * inv_scale`` in float32 (the reciprocal of the scale; None: scale 1),
    saturated to +-448 (a plain cast makes overflow NaN), rounded to nearest even. ``inv_scale``
    broadcasts against ``x`` (per KV head: shape (kv_heads, 1) for (T, kv_heads, d)). The KV store kernel
    (``batchllm.kernels.kv_store``) writes the same bytes."""
    x = x.float()
    if inv_scale is not None:
        x = x * inv_scale
    return x.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def kv_scales(k_scale: torch.Tensor, v_scale: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """One layer's FP8 KV scales as the backends take them: float32 (4, num_kv_heads) on the scales' device,
    rows ``k_scale``, ``v_scale``, ``1 / k_scale``, ``1 / v_scale`` per KV head.

    ``k_scale`` / ``v_scale``: one value (per layer) or ``num_kv_heads`` values (per head), any shape with
    that many elements, finite and > 0 (ValueError otherwise). The reciprocals are computed here, once:
    the store multiplies by them (the kernel and the torch path alike, so both write the same bytes),
    where vLLM divides by the scale; the two differ only when ``x / scale`` falls within one float32
    step of an e4m3 rounding boundary."""
    rows = []
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        s = s.detach().reshape(-1).to(torch.float32)
        if s.numel() not in (1, num_kv_heads):
            raise ValueError(f"{name} has {s.numel()} values; expected 1 (per layer) or {num_kv_heads} (per KV head)")
        if not (torch.isfinite(s).all() and (s > 0).all()):
            raise ValueError(f"{name} must be finite and > 0, got {s.tolist()}")
        rows.append(s.expand(num_kv_heads))
    scales = torch.stack(rows)
    return torch.cat([scales, 1.0 / scales])


def check_kv_scales(kv_scales: torch.Tensor | None, num_kv_heads: int, device: torch.device) -> torch.Tensor:
    """``kv_scales`` checked for an fp8 cache of ``num_kv_heads`` heads (ValueError unless float32 (4,
    num_kv_heads), contiguous, on ``device``); None becomes scale 1, a new tensor (the engine passes each
    layer's own, which graphs capture)."""
    if kv_scales is None:
        return torch.ones(4, num_kv_heads, dtype=torch.float32, device=device)
    if kv_scales.shape != (4, num_kv_heads) or kv_scales.dtype != torch.float32 or not kv_scales.is_contiguous():
        raise ValueError(f"kv_scales must be contiguous float32 (4, {num_kv_heads}) (see kv_scales), got "
                         f"{kv_scales.dtype} {tuple(kv_scales.shape)}")
    if kv_scales.device != device:
        raise ValueError(f"kv_scales is on {kv_scales.device}, the cache on {device}")
    return kv_scales


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor as uint8 (same bytes, same shape), any other tensor unchanged: torch's CPU
    ``index_copy_`` / ``index_select`` have no fp8 kernels, and copying bytes is the same copy."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


class OutOfPages(RuntimeError):
    """The pool cannot satisfy an allocation; the scheduler preempts or waits."""


class PagePool:
    """Reference-counted page allocator over ``num_pages`` pages.

    Pages come off the top of a free stack (``_free[:_num_free]``), so the most recently freed page is
    reused first (its memory is warm in cache). ``allocate`` sets refcount 1; ``share`` adds a reference;
    ``release`` drops one and returns pages that reach zero to the free stack.
    """

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"the KV pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self._free = np.arange(num_pages - 1, -1, -1, dtype=np.int32)  # page 0 handed out first
        self._num_free = num_pages
        self.refcount = np.zeros(num_pages, dtype=np.int32)

    @property
    def num_free(self) -> int:
        return self._num_free

    def can_allocate(self, n: int) -> bool:
        return n <= self._num_free

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh pages with refcount 1; raises OutOfPages (allocating nothing) if fewer are free."""
        if n > self._num_free:
            raise OutOfPages(f"need {n} pages, {self._num_free} free")
        if n == 0:
            return []
        start = self._num_free - n
        pages = self._free[start : self._num_free][::-1].tolist()
        self._num_free = start
        self.refcount[pages] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        """Add a reference to pages that are already referenced."""
        if pages:
            idx = np.asarray(pages, dtype=np.int64)
            if (self.refcount[idx] <= 0).any():
                raise RuntimeError("share() of a page that is not in use")
            np.add.at(self.refcount, idx, 1)

    def release(self, pages: list[int]) -> None:
        """Drop one reference from each page; pages reaching zero go back on the free stack."""
        for p in pages:
            rc = self.refcount[p] - 1
            if rc < 0:
                raise RuntimeError(f"page {p} released more often than referenced")
            self.refcount[p] = rc
            if rc == 0:
                self._free[self._num_free] = p
                self._num_free += 1

    def check_integrity(self) -> None:
        """Raise RuntimeError if the pool's bookkeeping is inconsistent (free + in use == total)."""
        free = self._free[: self._num_free]
        # bincount, not np.unique: linear, and this runs at the end of every job over up to millions of pages
        if len(free) and np.bincount(free, minlength=self.num_pages).max() > 1:
            raise RuntimeError("a page is on the free stack twice")
        if (self.refcount[free] != 0).any():
            raise RuntimeError("a free page still has references")
        if (self.refcount < 0).any():
            raise RuntimeError("negative refcount")
        in_use = int((self.refcount > 0).sum())
        if self._num_free + in_use != self.num_pages:
            raise RuntimeError(f"page leak: {self._num_free} free + {in_use} in use != {self.num_pages}")


class KVCache:
    """The K/V tensors of all layers: ``layers[i]`` has shape (2, num_pages, page_size, kv_heads, head_dim),
    in ``dtype``: the model's, or ``float8_e4m3fn`` for an FP8 cache (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype, device: torch.device | str):
        self.num_pages, self.page_size = num_pages, page_size
        # zeros, not empty: padded block-table entries point at page 0 and are masked, but masked
        # garbage must still be finite (0 * NaN would poison the output).
        shape = (2, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        self.layers = [_zeros(shape, dtype, torch.device(device)) for _ in range(cfg.num_layers)]

    @staticmethod
    def bytes_per_page(cfg: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
        return cfg.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size()) * page_size

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        """Copy pages ``src[i]`` to ``dst[i]`` in every layer: one indexed copy per layer, however many."""
        device = self.layers[0].device
        s = torch.tensor(src, dtype=torch.long, device=device)
        d = torch.tensor(dst, dtype=torch.long, device=device)
        for layer in self.layers:
            layer = byte_view(layer)
            layer.index_copy_(1, d, layer.index_select(1, s))


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zero-filled tensor. On the CPU through calloc (numpy), so a multi-GB pool costs nothing until its
    pages are touched, instead of seconds of memset at start-up."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = int(np.prod(shape))
    return torch.from_numpy(np.zeros(numel * itemsize, dtype=np.uint8)).view(dtype).view(shape)
