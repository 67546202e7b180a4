"""Persistent packed step inputs: layout determinism and alignment, one copy per step, fixed vs growable."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from batchllm.engine.input_buffers import StepBuffers, step_layout


def test_layout_is_a_function_of_sizes_and_aligned():
    a, b = step_layout(5, 3, 4, 2, 12), step_layout(5, 3, 4, 2, 12)
    assert a == b
    assert step_layout(6, 3, 4, 2) != a
    for off, shape, dt in a.sections.values():
        assert off % 16 == 0
    ends = sorted((off, off + int(np.prod(shape)) * np.dtype(dt).itemsize) for off, shape, dt in a.sections.values())
    assert all(e0 <= s1 for (_, e0), (s1, _) in itertools.pairwise(ends)), "sections overlap"
    assert a.nbytes >= ends[-1][1]


def test_upload_is_one_copy_and_views_hold_the_values():
    buf = StepBuffers("cpu", capacity=64)
    lay = step_layout(4, 2, 3, 2, 6)
    h = buf.host(lay)
    h["input_ids"][:] = [1, 2, 3, 4]
    h["slot_mapping"][:] = [10, -1, 2**40, 3]
    h["block_tables"][:] = np.arange(6).reshape(2, 3)
    h["work"][:] = 7
    v = buf.upload(lay)  # grew from 64 bytes on the way
    assert buf.copies == 1 and buf.capacity >= lay.nbytes
    assert v["input_ids"].dtype == torch.int32 and v["input_ids"].tolist() == [1, 2, 3, 4]
    assert v["slot_mapping"].dtype == torch.int64 and v["slot_mapping"].tolist() == [10, -1, 2**40, 3]
    assert v["block_tables"].shape == (2, 3) and v["block_tables"].stride() == (3, 1)
    assert v["work"].tolist() == [7] * 6
    # the same layout maps to the same device addresses (what a captured graph relies on)
    assert buf.views(lay)["block_tables"].data_ptr() == v["block_tables"].data_ptr()


def test_host_slots_alternate_so_an_inflight_copy_is_not_overwritten():
    buf = StepBuffers("cpu", capacity=1 << 12)
    lay = step_layout(2, 1, 1, 1)
    first = buf.host(lay)["input_ids"]
    buf.upload(lay)
    second = buf.host(lay)["input_ids"]
    assert first.__array_interface__["data"][0] != second.__array_interface__["data"][0]


def test_fixed_buffer_refuses_to_grow():
    buf = StepBuffers("cpu", capacity=128, fixed=True)
    with pytest.raises(ValueError, match="fixed"):
        buf.host(step_layout(100, 10, 10, 10))
    assert buf.capacity == 128


def test_empty_sections_are_fine():
    buf = StepBuffers("cpu")
    lay = step_layout(3, 1, 2, 0, 0)
    buf.host(lay)
    v = buf.upload(lay)
    assert v["logits_indices"].shape == (0,) and v["work"].shape == (0,)
