"""The page-granular planner (plan/pages.py) against the token-exact one (plan/trie.py).

Both plans must be valid (``check_plan``: every member starts with its group's prefix, token counts as
defined); the page tree must group exactly at page granularity; with the members' tokens at hand the
page plan's group prefixes are token-exact, so on prompts that diverge only at a few points its saving
is the token plan's. Execution (planned == achieved on the engine) is in tests/test_plan_execution.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchllm.plan.pages import PagePrompts, chained_lcp, page_trie, symbol_order
from batchllm.plan.check import check_plan
from batchllm.plan.plan import TOKEN_PLAN_MAX_TOKENS, build_plan
from batchllm.plan.trie import PrefixTrie, adjacent_lcp


def structured(rng: np.random.Generator, n: int, vocab: int = 4) -> list[np.ndarray]:
    """Prompts that nest and repeat: prefixes of a few bases (often of each other), short tails, exact
    copies, prompts shorter than a page."""
    bases = [rng.integers(0, vocab, int(rng.integers(1, 50)), dtype=np.int32) for _ in range(3)]
    out: list[np.ndarray] = []
    while len(out) < n:
        r = rng.random()
        if out and r < 0.15:
            out.append(out[int(rng.integers(len(out)))].copy())  # identical prompt
        elif out and r < 0.3:
            p = out[int(rng.integers(len(out)))]
            out.append(p[: int(rng.integers(1, len(p) + 1))].copy())  # a prefix of another prompt
        else:
            b = bases[int(rng.integers(3))]
            tail = rng.integers(0, vocab, int(rng.integers(0, 9)), dtype=np.int32)
            p = np.concatenate([b[: int(rng.integers(0, len(b) + 1))], tail])
            out.append(p if len(p) else np.array([7], dtype=np.int32))
    return out


def both(prompts, page_size, samples=None, expected=None):
    exp = np.full(len(prompts), 8.0) if expected is None else expected
    tok = build_plan(prompts, exp, samples=samples, page_size=page_size, planner="tokens")
    pg = build_plan(prompts, exp, samples=samples, page_size=page_size, planner="pages")
    check_plan(tok, prompts)
    check_plan(pg, prompts)
    return tok, pg


def test_symbols_identify_pages_and_the_exact_partial_last_page():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 1000, 40, dtype=np.int32)
    b = a.copy()
    b[35] += 1  # differs in the third page (page size 16)
    pp = PagePrompts.of([a, b, a[:32], a[:33], a.tolist(), a.astype(np.int64)], page_size=16)
    sym = [pp.symbols[o : o + k] for o, k in zip(pp.sym_offsets, pp.sym_lens)]
    assert pp.lengths.tolist() == [40, 40, 32, 33, 40, 40] and pp.sym_lens.tolist() == [3, 3, 2, 3, 3, 3]
    assert np.array_equal(sym[0][:2], sym[1][:2]) and sym[0][2] != sym[1][2]
    assert np.array_equal(sym[2], sym[0][:2])  # two full pages: a prefix of a's symbols
    assert sym[3][2] != sym[0][2]  # one token of page 3 is not the same partial page as eight
    assert np.array_equal(sym[4], sym[0]) and np.array_equal(sym[5], sym[0])  # lists, other dtypes
    swapped = a.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert PagePrompts.of([swapped], 16).symbols[0] != sym[0][0]  # order within a page matters


def test_streaming_batches_give_the_same_symbols():
    rng = np.random.default_rng(1)
    prompts = structured(rng, 50)
    one = PagePrompts.of(prompts, 4)
    pp = PagePrompts(4)
    for k in range(0, 50, 7):
        pp.add(prompts[k : k + 7])
    pp.finish()
    assert np.array_equal(pp.symbols, one.symbols) and np.array_equal(pp.lengths, one.lengths)


@pytest.mark.parametrize("seed", range(5))
def test_symbol_order_is_lexicographic_and_chained_lcp_is_the_lcp(seed):
    rng = np.random.default_rng(seed)
    pp = PagePrompts.of(structured(rng, int(rng.integers(1, 80))), int(rng.choice([2, 4, 16])))
    seqs = [tuple(pp.symbols[o : o + k].tolist()) for o, k in zip(pp.sym_offsets, pp.sym_lens)]
    order = symbol_order(pp.symbols, pp.sym_offsets, pp.sym_lens)
    assert order.tolist() == sorted(range(len(seqs)), key=lambda i: (seqs[i], i))
    assert np.array_equal(chained_lcp(pp.symbols, pp.sym_offsets, pp.sym_lens, order),
                          adjacent_lcp(pp.symbols, pp.sym_offsets, pp.sym_lens, order))


def test_symbols_must_be_let_go_before_the_buffer_grows():
    pp = PagePrompts(2)
    pp.add([np.arange(5)])
    held = pp.symbols
    with pytest.raises(ValueError):
        pp.add([np.arange(1 << 18)])  # more than the buffer holds: it must grow
    del held
    pp.add([np.arange(1 << 18)])
    pp.finish()
    assert pp.lengths.tolist() == [5, 1 << 18] and len(pp.symbols) == 3 + (1 << 17)


def test_page_tree_is_the_token_tree_at_page_granularity():
    """Nodes of the page tree are the token tree's prefixes cut to whole pages (or whole identical prompts)."""
    rng = np.random.default_rng(2)
    for page in (2, 4, 16):
        prompts = structured(rng, 40)
        pt = page_trie(PagePrompts.of(prompts, page))
        assert pt.page_size == page and np.array_equal(pt.lengths, [len(p) for p in prompts])
        for v in range(1, pt.num_nodes):
            below = pt.sorted_ids[pt.lo[v] : pt.hi[v]]
            d = int(pt.depth[v])
            heads = {tuple(prompts[i][:d]) for i in below.tolist()}
            assert len(heads) == 1  # everything below a node shares its path
            assert d % page == 0 or len({tuple(prompts[i]) for i in below.tolist()}) == 1
        with pytest.raises(ValueError, match="page symbols"):
            pt.prompt(0)


