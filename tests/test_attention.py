"""TorchAttention: the prefix-group decode path equals plain paged attention, and both equal a dense
per-sequence reference."""

from __future__ import annotations

import math

import pytest
import torch

from batchllm.engine import attention
from batchllm.engine.attention import TorchAttention
from batchllm.engine.attention_backend import AttentionMetadata, PrefixGroupDescriptor


def split_backend() -> TorchAttention:
    """The torch backend with the prefix split on for prefill chunks too (off by default on the CPU)."""
    backend = TorchAttention()
    backend.split_prefill = True
    return backend


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
    got = split_backend().forward(q, kv, meta, scale)
    default = TorchAttention().forward(q, kv, meta, scale)  # prefill groups run plainly by default
    meta.prefix_groups = None
    plain = TorchAttention().forward(q, kv, meta, scale)
    torch.testing.assert_close(default, plain, atol=0, rtol=0)
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


def _random_step(seed: int, page_size: int = 4, h: int = 6, kvh: int = 2, d: int = 8):
    """A random step: decodes then prefill chunks, several prefix groups of different prefix lengths and
    sizes (some prefixes ending inside a page), plain sequences in between; every sequence's K/V laid out
    in pages as the engine does (shared full prefix pages, a private copy of the partial one)."""
    gen = torch.Generator().manual_seed(seed)

    def rint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    kv = torch.randn(2, 512, page_size, kvh, d, generator=gen)
    nxt = 0
    seqs = []  # (pages, seq_len, qlen, group id or None)
    groups = []
    for phase in ("decode", "prefill"):
        first = len(seqs)
        for _ in range(rint(2, 4)):
            if rint(0, 2):  # a group
                plen, members = rint(1, 13), rint(2, 5)
                full, part = divmod(plen, page_size)
                shared = list(range(nxt, nxt + full))
                nxt += full
                if part:
                    kv[:, nxt] = torch.randn(2, page_size, kvh, d, generator=gen)
                    partial_src = nxt
                    nxt += 1
                start = len(seqs)
                for _ in range(members):
                    pages = list(shared)
                    if part:
                        kv[:, nxt] = kv[:, partial_src]
                        pages.append(nxt)
                        nxt += 1
                    own = rint(1, 9)
                    qlen = 1 if phase == "decode" else rint(1, own)
                    seq_len = plen + own
                    while len(pages) * page_size < seq_len:
                        pages.append(nxt)
                        nxt += 1
                    seqs.append((pages, seq_len, qlen))
                groups.append(PrefixGroupDescriptor(start, len(seqs), plen))
            else:
                seq_len = rint(1, 20)
                qlen = 1 if phase == "decode" else rint(1, seq_len)
                pages = list(range(nxt, nxt + -(-seq_len // page_size)))
                nxt += len(pages)
                seqs.append((pages, seq_len, qlen))
        if phase == "decode":
            num_decodes = len(seqs) - first
    width = max(len(p) for p, _, _ in seqs)
    qlens = [q for _, _, q in seqs]
    lens = [s for _, s, _ in seqs]
    q = torch.randn(sum(qlens), h, d, generator=gen)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=torch.tensor([p + [0] * (width - len(p)) for p, _, _ in seqs], dtype=torch.int32),
        slot_mapping=torch.zeros(sum(qlens), dtype=torch.int64),
        num_decodes=num_decodes, query_lens_host=qlens, seq_lens_host=lens, prefix_groups=groups,
    )
    return q, kv, meta, seqs


@pytest.mark.parametrize("seed,variant", [(s, "flash") for s in range(8)] + [(8, "portable"), (9, "portable"), (10, "pieces"), (11, "pieces")])
def test_many_groups_mixed_step_matches_dense(seed, variant, monkeypatch):
    """Several groups at once (batched prefix parts, differing prefix lengths and sizes, padded own-part
    batches with differing query lengths) equal a dense per-sequence causal reference. ``portable``: the
    matmul path other devices take; ``pieces``: batches cut into one-sequence chunks and one-token pieces."""
    if variant == "portable":
        monkeypatch.setattr(attention, "_CPU_FLASH", None)
    if variant == "pieces":
        monkeypatch.setattr(attention, "_CHUNK_BYTES", 1)
        monkeypatch.setattr(attention, "_MAX_BLOCK", 1)
    q, kv, meta, seqs = _random_step(seed)
    scale = q.shape[2] ** -0.5
    got = split_backend().forward(q, kv, meta, scale)
    default = TorchAttention().forward(q, kv, meta, scale)
    meta.prefix_groups = None
    plain = TorchAttention().forward(q, kv, meta, scale)
    r = 0
    for pages, seq_len, qlen in seqs:
        k = kv[0][pages].reshape(-1, kv.shape[3], kv.shape[4])[:seq_len]
        v = kv[1][pages].reshape(-1, kv.shape[3], kv.shape[4])[:seq_len]
        ref = dense_causal(q[r : r + qlen], k, v, scale)
        torch.testing.assert_close(got[r : r + qlen], ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(default[r : r + qlen], ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(plain[r : r + qlen], ref, atol=2e-5, rtol=1e-4)
        r += qlen
