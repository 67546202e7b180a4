"""Persistent, packed step inputs: one host buffer (pinned on CUDA), one device buffer, one copy per step.

Every integer input of a step (token ids, positions, attention metadata, the rows to sample, and an
optional backend work list) is written by numpy into sections of one host byte buffer and moved to
the device with a single ``copy_`` of the used prefix; the step's tensors are typed views of the
device buffer. Nothing is allocated per step, and on CUDA the copy is asynchronous from pinned memory.

Layout (``step_layout``): a pure function of the step's sizes, so a CUDA-graph bucket, whose sizes are
fixed, always gets the same offsets and therefore the same device addresses in every replay::

    section          dtype   shape
    slot_mapping     int64   (T,)          -1 = padded row: the KV store skips it
    logits_indices   int64   (R,)          rows of the hidden states that go through the LM head
    input_ids        int32   (T,)
    positions        int32   (T,)
    query_start_loc  int32   (S + 1,)
    seq_lens         int32   (S,)
    block_tables     int32   (S, W)        entries past a sequence's pages are 0
    work             int32   (N,)          backend-specific (the Triton static decode work list)

Each section starts on a 16-byte boundary (int64 views need 8).

Host-buffer reuse: the copy of step k may still be in flight when step k+1 is filled (a step that
samples nothing never synchronises), so the host side is double buffered and each slot waits on the
event recorded after its previous copy; by then that copy is one step old, so the wait is normally
free. The device buffer needs no such guard: the copy of step k+1 is queued on the stream behind the
forward of step k.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

_ALIGN = 16
_SECTIONS: tuple[tuple[str, type], ...] = (
    ("slot_mapping", np.int64),
    ("logits_indices", np.int64),
    ("input_ids", np.int32),
    ("positions", np.int32),
    ("query_start_loc", np.int32),
    ("seq_lens", np.int32),
    ("block_tables", np.int32),
    ("work", np.int32),
)
_TORCH = {np.int64: torch.int64, np.int32: torch.int32}


@dataclasses.dataclass(frozen=True)
class StepLayout:
    """Where each section of one step lives: name -> (byte offset, shape, numpy dtype)."""

    sections: dict[str, tuple[int, tuple[int, ...], type]]
    nbytes: int


def step_layout(num_tokens: int, num_seqs: int, width: int, num_logits: int, work_ints: int = 0) -> StepLayout:
    """The layout of a step with T tokens, S sequences, block tables W pages wide, R sampled rows and
    ``work_ints`` int32 of backend work list. Equal sizes give equal layouts."""
    shapes = {
        "slot_mapping": (num_tokens,),
        "logits_indices": (num_logits,),
        "input_ids": (num_tokens,),
        "positions": (num_tokens,),
        "query_start_loc": (num_seqs + 1,),
        "seq_lens": (num_seqs,),
        "block_tables": (num_seqs, width),
        "work": (work_ints,),
    }
    off = 0
    sections = {}
    for name, dt in _SECTIONS:
        shape = shapes[name]
        sections[name] = (off, shape, dt)
        off += math.prod(shape) * np.dtype(dt).itemsize
        off = -(-off // _ALIGN) * _ALIGN
    return StepLayout(sections, max(off, _ALIGN))


class StepBuffers:
    """A persistent host/device buffer pair for step inputs (see the module docstring).

    ``fixed=True`` never reallocates (a CUDA graph holds the device addresses): a layout larger than
    the capacity is a ValueError. Otherwise both sides grow (doubling) when a step needs more; views
    handed out before a growth must not be used afterwards, which holds for per-step metadata.
    """

    def __init__(self, device: torch.device | str, capacity: int = 1 << 16, *, fixed: bool = False, host_slots: int = 2):
        self.device = torch.device(device)
        self.fixed = fixed
        self._pin = self.device.type == "cuda"
        self._slots = max(1, host_slots)
        self._slot = 0
        self.capacity = 0
        self.copies = 0  # host-to-device copies issued (one per step): for tests and profiling
        self._alloc(max(_ALIGN, int(capacity)))

    def _alloc(self, nbytes: int) -> None:
        self.capacity = nbytes
        self._host = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pin) for _ in range(self._slots)]
        self._host_np = [h.numpy() for h in self._host]
        self._events: list[torch.cuda.Event | None] = [None] * self._slots
        self._dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def reserve(self, nbytes: int) -> None:
        """Make room for a layout of ``nbytes`` (grows unless fixed)."""
        if nbytes <= self.capacity:
            return
        if self.fixed:
            raise ValueError(f"step inputs need {nbytes} bytes, more than this fixed buffer's {self.capacity}")
        if self._pin:
            torch.cuda.current_stream(self.device).synchronize()  # in-flight copies still read the old host buffers
        self._alloc(max(nbytes, 2 * self.capacity))

    def host(self, layout: StepLayout) -> dict[str, np.ndarray]:
        """Numpy views of the next host slot for ``layout``; fill them, then call ``upload``.

        Waits until the slot's previous copy has left (see the module docstring)."""
        self.reserve(layout.nbytes)
        self._slot = (self._slot + 1) % self._slots
        ev = self._events[self._slot]
        if ev is not None:
            ev.synchronize()
        buf = self._host_np[self._slot]
        out = {}
        for name, (off, shape, dt) in layout.sections.items():
            n = math.prod(shape)
            out[name] = buf[off : off + n * np.dtype(dt).itemsize].view(dt).reshape(shape)
        return out

    def upload(self, layout: StepLayout) -> dict[str, torch.Tensor]:
        """Copy the current host slot's ``layout.nbytes`` to the device (one copy) and return the views."""
        n = layout.nbytes
        if self._pin:
            self._dev[:n].copy_(self._host[self._slot][:n], non_blocking=True)
            ev = self._events[self._slot] or torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._events[self._slot] = ev
        else:
            self._dev[:n].copy_(self._host[self._slot][:n])
        self.copies += 1
        return self.views(layout)

    def views(self, layout: StepLayout) -> dict[str, torch.Tensor]:
        """Typed device views of ``layout`` (no copy): the same addresses for the same layout."""
        if layout.nbytes > self.capacity:
            raise ValueError(f"layout of {layout.nbytes} bytes exceeds the buffer's {self.capacity}")
        out = {}
        for name, (off, shape, dt) in layout.sections.items():
            itemsize = np.dtype(dt).itemsize
            n = math.prod(shape)
            out[name] = self._dev[off : off + n * itemsize].view(_TORCH[dt]).view(shape)
        return out