@pytest.mark.parametrize("page", [2, 4, 16])
@pytest.mark.parametrize("seed", range(6))
def test_page_plan_is_valid_and_close_to_the_token_plan_on_structured_prompts(page, seed):
    rng = np.random.default_rng(seed)
    prompts = structured(rng, int(rng.integers(1, 60)))
    samples = rng.integers(1, 4, len(prompts))
    tok, pg = both(prompts, page, samples=samples, expected=rng.integers(1, 100, len(prompts)).astype(float))
    assert pg.logical_prompt_tokens == tok.logical_prompt_tokens
    # page granularity costs at most one page per sample, against a plan of the same shape
    assert pg.planned_prompt_tokens <= tok.planned_prompt_tokens + page * int(samples.sum())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(-3, 3), min_size=1, max_size=30), min_size=1, max_size=25),
       st.sampled_from([2, 3, 4, 8]), st.integers(0, 2**31 - 1))
def test_page_plan_is_valid_on_random_prompts(rows, page, seed):
    rng = np.random.default_rng(seed)
    prompts = [np.asarray(r, dtype=np.int32) for r in rows]
    prompts += [prompts[int(i)].copy() for i in rng.integers(0, len(prompts), int(rng.integers(0, 4)))]
    both(prompts, page, samples=rng.integers(1, 4, len(prompts)))


def test_shared_heads_that_end_inside_a_page():
    """Groups whose members diverge inside a page: with the tokens the page plan shares up to the exact
    divergence (as the token plan does), without them only the whole pages before it."""
    rng = np.random.default_rng(5)
    heads = [rng.integers(0, 1000, k, dtype=np.int32) for k in (37, 70, 101)]
    prompts = [np.concatenate([h, rng.integers(1000, 2000, 20, dtype=np.int32)]) for h in heads for _ in range(6)]
    tok, pg = both(prompts, 16)
    assert pg.planned_prompt_tokens == tok.planned_prompt_tokens
    assert sorted(g.prefix_len for g in pg.groups) == [37, 70, 101]
    pages = build_plan(PagePrompts.of(prompts, 16), np.full(len(prompts), 8.0), page_size=16)
    check_plan(pages, prompts)
    assert sorted(g.prefix_len for g in pages.groups) == [32, 64, 96]
    assert pages.planned_prompt_tokens == tok.planned_prompt_tokens + 6 * (5 + 6 + 5) - (5 + 6 + 5)
    read = build_plan(PagePrompts.of(prompts, 16), np.full(len(prompts), 8.0), page_size=16,
                      read_tokens=lambda ids, a, b: np.stack([prompts[i][a:b] for i in ids]))
    assert [g.prefix_len for g in read.groups] == [g.prefix_len for g in pg.groups]


def test_identical_prompts_and_short_prompts():
    p = np.arange(21, dtype=np.int32)
    prompts = [p, p.copy(), p.copy(), np.array([5], np.int32), np.array([5], np.int32), p[:3].copy()]
    tok, pg = both(prompts, 16, samples=[1, 2, 1, 1, 3, 2])
    assert pg.planned_prompt_tokens == tok.planned_prompt_tokens
    assert any(g.prefix_len == 20 and len(g.members) == 3 for g in pg.groups)  # identical: all but the last token


def test_auto_planner_and_page_prompts_input():
    rng = np.random.default_rng(7)
    prompts = structured(rng, 30)
    exp = np.full(30, 4.0)
    auto = build_plan(prompts, exp, page_size=4)
    assert [g.prefix_len for g in auto.groups] == [g.prefix_len for g in build_plan(prompts, exp, page_size=4, planner="tokens").groups]
    assert sum(len(p) for p in prompts) <= TOKEN_PLAN_MAX_TOKENS  # small jobs: the token tree
    with pytest.raises(ValueError, match="pages have 4 tokens"):
        build_plan(PagePrompts.of(prompts, 4), exp, page_size=16)
    with pytest.raises(ValueError, match="unknown planner"):
        build_plan(prompts, exp, planner="radix")
    one_token_pages = build_plan(prompts, exp, page_size=1, planner="pages")  # one-token pages: the token tree
    assert isinstance(PrefixTrie.build(prompts), PrefixTrie) and one_token_pages.unique_prompt_tokens == auto.unique_prompt_tokens


def test_bad_prompts_are_refused():
    pp = PagePrompts(4)
    with pytest.raises(ValueError, match="non-empty"):
        pp.add([np.zeros(0, np.int32)])
    with pytest.raises(ValueError, match="int32 range"):
        pp.add([np.array([2**40])])
    with pytest.raises(ValueError, match="page_size"):
        PagePrompts(1)
