"""Page pool and step packing, without a model: exact page ids, exact step contents."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchllm.engine import admission
from batchllm.engine.kv_cache import KVCache, OutOfPages, PagePool
from batchllm.engine.kv_manager import KVManager
from batchllm.engine.scheduler import Scheduler, SchedulerConfig
from batchllm.engine.sequence import Sequence, SharedPrefix
from batchllm.sampling_params import SamplingParams
from tests.engine_utils import tiny_config


# -- page pool ---------------------------------------------------------------------------------------
def test_pool_allocates_lowest_first_and_reuses_last_freed():
    pool = PagePool(6)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(1) == [3]
    pool.release([1])
    assert pool.allocate(1) == [1]  # LIFO: the page freed last is handed out next
    assert pool.num_free == 2
    pool.check_integrity()


def test_pool_refcounts_and_errors():
    pool = PagePool(4)
    pages = pool.allocate(2)
    pool.share(pages)
    pool.release(pages)
    assert pool.num_free == 2  # still referenced once
    pool.release(pages)
    assert pool.num_free == 4
    with pytest.raises(RuntimeError):
        pool.release([0])
    with pytest.raises(OutOfPages):
        pool.allocate(5)
    assert pool.num_free == 4  # a failed allocation takes nothing
    with pytest.raises(RuntimeError):
        pool.share([3])
    pool.check_integrity()


def test_integrity_detects_leak():
    pool = PagePool(4)
    pool.allocate(1)
    pool.refcount[0] = 0  # simulate a lost reference
    with pytest.raises(RuntimeError, match="leak"):
        pool.check_integrity()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "share", "release"]), st.integers(0, 5)), max_size=60))
def test_pool_random_operations_keep_integrity(ops):
    pool = PagePool(8)
    held: list[int] = []  # one entry per reference
    for op, k in ops:
        if op == "alloc" and pool.can_allocate(k):
            held += pool.allocate(k)
        elif op == "share" and held:
            p = held[k % len(held)]
            pool.share([p])
            held.append(p)
        elif op == "release" and held:
            pool.release([held.pop(k % len(held))])
        pool.check_integrity()
        assert pool.num_pages - pool.num_free == len(set(held))
    pool.release(held)
    assert pool.num_free == 8


# -- step packing ------------------------------------------------------------------------------------
def make_seq(i, prompt_len, max_tokens=4, prefix=None):
    return Sequence(i, i, 0, np.arange(prompt_len, dtype=np.int32) + i, SamplingParams(max_tokens=max_tokens, ignore_eos=True), 0, frozenset(), prefix=prefix)


def make_scheduler(items, num_pages=64, page_size=4, budget=10, max_num_seqs=None, reserve=1.0):
    cfg = tiny_config()
    kv = KVCache(cfg, num_pages, page_size, __import__("torch").float32, "cpu")
    manager = KVManager(kv)
    sc = SchedulerConfig(page_size=page_size, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, max_model_len=512, growth_reserve=reserve)
    return Scheduler(manager, sc, iter(items)), manager.pool


def fake_decode(sched, step):
    """What the engine does after a forward: advance, then append a token to every sampling sequence."""
    sched.advance(step)
    for it, q in zip(step.items, step.num_tokens):
        if isinstance(it, Sequence) and it.num_computed == it.total_len:
            it.output_ids.append(1)
            if len(it.output_ids) >= it.params.max_tokens:
                sched.finish(it)


def test_long_prompt_is_chunked_and_decodes_go_first():
    a, b = make_seq(0, 3), make_seq(1, 25)
    sched, pool = make_scheduler([a, b], budget=10)
    step = sched.schedule()
    # a's whole prompt (3) and the first 7 tokens of b fill the budget of 10
    assert [(it.seq_id, q) for it, q in zip(step.items, step.num_tokens)] == [(0, 3), (1, 7)]
    assert step.num_decodes == 0
    fake_decode(sched, step)
    step = sched.schedule()
    # a decodes first (1 token), then b continues with 9 more
    assert [(it.seq_id, q) for it, q in zip(step.items, step.num_tokens)] == [(0, 1), (1, 9)]
    assert step.num_decodes == 1
    fake_decode(sched, step)
    step = sched.schedule()
    assert [(it.seq_id, q) for it, q in zip(step.items, step.num_tokens)] == [(0, 1), (1, 9)]
    # pages grow with the computed tokens only: a got page 5 only when its 5th token arrived
    assert a.pages == [0, 5] and b.pages == [1, 2, 3, 4, 6, 7, 8]


def test_admission_bounded_by_memory_not_count():
    seqs = [make_seq(i, 8, max_tokens=8) for i in range(10)]
    # each needs 2 pages now and grows to 4: with 16 pages and full reserve, 4 fit (4*2 now + 4*2 reserve)
    sched, pool = make_scheduler(seqs, num_pages=16, budget=100)
    step = sched.schedule()
    assert len(step.items) == 4
    sched2, _ = make_scheduler([make_seq(i, 8, max_tokens=8) for i in range(10)], num_pages=16, budget=100, reserve=0.0)
    assert len(sched2.schedule().items) == 8  # no reserve: as many prompts as fit now


def test_max_num_seqs_cap():
    sched, _ = make_scheduler([make_seq(i, 2) for i in range(6)], budget=100, max_num_seqs=2)
    assert len(sched.schedule().items) == 2


def test_preempts_latest_admitted_when_decode_needs_a_page():
    a, b = make_seq(0, 4, max_tokens=8), make_seq(1, 4, max_tokens=8)
    sched, pool = make_scheduler([a, b], num_pages=3, page_size=4, budget=100, reserve=0.0)
    step = sched.schedule()
    assert [it.seq_id for it in step.items] == [0, 1]
    fake_decode(sched, step)
    # both need a second page for their 5th token; only one page is free: b (admitted last) is preempted
    step = sched.schedule()
    assert [it.seq_id for it in step.items] == [0]
    assert b.num_computed == 0 and b.pages == [] and sched.waiting[0] is b
    assert sched.num_preemptions == 1
    pool.check_integrity()


def test_members_wait_for_their_prefix_and_share_its_pages():
    prefix = SharedPrefix(0, np.arange(6, dtype=np.int32), unfinished=2)
    m1 = Sequence(1, 0, 0, np.arange(9, dtype=np.int32), SamplingParams(max_tokens=1), 0, frozenset(), prefix=prefix)
    m2 = Sequence(2, 1, 0, np.concatenate([np.arange(6), [50, 51]]).astype(np.int32), SamplingParams(max_tokens=1), 0, frozenset(), prefix=prefix)
    sched, pool = make_scheduler([prefix, m1, m2], budget=4, page_size=4)
    step = sched.schedule()
    assert step.items == [prefix] and step.num_tokens == [4]  # budget 4: members cannot start yet
    fake_decode(sched, step)
    step = sched.schedule()
    assert step.items[0] is prefix and step.num_tokens[0] == 2
    # m1 waits although the prefix completes in this step: it ends inside a page, whose copy is taken
    # before the forward pass
    assert len(step.items) == 1
    fake_decode(sched, step)
    step = sched.schedule()
    assert [it.seq_id for it in step.items] == [1, 2]
    assert m1.num_cached == 6 and m1.pages[0] == prefix.pages[0]  # full page shared
    assert m1.pages[1] != prefix.pages[1]  # partial page copied
    assert pool.refcount[prefix.pages[0]] == 3
    fake_decode(sched, step)
    while sched.has_work():
        step = sched.schedule()
        fake_decode(sched, step)
    sched.check_idle_integrity()


def test_members_of_a_page_aligned_prefix_start_in_its_last_chunk(monkeypatch):
    prefix = SharedPrefix(0, np.arange(8, dtype=np.int32), unfinished=2)
    m1 = Sequence(1, 0, 0, np.arange(10, dtype=np.int32), SamplingParams(max_tokens=1), 0, frozenset(), prefix=prefix)
    m2 = Sequence(2, 1, 0, np.concatenate([np.arange(8), [50, 51, 52]]).astype(np.int32), SamplingParams(max_tokens=1), 0, frozenset(), prefix=prefix)
    sched, pool = make_scheduler([prefix, m1, m2], budget=6, page_size=4)
    monkeypatch.setattr(sched.kv_manager.kv, "copy_pages", lambda *a: pytest.fail("a page-aligned prefix copies no page"))
    step = sched.schedule()
    assert step.items == [prefix] and step.num_tokens == [6]  # 2 prefix tokens left: nobody may start
    fake_decode(sched, step)
    step = sched.schedule()
    # the prefix's last chunk is in this step and it ends on a page boundary: its members start in the
    # same step (as vLLM's same-step cache hits), sharing both full pages, nothing copied or recomputed
    assert step.items == [prefix, m1, m2] and step.num_tokens == [2, 2, 2]
    assert m1.num_cached == 8 and m1.pages[:2] == prefix.pages
    assert pool.refcount[prefix.pages[0]] == 3
    fake_decode(sched, step)
    while sched.has_work():
        step = sched.schedule()
        fake_decode(sched, step)
    sched.check_idle_integrity()


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 30)), min_size=1, max_size=12), st.sampled_from([1, 4, 16]))
def test_projected_peak_equals_brute_force_simulation(specs, page_size):
    """The admission rule's projected peak: exact path equals a step-by-step simulation; the O(n log n)
    bound used for huge batches never under-estimates it."""
    seqs = []
    for i, (length, max_tokens) in enumerate(specs):
        s = make_seq(i, length, max_tokens=max_tokens)
        seqs.append(s)
    sched, pool = make_scheduler([], num_pages=4096, page_size=page_size)
    for s in seqs:
        s.pages = pool.allocate(-(-s.total_len // page_size))
        sched.running.append(s)
    held = sum(len(s.pages) for s in seqs)
    brute = max(
        sum(-(-(s.total_len + t) // page_size) for s in seqs if s.params.max_tokens >= t)
        for t in range(0, max(s.params.max_tokens for s in seqs) + 1)
    )
    assert sched._projected_peak_pages(sched._growth_rows()) == max(brute, held)
    old = admission.EXACT_PEAK_CELLS
    admission.EXACT_PEAK_CELLS = 0
    try:
        bound = sched._projected_peak_pages(sched._growth_rows())
    finally:
        admission.EXACT_PEAK_CELLS = old
    assert max(brute, held) <= bound <= max(brute, held) + len(seqs)


def test_staggered_outputs_admit_more_than_sum_of_maxima():
    # 4-token prompts (1 page of 4); outputs 4, 8, 12, ...: they finish one after another, so the peak
    # is far below the sum of their final sizes and all of them fit 16 pages together
    seqs = [make_seq(i, 4, max_tokens=4 * (i + 1)) for i in range(6)]
    final_pages = sum(-(-(4 + 4 * (i + 1)) // 4) for i in range(6))
    assert final_pages > 16
    sched, _ = make_scheduler(seqs, num_pages=16, page_size=4, budget=100)
    assert len(sched.schedule().items) == 6
