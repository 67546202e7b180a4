"""Paged and prefix-shared attention kernels against their torch references.

Without CUDA the kernels run in Triton's interpreter on the CPU, so shapes are tiny; with CUDA the same
tests run compiled, and the ``gpu``-marked ones add realistic sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from batchllm.kernels.paged_attention import (
    AttentionTuning,
    TileConfig,
    paged_attention,
    paged_attention_ref,
    plan_paged_attention,
    resolve_merge_heads,
)
from batchllm.kernels.prefix_attention import (
    merge_attn_states,
    merge_attn_states_ref,
    plan_prefix_shared_attention,
    prefix_shared_attention,
    prefix_shared_attention_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make_step(query_lens, seq_lens, groups=(), *, heads=4, kv_heads=1, head_dim=16, page_size=4,
              dtype=torch.float32, seed=0, device=DEVICE):
    """Random q, a paged K/V cache and block tables laid out as the engine lays out a step.

    Pages are scattered (a random permutation). Members of a group ``(start, end, prefix_len)`` share the
    first member's full prefix pages and hold a private copy of its partial last prefix page, exactly as
    the scheduler admits them.
    """
    g = torch.Generator().manual_seed(seed)
    ps = page_size
    n_pages = [(s + ps - 1) // ps for s in seq_lens]
    total = sum(n_pages) + 2
    kv = torch.randn(2, total, ps, kv_heads, head_dim, generator=g).to(dtype)
    perm = (torch.randperm(total - 1, generator=g) + 1).tolist()  # page 0 stays unused (padding entries)
    bt = torch.zeros(len(seq_lens), max(n_pages), dtype=torch.int32)
    for i, n in enumerate(n_pages):
        bt[i, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int32)
    for start, end, plen in groups:
        full = plen // ps
        for m in range(start + 1, end):
            bt[m, :full] = bt[start, :full]
            if plen % ps:  # the partial last page: same prefix tokens, own tokens after them
                src, dst = int(bt[start, full]), int(bt[m, full])
                kv[:, dst, : plen % ps] = kv[:, src, : plen % ps]
    q = torch.randn(sum(query_lens), heads, head_dim, generator=g).to(dtype)
    return q.to(device), kv.to(device), bt.to(device)


def close(a, b, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), atol=tol, rtol=tol)


def lse_close(a, b):
    a, b = a.cpu(), b.cpu()
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(b)
    torch.testing.assert_close(a[fin], b[fin], atol=1e-4, rtol=1e-4)


# a mixed step: decodes (one at position 0, one right after a page boundary), a chunk that starts
# mid-page, a first chunk (no history) of odd length, a chunk ending exactly on a page boundary
MIXED_QL = [1, 1, 5, 3, 4]
MIXED_SL = [1, 9, 14, 3, 8]


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 1), (8, 1), (6, 2)])  # GQA ratios 1, 4, 8, 3
@pytest.mark.parametrize("head_dim", [64, 128])
def test_paged_attention_mixed_step(heads, kv_heads, head_dim):
    q, kv, bt = make_step(MIXED_QL, MIXED_SL, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    out, lse = paged_attention(q, kv, bt, MIXED_QL, MIXED_SL, 0.125, return_lse=True)
    ref, ref_lse = paged_attention_ref(q, kv, bt, MIXED_QL, MIXED_SL, 0.125)
    close(out, ref, torch.float32)
    lse_close(lse, ref_lse)


def test_paged_attention_odd_head_dim_and_empty_step():
    q, kv, bt = make_step(MIXED_QL, MIXED_SL, heads=4, kv_heads=2, head_dim=80)  # padded to 128 lanes
    out, _ = paged_attention(q, kv, bt, MIXED_QL, MIXED_SL, 0.1)
    close(out, paged_attention_ref(q, kv, bt, MIXED_QL, MIXED_SL, 0.1)[0], torch.float32)
    out, lse = paged_attention(q[:0], kv, bt[:0], [], [], 0.1, return_lse=True)
    assert out.shape == (0, 4, 80) and lse.shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paged_attention_half_precision(dtype):
    q, kv, bt = make_step(MIXED_QL, MIXED_SL, heads=4, kv_heads=2, head_dim=32, dtype=dtype)
    out, _ = paged_attention(q, kv, bt, MIXED_QL, MIXED_SL, 0.2)
    assert out.dtype == dtype
    close(out, paged_attention_ref(q, kv, bt, MIXED_QL, MIXED_SL, 0.2)[0], dtype)


@pytest.mark.parametrize(
    "tuning",
    [
        AttentionTuning(kv_chunk=8, merge_heads=2),  # split-KV: long ranges in pieces, merged 2 heads a program
        AttentionTuning(one_launch=True),  # decodes and chunks in one launch of wide tiles
        AttentionTuning(wide=TileConfig(32, 32), narrow=TileConfig(16, 16), kv_chunk=0),
    ],
    ids=["split", "one-launch", "tiles"],
)
def test_paged_attention_tunings(tuning):
    ql, sl = [1, 1, 6], [19, 2, 23]
    q, kv, bt = make_step(ql, sl, heads=4, kv_heads=2, head_dim=16)
    out, lse = paged_attention(q, kv, bt, ql, sl, 0.3, return_lse=True, tuning=tuning)
    ref, ref_lse = paged_attention_ref(q, kv, bt, ql, sl, 0.3)
    close(out, ref, torch.float32)
    lse_close(lse, ref_lse)


def test_plan_splits_and_merges():
    tiles = {"wide": TileConfig(16, 16), "narrow": TileConfig(16, 16)}  # the interpreter's, fixed for any machine
    plan = plan_paged_attention([1, 1, 6], [19, 2, 23], num_heads=4, num_kv_heads=2, head_dim=16, device="cpu",
                                tuning=AttentionTuning(kv_chunk=8, one_launch=True, **tiles))
    (work,) = plan.work_host
    _, _, bt_row, lo, hi, part = work.T
    # seq 0: keys [0,19) in pieces of 16 (kv_chunk rounded up to whole 16-key blocks); seq 1 whole;
    # seq 2: its 6 tokens see at most 23 keys -> 2 pieces
    assert list(zip(bt_row, lo, hi)) == [(0, 0, 16), (0, 16, 19), (1, 0, 2), (2, 0, 16), (2, 16, 23)]
    assert list(part) == [0, 1, -1, 2, 8]  # seq 1 writes its output directly
    assert plan.num_partials == 14
    assert plan.merge_dst.tolist() == [0, 2, 3, 4, 5, 6, 7]
    assert plan.merge_start.tolist() == [0, 2, 4, 6, 8, 10, 12, 14]


# groups: (seq_start, seq_end, prefix_len)
PREFIX_QL = [1, 1, 1, 1, 4, 1, 3, 2]
PREFIX_SL = [11, 12, 10, 11, 14, 3, 6, 5]
PREFIX_GROUPS = [
    (1, 5, 9),  # 4 members: three decodes and a prefill chunk; the prefix ends inside a page
    (5, 6, 1),  # a group of one with a one-token prefix
    (6, 8, 4),  # the prefix is exactly one page; both members' chunks start below the prefix length
]


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 1, 64), (2, 2, 128), (8, 1, 16)])
def test_prefix_shared_attention(heads, kv_heads, head_dim):
    ql, sl, groups = PREFIX_QL, PREFIX_SL, PREFIX_GROUPS
    q, kv, bt = make_step(ql, sl, groups, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    out, lse = prefix_shared_attention(q, kv, bt, ql, sl, groups, 0.25, return_lse=True, min_group_size=1)
    ref, ref_lse = paged_attention_ref(q, kv, bt, ql, sl, 0.25)
    close(out, ref, torch.float32)
    lse_close(lse, ref_lse)


def test_one_token_prefix_shared_by_three():
    ql, sl, groups = [1, 2, 1], [5, 3, 2], [(0, 3, 1)]  # the shared key is one token of a page
    q, kv, bt = make_step(ql, sl, groups, heads=8, kv_heads=1, head_dim=16)
    out, lse = prefix_shared_attention(q, kv, bt, ql, sl, groups, 0.5, return_lse=True)
    ref, ref_lse = paged_attention_ref(q, kv, bt, ql, sl, 0.5)
    close(out, ref, torch.float32)
    lse_close(lse, ref_lse)


def test_prefix_shared_reference_is_the_decomposition():
    q, kv, bt = make_step(PREFIX_QL, PREFIX_SL, PREFIX_GROUPS, heads=4, kv_heads=2, head_dim=16, device="cpu")
    dec, dec_lse = prefix_shared_attention_ref(q, kv, bt, PREFIX_QL, PREFIX_SL, PREFIX_GROUPS, 0.25)
    ref, ref_lse = paged_attention_ref(q, kv, bt, PREFIX_QL, PREFIX_SL, 0.25)
    close(dec, ref, torch.float32)
    lse_close(dec_lse, ref_lse)


def test_prefix_shared_attention_bf16_split():
    ql, sl, groups = PREFIX_QL, PREFIX_SL, PREFIX_GROUPS
    q, kv, bt = make_step(ql, sl, groups, heads=4, kv_heads=1, head_dim=32, dtype=torch.bfloat16)
    out, _ = prefix_shared_attention(q, kv, bt, ql, sl, groups, 0.25, tuning=AttentionTuning(kv_chunk=4, merge_heads=1))
    close(out, paged_attention_ref(q, kv, bt, ql, sl, 0.25)[0], torch.bfloat16)


def test_prefix_plan_stacks_members_against_first_members_pages():
    plan = plan_prefix_shared_attention(PREFIX_QL, PREFIX_SL, PREFIX_GROUPS, num_heads=4, num_kv_heads=1,
                                        head_dim=16, device="cpu",
                                        tuning=AttentionTuning(wide=TileConfig(16, 16), narrow=TileConfig(16, 16), kv_chunk=0))
    wide, narrow = plan.work_host  # G=4: wide tiles (16 rows) hold 4 tokens, narrow ones 4 too
    rows = [tuple(r) for r in np.concatenate([wide, narrow])[:, :5]]
    # group 0 stacks its 7 query tokens (rows 1..7) in tiles of 4 tokens against keys [0, 9) of seq 1
    assert (1, 4, 1, 0, 9) in rows and (5, 3, 1, 0, 9) in rows
    # its members' own parts start after the prefix
    assert (1, 1, 1, 9, 12) in rows and (4, 4, 4, 9, 14) in rows
    # the group of one runs plain (min_group_size 2): one item over all of its keys, written directly
    assert tuple(np.concatenate([wide, narrow])[[r[0] == 8 for r in rows]][0]) == (8, 1, 5, 0, 3, -1)
    # seq 0 is outside every group: direct; every token of groups 0 and 2 gets two partials
    assert plan.merge_dst.tolist() == [1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13]
    assert np.diff(plan.merge_start.cpu().numpy()).tolist() == [2] * 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_attn_states(dtype):
    g = torch.Generator().manual_seed(1)
    T, H, D = 5, 3, 24
    o_a, o_b = torch.randn(T, H, D, generator=g).to(dtype), torch.randn(T, H, D, generator=g).to(dtype)
    lse_a, lse_b = torch.randn(T, H, generator=g) * 3, torch.randn(T, H, generator=g) * 3
    lse_a[0, 0] = float("-inf")  # an empty part weighs nothing
    lse_a[1, 1] = lse_b[1, 1] = float("-inf")  # both empty: zero output, lse -inf
    args = [t.to(DEVICE) for t in (o_a, lse_a, o_b, lse_b)]
    out, lse = merge_attn_states(*args)
    ref, ref_lse = merge_attn_states_ref(o_a, lse_a, o_b, lse_b)
    close(out, ref, dtype)
    lse_close(lse, ref_lse)
    assert torch.equal(out[0, 0].cpu(), o_b[0, 0]) and not out[1, 1].cpu().any()


def test_validation_errors():
    q, kv, bt = make_step([1, 2], [3, 5], heads=4, kv_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="share a float dtype"):
        paged_attention(q.double(), kv, bt, [1, 2], [3, 5], 1.0)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_attention(q[:, :3], kv, bt, [1, 2], [3, 5], 1.0)
    with pytest.raises(ValueError, match="seq_len >= query_len"):
        paged_attention(q, kv, bt, [1, 2], [3, 1], 1.0)
    with pytest.raises(ValueError, match="do not match the plan"):
        paged_attention(q[:2], kv, bt, [1, 2], [3, 5], 1.0)
    with pytest.raises(ValueError, match="int32"):
        paged_attention(q, kv, bt.long(), [1, 2], [3, 5], 1.0)
    with pytest.raises(ValueError, match="overlaps"):
        prefix_shared_attention(q, kv, bt, [1, 2], [3, 5], [(0, 2, 2), (1, 2, 2)], 1.0)
    with pytest.raises(ValueError, match="shorter than its prefix"):
        prefix_shared_attention(q, kv, bt, [1, 2], [3, 5], [(0, 2, 4)], 1.0)
    with pytest.raises(ValueError, match="outside"):
        prefix_shared_attention(q, kv, bt, [1, 2], [3, 5], [(1, 3, 1)], 1.0)
    with pytest.raises(ValueError, match="too small"):
        paged_attention(q, kv, bt, [1, 2], [3, 5], 1.0, tuning=AttentionTuning(wide=TileConfig(8, 16)))


# --------------------------------------------------------------------------------------------------
# GPU: realistic sizes, compiled kernels
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (32, 32, 64), (32, 4, 128), (9, 3, 64)])
def test_gpu_paged_attention_bf16(heads, kv_heads, head_dim):
    rng = np.random.default_rng(0)
    ql = [1] * 24 + rng.integers(2, 300, 6).tolist()
    sl = [int(x) for x in rng.integers(1, 1500, 24)] + [q + int(rng.integers(0, 1000)) for q in ql[24:]]
    q, kv, bt = make_step(ql, sl, heads=heads, kv_heads=kv_heads, head_dim=head_dim, page_size=16, dtype=torch.bfloat16)
    out, lse = paged_attention(q, kv, bt, ql, sl, head_dim**-0.5, return_lse=True)
    ref, ref_lse = paged_attention_ref(q, kv, bt, ql, sl, head_dim**-0.5)
    close(out, ref, torch.bfloat16)
    torch.testing.assert_close(lse.cpu(), ref_lse.cpu(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("members,prefix,own", [(64, 1024, 128), (16, 1000, 37)])
def test_gpu_prefix_shared_decode(members, prefix, own):
    """The benchmark case (one group decoding against a shared prefix) and an unaligned variant."""
    ql = [1] * members
    sl = [prefix + own] * members
    groups = [(0, members, prefix)]
    q, kv, bt = make_step(ql, sl, groups, heads=32, kv_heads=8, head_dim=128, page_size=16, dtype=torch.bfloat16)
    out, _ = prefix_shared_attention(q, kv, bt, ql, sl, groups, 128**-0.5)
    close(out, paged_attention_ref(q, kv, bt, ql, sl, 128**-0.5)[0], torch.bfloat16)


@pytest.mark.gpu
@gpu
def test_gpu_prefix_shared_mixed_step():
    rng = np.random.default_rng(1)
    ql, sl, groups = [], [], []
    for members, plen in ((8, 700), (1, 33), (20, 16), (5, 1)):
        start = len(ql)
        for _ in range(members):
            q_len = int(rng.choice([1, 1, 1, 57]))
            ql.append(q_len)
            sl.append(plen + q_len + int(rng.integers(0, 90)))
        groups.append((start, len(ql), plen))
    ql += [200, 1]
    sl += [500, 77]
    q, kv, bt = make_step(ql, sl, groups, heads=32, kv_heads=8, head_dim=128, page_size=16, dtype=torch.bfloat16)
    out, _ = prefix_shared_attention(q, kv, bt, ql, sl, groups, 128**-0.5)
    close(out, paged_attention_ref(q, kv, bt, ql, sl, 128**-0.5)[0], torch.bfloat16)


def test_merge_heads_must_be_a_power_of_two_on_every_plan_path():
    """One rule for the eager plans and the graphed decode's static plan (``TritonAttention.static_plan``)."""
    with pytest.raises(ValueError, match="power of two"):
        resolve_merge_heads(8, AttentionTuning(merge_heads=3))
    assert resolve_merge_heads(9, AttentionTuning(merge_heads=64)) == 16  # at most next_power_of_2(heads)


