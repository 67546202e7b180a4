"""TorchAttention: the prefix-group decode path equals plain paged attention, and both equal a dense
per-sequence reference."""

from __future__ import annotations

import math

import pytest
import torch

from batchllm.engine.attention import AttentionMetadata, PrefixGroupDescriptor, TorchAttention


def dense_reference(q, k_seqs, v_seqs, scale):
    """Decode attention, one sequence at a time, from the sequences' full K/V."""
    outs = []
    for i, (k, v) in enumerate(zip(k_seqs, v_seqs)):
        h, kvh = q.shape[1], k.shape[1]
        kk = k.repeat_interleave(h // kvh, dim=1)  # (L, h, d)
        vv = v.repeat_interleave(h // kvh, dim=1)
        s = torch.einsum("hd,lhd->hl", q[i].double(), kk.double()) * scale
        outs.append(torch.einsum("hl,lhd->hd", torch.softmax(s, -1), vv.double()))
    return torch.stack(outs).float()


@pytest.mark.parametrize("prefix_len,page_size", [(7, 4), (8, 4), (1, 4), (13, 16)])
def test_group_decode_matches_plain_and_dense(prefix_len, page_size):
    torch.manual_seed(prefix_len)
    h, kvh, d = 8, 2, 16
    own = [3, 1, 6, 2, 5]  # tokens after the prefix, the last one being the decode token
    m = len(own)
    num_pages = 64
    kv = torch.randn(2, num_pages, page_size, kvh, d)
    # every member shares the prefix's full pages; the partial page is copied per member
    full, part = divmod(prefix_len, page_size)
    shared_pages = list(range(full))
    next_page = full
    tables, k_seqs, v_seqs = [], [], []
    for i, n in enumerate(own):
        pages = list(shared_pages)
        if part:
            kv[:, next_page] = kv[:, 60]  # the same partial prefix page content for every member
            pages.append(next_page)
            next_page += 1
        total = prefix_len + n
        while len(pages) * page_size < total:
            pages.append(next_page)
            next_page += 1
        tables.append(pages)
        flat_k = kv[0][pages].reshape(-1, kvh, d)[:total]
        flat_v = kv[1][pages].reshape(-1, kvh, d)[:total]
        k_seqs.append(flat_k)
        v_seqs.append(flat_v)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    lens = [prefix_len + n for n in own]
    q = torch.randn(m, h, d)
    scale = 1 / math.sqrt(d)

    def meta(groups):
        return AttentionMetadata(
            query_start_loc=torch.arange(m + 1, dtype=torch.int32),
            seq_lens=torch.tensor(lens, dtype=torch.int32),
            block_tables=bt,
            slot_mapping=torch.zeros(m, dtype=torch.int64),
            num_decodes=m,
            query_lens_host=[1] * m,
            seq_lens_host=lens,
            prefix_groups=groups,
        )

    backend = TorchAttention()
    plain = backend.forward(q, kv, meta(None), scale)
    # members 1..4 form a group; member 0 stays plain (mixed path)
    grouped = backend.forward(q, kv, meta([PrefixGroupDescriptor(1, m, prefix_len)]), scale)
    ref = dense_reference(q, k_seqs, v_seqs, scale)
    torch.testing.assert_close(plain, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grouped, ref, atol=2e-5, rtol=1e-4)


def dense_causal(q_rows, k, v, scale):
    """Queries are the last len(q_rows) positions of a sequence with keys k/v (all positions)."""
    L, kvh = k.shape[0], k.shape[1]
    n, h = q_rows.shape[0], q_rows.shape[1]
    kk = k.repeat_interleave(h // kvh, dim=1).double()
    vv = v.repeat_interleave(h // kvh, dim=1).double()
    s = torch.einsum("qhd,lhd->hql", q_rows.double(), kk) * scale
    qpos = torch.arange(L - n, L)
    s.masked_fill_((torch.arange(L)[None, :] > qpos[:, None])[None], float("-inf"))
    return torch.einsum("hql,lhd->qhd", torch.softmax(s, -1), vv).float()


@pytest.mark.parametrize("prefix_len,page_size", [(7, 4), (8, 4), (1, 4)])
def test_group_prefill_matches_dense(prefix_len, page_size):
    torch.manual_seed(100 + prefix_len)
    h, kvh, d = 4, 2, 8
    own = [5, 3, 9]  # own tokens after the prefix
    qlens = [5, 2, 4]  # this step computes the last qlens[i] of them (chunked prefill)
    kv = torch.randn(2, 64, page_size, kvh, d)
    full, part = divmod(prefix_len, page_size)
    nxt = full
    tables, ks, vs = [], [], []
    for n in own:
        pages = list(range(full))
        if part:
            kv[:, nxt] = kv[:, 63]
            pages.append(nxt)
            nxt += 1
        while len(pages) * page_size < prefix_len + n:
            pages.append(nxt)
            nxt += 1
        tables.append(pages)
        ks.append(kv[0][pages].reshape(-1, kvh, d)[: prefix_len + n])
        vs.append(kv[1][pages].reshape(-1, kvh, d)[: prefix_len + n])
    width = max(map(len, tables))
    lens = [prefix_len + n for n in own]
    q = torch.randn(sum(qlens), h, d)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, 5, 7, 11], dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.zeros(sum(qlens), dtype=torch.int64),
        num_decodes=0,
        query_lens_host=qlens,
        seq_lens_host=lens,
        prefix_groups=[PrefixGroupDescriptor(0, 3, prefix_len)],
    )
    scale = d**-0.5
    got = TorchAttention().forward(q, kv, meta, scale)
    meta.prefix_groups = None
    plain = TorchAttention().forward(q, kv, meta, scale)
    r = 0
    for i, n in enumerate(qlens):
        ref = dense_causal(q[r : r + n], ks[i], vs[i], scale)
        torch.testing.assert_close(got[r : r + n], ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(plain[r : r + n], ref, atol=2e-5, rtol=1e-4)
        r += n


def test_store_kv_writes_slots_and_skips_padding():
    kv = torch.zeros(2, 3, 4, 1, 2)
    k = torch.arange(6, dtype=torch.float32).view(3, 1, 2) + 1
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, 3], dtype=torch.int32), seq_lens=torch.tensor([3], dtype=torch.int32),
        block_tables=torch.zeros(1, 1, dtype=torch.int32), slot_mapping=torch.tensor([5, -1, 0]),
        num_decodes=0, query_lens_host=[3], seq_lens_host=[3], has_padding=True,
    )
    TorchAttention().store_kv(k, -k, kv, meta)
    flat = kv.view(2, 12, 1, 2)
    assert torch.equal(flat[0, 5], k[0]) and torch.equal(flat[0, 0], k[2]) and torch.equal(flat[1, 0], -k[2])
    assert int((flat[0] != 0).any(-1).sum()) == 2  # the padded row wrote nothing
