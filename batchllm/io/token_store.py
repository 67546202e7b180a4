"""A job's tokenized prompts on disk, so the driver does not hold them and a resume does not tokenize again.

Two hidden files in a local job folder (beside the manifest; not job files in ``io.writer``'s sense, so
shard cleanup never touches them):

- ``.tokens.i32``: every tokenized prompt's int32 ids, one after another, in reading order;
- ``.tokens.index.npz``: per prompt its input position (``fid``), ``input_index``, ``offset`` and
  ``length`` into the ids, sorted by (fid, input_index), plus the ``job_id`` of the manifest that wrote it.

``TokenSpill`` writes them while the job reads: each tokenized batch is appended (and dropped from
memory), then ``commit`` fsyncs both and renames them into place, the index last: a store exists only
when complete. ``TokenStore.open`` maps the ids read-only (``np.memmap``): the engine reads a prompt's
pages as it admits the request, and the operating system keeps only what is in use. A resumed job
(same ``job_id``: the same fingerprint, since a changed job is refused or overwritten under a new id)
takes its prompts' ids from the store instead of tokenizing them. Ray replicas read their units' ids
from the same files (``detach`` / ``attach``) rather than receiving them from the driver. Object-store job folders (URIs) keep
their tokens in memory: nothing can be mapped there.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from typing import NamedTuple

import numpy as np

from batchllm.io.requests import Request

TOKENS = ".tokens.i32"
INDEX = ".tokens.index.npz"
_PARTIAL = ".partial"
_KEY_SHIFT = 40  # fid * 2**40 + input_index: one sortable int64 per row (inputs of up to 2**40 rows)


def _keys(fid: np.ndarray, index: np.ndarray) -> np.ndarray:
    return (fid.astype(np.int64) << _KEY_SHIFT) | index.astype(np.int64)


class TokenSpill:
    """Appends tokenized prompts to ``<folder>/.tokens.i32.partial``; ``commit`` makes the store.

    The writes run on a thread of their own (a file write releases the GIL, so they overlap the reading
    and parsing of the next rows), at most ``_QUEUED`` batches behind ``add``; a write error is raised by
    ``commit``. An earlier store in the folder is removed first: its index must never describe this
    spill's ids.
    """

    _QUEUED = 4

    def __init__(self, folder: str, job_id: str):
        self.folder, self.job_id = folder, job_id
        self._path = os.path.join(folder, TOKENS)
        try:
            os.remove(os.path.join(folder, INDEX))
        except FileNotFoundError:
            pass
        self._f = open(self._path + _PARTIAL, "wb")
        self._fid: list[np.ndarray] = []
        self._index: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []
        self.tokens = 0
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=self._QUEUED)
        self._error: BaseException | None = None
        self._writer = threading.Thread(target=self._write_loop, name="batchllm-token-spill", daemon=True)
        self._writer.start()

    def _write_loop(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._f.write(chunk)  # the array's buffer itself: no bytes copy
                except BaseException as e:  # noqa: BLE001 -- handed to commit
                    self._error = e

    def _drain(self) -> None:
        """Wait for every queued write."""
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()

    def add(self, fids: np.ndarray, indices: np.ndarray, prompts: list[np.ndarray]) -> np.ndarray:
        """Append ``prompts`` (int32 arrays) of rows (``fids[i]``, ``indices[i]``); returns their offsets."""
        lengths = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=len(prompts))
        offsets = self.tokens + np.concatenate(([0], np.cumsum(lengths)[:-1])) if len(prompts) else lengths
        if prompts:
            self._queue.put(np.ascontiguousarray(np.concatenate(prompts), dtype=np.int32))
        self._fid.append(np.asarray(fids, dtype=np.int32))
        self._index.append(np.asarray(indices, dtype=np.int64))
        self._lengths.append(lengths)
        self.tokens += int(lengths.sum())
        return offsets

    def commit(self) -> TokenStore:
        """fsync and rename both files into place (the index last), and open the store."""
        self._drain()
        if self._error is not None:
            self.abandon()
            raise self._error
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._path + _PARTIAL, self._path)
        fid = np.concatenate(self._fid) if self._fid else np.zeros(0, np.int32)
        index = np.concatenate(self._index) if self._index else np.zeros(0, np.int64)
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64) if len(lengths) else lengths
        order = np.argsort(_keys(fid, index), kind="stable")
        tmp = os.path.join(self.folder, INDEX + _PARTIAL)
        with open(tmp, "wb") as f:
            np.savez(f, fid=fid[order], input_index=index[order], offset=offsets[order], length=lengths[order],
                     job_id=np.array(self.job_id), tokens=np.array(self.tokens))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.folder, INDEX))
        store = TokenStore.open(self.folder, self.job_id)
        assert store is not None  # just written
        return store

    def abandon(self) -> None:
        """Close and delete the partial file (a run that stopped while reading)."""
        self._drain()
        if not self._f.closed:
            self._f.close()
        try:
            os.remove(self._path + _PARTIAL)
        except FileNotFoundError:
            pass


class TokenStore(NamedTuple):
    """A complete store, mapped read-only."""

    tokens: np.ndarray  # every prompt's int32 ids: a read-only ndarray view of the mapped file
    keys: np.ndarray  # sorted (fid, input_index) keys
    offset: np.ndarray
    length: np.ndarray

    @classmethod
    def open(cls, folder: str, job_id: str) -> TokenStore | None:
        """The store of job ``job_id`` in ``folder``; None when there is none, it is another job's, or
        its files do not agree (a store is only ever renamed into place complete)."""
        index_path, tokens_path = os.path.join(folder, INDEX), os.path.join(folder, TOKENS)
        try:
            with np.load(index_path) as z:
                if str(z["job_id"]) != job_id:
                    return None
                fid, idx, offset, length, total = z["fid"], z["input_index"], z["offset"], z["length"], int(z["tokens"])
        except (OSError, KeyError, ValueError):
            return None
        if not os.path.exists(tokens_path) or os.path.getsize(tokens_path) != 4 * total:
            return None
        # a plain ndarray view of the map: its slices are plain views too (slicing an np.memmap, and every
        # numpy call on the slices, goes through the subclass's hooks: 8x slower per prompt)
        tokens = np.memmap(tokens_path, dtype=np.int32, mode="r").view(np.ndarray) if total else np.zeros(0, np.int32)
        return cls(tokens, _keys(fid, idx), offset, length)

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, fid: int, input_index: int) -> np.ndarray | None:
        """The ids of row (``fid``, ``input_index``) as a read-only view of the mapped file; None when the
        store does not hold that row."""
        key = (int(fid) << _KEY_SHIFT) | int(input_index)
        i = int(np.searchsorted(self.keys, key))
        if i == len(self.keys) or self.keys[i] != key:
            return None
        return self.view(int(self.offset[i]), int(self.length[i]))

    def view(self, offset: int, length: int) -> np.ndarray:
        return self.tokens[offset : offset + length]


def set_ids(req: Request, ids: np.ndarray) -> None:
    """Give ``req`` its prompt's ids, in place: ``token_ids``, and a token-id row's ``prompt_token_ids``
    (the same array, as ``io.tokenize`` leaves them)."""
    req.token_ids = ids
    if req.prompt_token_ids is not None:
        req.prompt_token_ids = ids


def drop_ids(req: Request) -> None:
    """Take ``req``'s ids out of memory, in place (they are in the store); a token-id row stays one
    (Request's invariant: its ``prompt_token_ids`` becomes an empty list until ``set_ids``)."""
    req.token_ids = None
    if req.prompt_token_ids is not None:
        req.prompt_token_ids = []


def stored(req: Request) -> bool:
    """Whether ``req``'s ids are a view of a mapped store (so anyone with the job folder can read them)."""
    a = req.token_ids
    while isinstance(a, np.ndarray):  # a prompt's slice -> the store's ndarray view -> its np.memmap
        if isinstance(a, np.memmap):
            return True
        a = a.base
    return False


def detach(req: Request) -> Request:
    """``req`` without its ids (a copy) when they are in the job's store, else ``req`` itself: what the
    driver sends a replica, which reads them back from the job folder (``attach``)."""
    if not stored(req):
        return req
    ids = None if req.prompt_token_ids is None else []  # a token-id row stays one (Request's invariant)
    return dataclasses.replace(req, token_ids=None, prompt_token_ids=ids)


def attach(store: TokenStore, fid: int, req: Request) -> None:
    """Give ``req`` (row ``input_index`` of input ``fid``, ``detach``ed) its ids from ``store``, in place;
    a token-id row's ``prompt_token_ids`` too. Raises ``KeyError`` when the store lacks the row."""
    ids = store.lookup(fid, req.input_index)
    if ids is None:
        raise KeyError(f"the job's token store has no row {req.input_index} of input {fid}")
    set_ids(req, ids)