def test_plan_sections_start_on_16_byte_boundaries():
    """Triton specialises pointers on 16-byte alignment: the plan's views of its one packed upload must
    not change alignment with the step's sizes (a second compiled variant inside a timed run)."""
    from batchllm.kernels.paged_attention import WORK_FIELDS

    for ql, sl in (([1], [9]), ([1, 5, 3], [9, 14, 3]), ([1, 1, 2, 7, 1], [5, 30, 2, 9, 40])):
        plan = plan_paged_attention(ql, sl, num_heads=4, num_kv_heads=1, head_dim=16, device=DEVICE,
                                    tuning=AttentionTuning(kv_chunk=4, wide=TileConfig(16, 16), narrow=TileConfig(16, 16)))
        views = [plan.tok_pos, *(l.work for l in plan.launches), plan.merge_dst, plan.merge_start, plan.merge_src]
        assert all(v.data_ptr() % 16 == 0 for v in views if v is not None), (ql, sl)
        assert plan.tok_pos.shape == (sum(ql),) and all(l.work.shape[1] == WORK_FIELDS for l in plan.launches)


def test_default_tiles_per_dtype():
    """16-bit: the Llama-3-8B tiles (64x64 wide, 16x64 narrow); float32 (IEEE dot, no tensor cores): one
    16-key tile for both classes, which neither spills nor takes long to compile on sm_90 (docs/kernels.md)."""
    from batchllm.kernels.paged_attention import default_tiles

    wide, narrow = default_tiles(128, 4, False, torch.bfloat16)
    assert (wide.block_m, wide.block_n, narrow.block_m, narrow.block_n) == (64, 64, 16, 64)
    assert default_tiles(128, 4, False) == (wide, narrow)
    for head_dim, g in ((64, 1), (128, 4), (128, 8), (128, 3)):
        w32, n32 = default_tiles(head_dim, g, False, torch.float32)
        assert w32 == n32 and w32.block_n == 16 and w32.block_m == 16
    plan = plan_paged_attention([1, 40], [9, 40], num_heads=8, num_kv_heads=1, head_dim=128, device=DEVICE, dtype=torch.float32)
    assert all(l.tile.block_n == 16 for l in plan.launches) or plan.launches[0].tile.block_m == 16  # interpreter: 16x16 too


def test_block_table_width_is_not_specialised():
    """The block-table width changes every eager step: Triton must not compile a variant per width class."""
    from batchllm.kernels.paged_attention import _attn_tiles_kernel

    if not hasattr(_attn_tiles_kernel, "params"):  # the interpreter keeps no specialisation settings
        pytest.skip("interpreted kernel; tests/test_kernels_sm90_compile.py checks the compiled one")
    assert {p.name for p in _attn_tiles_kernel.params if p.do_not_specialize} == {"stride_bt"}
