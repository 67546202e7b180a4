"""The compact record of which input rows a job has finished, for resuming without re-reading shards.

A row is identified by ``(file_id, input_index)``: ``file_id`` is the position of its input file in the
manifest's ``input_files`` list, ``input_index`` its 0-based row index in that file. A row counts as
done once every output row of it (all ``n`` samples of a completion, or its one error record) sits in a
committed shard; the writer only ever commits whole requests, so "in a committed shard" is enough.

Storage: each shard's manifest entry carries, per input file, the sorted input indices it completed,
delta-encoded (one width byte, then the deltas as little-endian uint8, uint16 or uint32, the narrowest
that holds the largest delta), zlib-compressed and base64-encoded (``encode_indices``). Rows in input
order compress to almost nothing (all deltas are 1); rows in a prefix-sharing plan order scatter, but
10,000 rows spread over a million still take under 2 bytes each.

In memory, ``CompletedSet`` keeps one numpy bool array per input file (one byte per row: 1 MB per
million rows), never per-row Python objects; membership for a batch of indices is one vectorised lookup.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

_WIDTHS = {1: "<u1", 2: "<u2", 4: "<u4"}


def encode_indices(indices: Iterable[int] | np.ndarray) -> str:
    """Sorted unique ``indices`` as base64(zlib(width byte + deltas)); the first delta is the first index."""
    a = np.unique(np.asarray(indices, dtype=np.int64))  # sorted, unique
    if len(a) and (a[0] < 0 or a[-1] >= 2**32):
        raise ValueError("input indices must be in [0, 2**32)")
    deltas = np.diff(a, prepend=0)
    biggest = int(deltas.max()) if len(deltas) else 0
    width = 1 if biggest < 2**8 else 2 if biggest < 2**16 else 4
    payload = bytes([width]) + deltas.astype(_WIDTHS[width]).tobytes()
    return base64.b64encode(zlib.compress(payload, 6)).decode("ascii")


def decode_indices(text: str) -> np.ndarray:
    """Inverse of ``encode_indices``: the sorted int64 indices."""
    raw = zlib.decompress(base64.b64decode(text))
    if not raw:
        raise ValueError("empty index record")
    return np.cumsum(np.frombuffer(raw, dtype=_WIDTHS[raw[0]], offset=1).astype(np.int64))


def encode_done(keys: Mapping[int, Iterable[int] | np.ndarray]) -> dict[str, str]:
    """``{file_id: indices}`` -> the JSON-ready ``{"<file_id>": encoded}`` of a shard's manifest entry."""
    return {str(fid): encode_indices(idx) for fid, idx in keys.items()}


class CompletedSet:
    """Rows already done, as one bool array per input file; grows as shards are added."""

    def __init__(self) -> None:
        self._done: dict[int, np.ndarray] = {}
        self.count = 0  # number of distinct done rows

    @classmethod
    def from_shards(cls, shards: Iterable[Mapping[str, Any]]) -> "CompletedSet":
        """Build from manifest shard entries (their ``done`` field; entries without one add nothing)."""
        s = cls()
        for entry in shards:
            for fid, text in (entry.get("done") or {}).items():
                s.add(int(fid), decode_indices(text))
        return s

    def add(self, file_id: int, indices: np.ndarray | Iterable[int]) -> None:
        idx = np.asarray(indices, dtype=np.int64)
        if not len(idx):
            return
        arr = self._done.get(file_id)
        need = int(idx.max()) + 1
        if arr is None or len(arr) < need:
            grown = np.zeros(max(need, 2 * len(arr) if arr is not None else 0), dtype=bool)
            if arr is not None:
                grown[: len(arr)] = arr
            arr = self._done[file_id] = grown
        before = int(arr[idx].sum())
        arr[idx] = True
        self.count += len(np.unique(idx)) - before

    def contains(self, file_id: int, index: int) -> bool:
        arr = self._done.get(file_id)
        return arr is not None and 0 <= index < len(arr) and bool(arr[index])

    def mask(self, file_id: int, indices: np.ndarray) -> np.ndarray:
        """Bool array: which of ``indices`` (in file ``file_id``) are done."""
        idx = np.asarray(indices, dtype=np.int64)
        arr = self._done.get(file_id)
        out = np.zeros(len(idx), dtype=bool)
        if arr is None:
            return out
        inside = (idx >= 0) & (idx < len(arr))
        out[inside] = arr[idx[inside]]
        return out

    def array(self, file_id: int) -> np.ndarray | None:
        """The bool array of file ``file_id`` (index i: row i done), or None if none of its rows is."""
        return self._done.get(file_id)

    def done_indices(self, file_id: int) -> np.ndarray:
        arr = self._done.get(file_id)
        return np.flatnonzero(arr) if arr is not None else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.count
