"""The KV manager without a scheduler: exact page ids, copies, prefix lifetimes, the prefix cache's LRU order."""

from __future__ import annotations

import numpy as np
import torch

from batchllm.engine.kv_cache import KVCache
from batchllm.engine.kv_manager import KVManager
from batchllm.engine.prefix_cache import CacheHit, PrefixCachingKVManager
from batchllm.engine.sequence import Sequence, SharedPrefix
from batchllm.sampling_params import SamplingParams
from tests.engine_utils import tiny_config


def make_kv(num_pages: int, page_size: int) -> KVCache:
    return KVCache(tiny_config(), num_pages, page_size, torch.float32, "cpu")


def seq(tokens, prefix=None) -> Sequence:
    return Sequence(0, 0, 0, np.asarray(tokens, dtype=np.int32), SamplingParams(max_tokens=4), 0, frozenset(), prefix=prefix)


def computed_prefix(m: KVManager, tokens, unfinished: int, outer: SharedPrefix | None = None) -> SharedPrefix:
    """A prefix admitted, grown to its length and computed, as the scheduler would leave it."""
    p = SharedPrefix(0, np.asarray(tokens, dtype=np.int32), unfinished=unfinished, prefix=outer)
    m.admit(p, m.lookup(p))
    assert m.grow(p, p.length)
    p.num_computed = p.length
    m.prefix_computed(p)
    return p


def test_attach_shares_full_pages_and_copies_the_partial_one():
    m = KVManager(make_kv(8, 4))
    p = computed_prefix(m, range(6), unfinished=1)
    assert p.pages == [0, 1]
    for layer in m.kv.layers:
        layer[:, 1] = 7.0  # the partial page's K/V
    s = seq(list(range(6)) + [40, 41], prefix=p)
    m.admit(s, m.lookup(s))
    # page 0 shared, page 1 copied into a fresh page 2 that s writes after the prefix
    assert s.pages == [0, 2] and s.num_computed == 6 and s.num_cached == 6
    assert m.pool.refcount[0] == 2 and m.pool.refcount[1] == 1
    m.flush_copies()
    assert all((layer[:, 2] == 7.0).all() for layer in m.kv.layers)
    assert m.pages_to_admit(s, None) == 2 - 1 and m.chain_pages(s) == 2 + 1
    m.finish(s)  # its last dependent: the prefix goes too
    assert s.pages == [] and p.pages == [] and p.unfinished == 0
    m.check_all_free()


def test_nested_prefixes_live_until_their_last_dependent_then_free_in_order():
    m = KVManager(make_kv(8, 4))
    outer = computed_prefix(m, range(8), unfinished=1)  # page-aligned: extending it copies nothing
    inner = computed_prefix(m, list(range(8)) + [50, 51], unfinished=1, outer=outer)
    assert outer.pages == [0, 1] and inner.pages == [0, 1, 2] and inner.num_cached == 8
    s = seq(list(range(8)) + [50, 51, 60], prefix=inner)
    m.admit(s, None)
    assert s.pages == [0, 1, 3]  # inner's partial page 2 copied into 3
    assert m.pool.refcount[:4].tolist() == [3, 3, 1, 1]
    m.finish(s)
    # s, then inner (its last dependent finished), then outer (its last extending prefix released)
    assert inner.pages == [] and outer.pages == [] and outer.unfinished == 0
    m.check_all_free()
    assert m.pool.allocate(4) == [1, 0, 2, 3]  # the free stack: outer's pages freed last, reused first


def test_release_held_prefixes_innermost_first_keeping_their_dependents():
    m = KVManager(make_kv(8, 4))
    outer = computed_prefix(m, range(4), unfinished=1)
    inner = computed_prefix(m, list(range(4)) + [9, 9, 9], unfinished=2, outer=outer)
    assert m.release_held_prefixes() == [inner, outer]
    assert inner.pages == outer.pages == [] and (inner.unfinished, outer.unfinished) == (2, 1)
    m.check_all_free()
    assert m.release_held_prefixes() == []


def test_grow_allocates_nothing_when_short():
    m = KVManager(make_kv(3, 4))
    a, b = seq(range(8)), seq(range(8))
    assert m.grow(a, 8) and a.pages == [0, 1]
    assert not m.grow(b, 8) and b.pages == [] and m.num_free == 1
    m.release(a)
    assert m.grow(b, 8) and b.pages == [1, 0]


def test_prefix_caching_manager_reuses_registered_pages_and_evicts_in_lru_order():
    m = PrefixCachingKVManager(make_kv(6, 2))
    a = seq([1, 2, 3, 4, 5, 6, 7])
    assert m.lookup(a) == CacheHit([], [])
    m.admit(a, m.lookup(a))
    assert m.grow(a, 7) and a.pages == [0, 1, 2, 3]
    m.on_scheduled(a, 7)  # registers the 3 full pages 0, 1, 2 (page 3 holds one token)
    m.finish(a)  # unreferenced but cached: queued tail first, after the never-used pages 4, 5
    b = seq([1, 2, 3, 4, 5, 9, 9])
    hit = m.lookup(b)
    assert hit.pages == [0, 1]  # b's third page differs
    assert m.pages_to_admit(b, hit) == 4  # 2 to allocate, 2 revived out of the free queue
    m.admit(b, hit)
    assert b.pages == [0, 1] and b.num_computed == 4 and b.num_cached == 4
    assert m.grow(b, 7) and b.pages == [0, 1, 4, 5]
    assert m.pool.evictions == 0
    c = seq([8] * 4)
    assert m.grow(c, 4) and c.pages == [3, 2]  # a's tail first: page 2 was cached, so it is evicted
    assert m.pool.evictions == 1 and m.lookup(a).pages == [0, 1]
    m.check_integrity()
    m.release(b)
    m.release(c)
    b.num_preemptions = 1  # re-admitted after a preemption: num_cached keeps its first value
    b.num_cached = 0
    m.admit(b, m.lookup(b))
    assert b.pages == [0, 1] and b.num_cached == 0
