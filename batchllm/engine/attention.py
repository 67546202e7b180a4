"""``TorchAttention``, the attention backend in torch, and ``get_backend``, the backends by name.

The interface (``AttentionMetadata``, ``AttentionBackend``, the KV cache layout) is
``batchllm.engine.attention_backend``. ``TorchAttention`` is the reference the Triton kernels
(``batchllm.kernels.backend.TritonAttention``) are tested against, and the CPU engine's path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from batchllm.engine.attention_backend import AttentionBackend, AttentionMetadata
from batchllm.engine.kv_cache import byte_view, check_kv_scales, quantize_fp8


# torch's fused CPU flash-attention kernel: blocked (no score matrix in memory) and it returns the
# log-sum-exp the prefix split needs; about twice the speed of matmul + softmax on the shapes here.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

# Largest padded score block (query rows x keys) one call builds a mask for; bigger work is cut by query.
_MAX_BLOCK = 1 << 22
# K/V gathered per piece of a batch: small enough to stay in cache until attention reads it.
_CHUNK_BYTES = 8 << 20


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None, scale: float
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with its log-sum-exp: the one primitive every torch path is built from.

    ``q`` (B, H, M, d); ``k``, ``v`` (B, H, N, d), any strides with a contiguous last dimension;
    ``visible`` None or bool broadcastable to (B, 1, M, N), True where a query row may see a key. Every
    row must see at least one key. Returns o (B, H, M, d) in q's dtype and lse (B, H, M) float32.
    """
    if q.device.type == "cpu" and _CPU_FLASH is not None and q.dtype in (torch.float32, torch.bfloat16):
        bias = None
        if visible is not None:
            bias = torch.zeros(visible.shape, dtype=q.dtype).masked_fill_(~visible, float("-inf"))
        o, lse = _CPU_FLASH(q, k, v, attn_mask=bias, scale=scale)
        return o, lse
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale)
    if visible is not None:
        s.masked_fill_(~visible, float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = s.sub_(m).exp_()
    l = p.sum(-1, keepdim=True)
    o = torch.matmul(p, v.float()).div_(l)
    return o.to(q.dtype), (m + l.log()).squeeze(-1)


def _fold(x: torch.Tensor, kvh: int) -> torch.Tensor:
    """(B, t, h, d) queries -> (B, kvh, t*g, d): the g query heads of a KV head become rows (GQA without
    copying K/V per query head). Row r is token r // g."""
    b, t, h, d = x.shape
    return x.view(b, t, kvh, h // kvh, d).transpose(1, 2).reshape(b, kvh, t * (h // kvh), d)


def _unfold(o: torch.Tensor, lse: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``_fold`` for attention output (B, kvh, t*g, d) and lse (B, kvh, t*g)."""
    b, kvh, tg, d = o.shape
    g = tg // t
    o = o.view(b, kvh, t, g, d).transpose(1, 2).reshape(b, t, kvh * g, d)
    return o, lse.reshape(b, kvh, t, g).transpose(1, 2).reshape(b, t, kvh * g)


def merge(o_a, lse_a, o_b, lse_b):
    """Exact combination of two partial attentions over disjoint key sets (fp32 result)."""
    top = torch.maximum(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - top).unsqueeze(-1), torch.exp(lse_b - top).unsqueeze(-1)
    return (o_a.float() * wa + o_b.float() * wb) / (wa + wb)


class TorchAttention(AttentionBackend):
    """The torch backend: the reference the Triton kernels are tested against, and the CPU engine's path.

    Every query token attends to its sequence's keys ``[kv_lo, seq_len)`` causally, where ``kv_lo`` is
    the prefix length for members of a prefix group (>= 2 decoding members, or prefilling ones with
    ``split_prefill``) and 0 otherwise; sequences of similar shape run as one padded batch (all decodes
    together; prefill chunks bucketed so padding at most doubles the work). A group's prefix is then
    attended once for all its members' query rows stacked together (Hydragen's split: the prefix read
    once) and merged exactly.
    K/V pages are gathered into padded tensors (``index_select``: 2-3x faster than fancy indexing here);
    the Triton backend reads pages in place instead.
    """

    name = "torch"
    # Whether prefill chunks of a group take the prefix split too. Off: prefill attention is compute
    # bound here and the split saves no arithmetic, only adds the merge (SmolLM2 shapes, one CPU thread,
    # 32 query tokens per member: 8.5 ms split vs 6.1 ms plain with 64-token prefixes, equal with 256).
    # Decodes are memory bound and always split (2.4 ms -> 1.3 ms with 256-token prefixes).
    split_prefill: bool = False

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                 kv_scales: torch.Tensor | None = None) -> None:
        num_pages, page_size = kv_cache.shape[1], kv_cache.shape[2]
        slots = meta.slot_mapping
        flat = kv_cache.view(2, num_pages * page_size, kv_cache.shape[3], kv_cache.shape[4])
        if meta.has_padding:  # padded rows (CUDA-graph buckets) are skipped
            keep = slots >= 0
            slots, k, v = slots[keep], k[keep], v[keep]
        if kv_cache.dtype == torch.float8_e4m3fn:  # quantized (x / scale per KV head), copied as bytes
            inv = check_kv_scales(kv_scales, k.shape[1], k.device)[2:, :, None]  # (2, kv_heads, 1)
            flat, k, v = byte_view(flat), byte_view(quantize_fp8(k, inv[0])), byte_view(quantize_fp8(v, inv[1]))
        flat[0].index_copy_(0, slots, k)
        flat[1].index_copy_(0, slots, v)

    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        nd, n = meta.num_decodes, meta.num_seqs
        # an fp8 cache is dequantized as it is gathered: k_scale and v_scale per KV head, in q's dtype
        deq = None
        if kv_cache.dtype == torch.float8_e4m3fn and kv_scales is not None:
            deq = check_kv_scales(kv_scales, kv_cache.shape[3], q.device)[:2, :, None].to(q.dtype)
        qlens, slens = meta.query_lens_host, meta.seq_lens_host
        row = [0] * (n + 1)
        for i in range(n):
            row[i + 1] = row[i] + qlens[i]
        groups = self._usable_groups(meta, nd)
        kv_lo = [0] * n
        for start, end, plen in groups:
            kv_lo[start:end] = [plen] * (end - start)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if groups else None
        if nd:
            self._run_batch(q, kv_cache, deq, meta, list(range(nd)), row, kv_lo, scale, out, lse)
        for batch in _prefill_batches(range(nd, n), qlens, slens, kv_lo, kv_cache.shape[2]):
            if len(batch) == 1 and not kv_lo[batch[0]]:
                i = batch[0]
                out[row[i] : row[i + 1]] = self._prefill(q[row[i] : row[i + 1]], kv_cache, deq, meta.block_tables[i], slens[i],
                                                          scale)
            else:
                self._run_batch(q, kv_cache, deq, meta, batch, row, kv_lo, scale, out, lse)
        if groups:
            self._prefix_parts(q, kv_cache, deq, meta, groups, row, scale, out, lse)
        return out

    def _usable_groups(self, meta, nd: int) -> list[tuple[int, int, int]]:
        """The groups worth the prefix split: all-decode (or, with ``split_prefill``, all-prefill) runs
        of >= 2 members whose queries all sit past the prefix (so the prefix part needs no mask)."""
        out = []
        for g in meta.prefix_groups or ():
            start, end, plen = g.seq_start, g.seq_end, g.prefix_len
            if end - start < 2 or plen <= 0 or (start < nd < end) or (start >= nd and not self.split_prefill):
                continue
            if all(meta.seq_lens_host[i] - meta.query_lens_host[i] >= plen for i in range(start, end)):
                out.append((start, end, plen))
        return out

    def _gather(self, kv_cache: torch.Tensor, deq: torch.Tensor | None, pages: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of whole pages in ``dtype`` (q's): pages (..., n) -> (..., n * page_size, kv_heads, d).

        The result lives in a scratch buffer reused by the next call (a fresh allocation of this size
        costs page faults: 3x the copy itself on a CPU); callers use it before gathering again. An fp8
        cache is gathered as bytes, upcast into the buffer and multiplied by ``deq`` ((2, kv_heads, 1):
        k_scale and v_scale in ``dtype``; None: scale 1)."""
        _, _, ps, kvh, d = kv_cache.shape
        idx = pages.reshape(-1).long()
        n = idx.numel() * ps * kvh * d
        buf = getattr(self, "_scratch", None)
        if buf is None or buf.numel() < 2 * n or buf.dtype != dtype or buf.device != kv_cache.device:
            buf = self._scratch = torch.empty(2 * n, dtype=dtype, device=kv_cache.device)
        shape = (*pages.shape[:-1], pages.shape[-1] * ps, kvh, d)
        if kv_cache.dtype == torch.float8_e4m3fn:
            raw = byte_view(kv_cache)
            k = buf[:n].view(-1, ps, kvh, d).copy_(raw[0].index_select(0, idx).view(torch.float8_e4m3fn))
            v = buf[n : 2 * n].view(-1, ps, kvh, d).copy_(raw[1].index_select(0, idx).view(torch.float8_e4m3fn))
            if deq is not None:
                k.mul_(deq[0])
                v.mul_(deq[1])
        else:
            k = torch.index_select(kv_cache[0], 0, idx, out=buf[:n].view(-1, ps, kvh, d))
            v = torch.index_select(kv_cache[1], 0, idx, out=buf[n : 2 * n].view(-1, ps, kvh, d))
        return k.view(shape), v.view(shape)

    def _run_batch(self, q, kv_cache, deq, meta, seqs: list[int], row: list[int], kv_lo: list[int], scale, out, lse) -> None:
        """Sequences ``seqs`` as one padded batch over their keys ``[kv_lo, seq_len)``, causal; writes
        their query rows of ``out`` (and of ``lse`` when given).

        The batch is gathered and attended a few sequences at a time (about ``_CHUNK_BYTES`` of K/V), so
        the gathered K/V is still in cache when attention reads it: twice the speed of one big gather."""
        ps, kvh = kv_cache.shape[2], kv_cache.shape[3]
        dev, h, d = q.device, q.shape[1], q.shape[2]
        b = len(seqs)
        qlens = [meta.query_lens_host[i] for i in seqs]
        t = max(qlens)
        first = [kv_lo[i] // ps for i in seqs]
        width = max(-(-meta.seq_lens_host[i] // ps) - f for i, f in zip(seqs, first))
        contiguous = seqs[-1] - seqs[0] == b - 1
        sel = slice(seqs[0], seqs[-1] + 1) if contiguous else torch.tensor(seqs, device=dev)
        tables = meta.block_tables[sel]
        first_t = torch.tensor(first, device=dev)
        cols = (first_t[:, None] + torch.arange(width, device=dev)[None, :]).clamp_(max=tables.shape[1] - 1)
        pages = tables.gather(1, cols)
        uniform = contiguous and all(x == t for x in qlens)
        if uniform:  # the rows are one block: no index
            qb = q[row[seqs[0]] : row[seqs[-1] + 1]].view(b, t, h, d)
        else:  # padded token rows repeat the sequence's last row (they see every key; discarded)
            src = torch.tensor([[row[i] + min(j, ql - 1) for j in range(t)] for i, ql in zip(seqs, qlens)], device=dev)
            qb = q[src.view(-1)].view(b, t, h, d)
        seq_len = meta.seq_lens[sel].long()
        lo = torch.tensor([kv_lo[i] for i in seqs], device=dev)
        pos = first_t[:, None] * ps + torch.arange(width * ps, device=dev)[None, :]  # (b, N) key positions
        in_range = (pos >= lo[:, None]) & (pos < seq_len[:, None])
        qpos0 = seq_len - torch.tensor(qlens, device=dev)  # position of each sequence's first query
        g = h // kvh
        seq_bytes = 2 * width * ps * kvh * d * q.element_size()  # as gathered (in q's dtype)
        per_chunk = max(1, _CHUNK_BYTES // seq_bytes)
        o_rows, l_rows = [], []
        for c0 in range(0, b, per_chunk):
            c1 = min(b, c0 + per_chunk)
            k, v = self._gather(kv_cache, deq, pages[c0:c1], q.dtype)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (c, kvh, N, d)
            step = max(1, _MAX_BLOCK // ((c1 - c0) * g * width * ps))  # query tokens per piece: bounds the mask
            for t0 in range(0, t, step):
                t1 = min(t, t0 + step)
                qp = qpos0[c0:c1, None] + torch.arange(t0, t1, device=dev)[None, :]
                vis = in_range[c0:c1, None, :] & (pos[c0:c1, None, :] <= qp[:, :, None])
                vis = vis.repeat_interleave(g, dim=1).unsqueeze(1)  # (c, 1, rows * g, N)
                o, l = attend(_fold(qb[c0:c1, t0:t1], kvh), k, v, vis, scale)
                o, l = _unfold(o, l, t1 - t0)
                o_rows.append((c0, c1, t0, t1, o))
                l_rows.append(l)
        if len(o_rows) == 1:
            o, l = o_rows[0][4], l_rows[0]
        else:
            o = torch.empty(b, t, h, d, dtype=q.dtype, device=dev)
            l = torch.empty(b, t, h, dtype=torch.float32, device=dev)
            for (c0, c1, t0, t1, oc), lc in zip(o_rows, l_rows):
                o[c0:c1, t0:t1], l[c0:c1, t0:t1] = oc, lc
        if uniform:
            r0, r1 = row[seqs[0]], row[seqs[-1] + 1]
            out[r0:r1] = o.reshape(r1 - r0, h, d)
            if lse is not None:
                lse[r0:r1] = l.reshape(r1 - r0, h)
            return
        dst = torch.tensor([r for i in seqs for r in range(row[i], row[i + 1])], device=dev)
        keep = torch.tensor([j * t + x for j, ql in enumerate(qlens) for x in range(ql)], device=dev)
        out.index_copy_(0, dst, o.reshape(b * t, h, d).index_select(0, keep))
        if lse is not None:
            lse.index_copy_(0, dst, l.reshape(b * t, h).index_select(0, keep))

    def _prefix_parts(self, q, kv_cache, deq, meta, groups: list[tuple[int, int, int]], row: list[int], scale, out, lse
                      ) -> None:
        """Each group's query rows, stacked, against its shared prefix ``[0, plen)`` read once (through the
        first member's pages), merged exactly into ``out`` / ``lse`` (the members' own parts). All the
        step's groups run as one padded batch; every query sits past its prefix, so only differing
        prefix lengths need a mask."""
        ps, kvh = kv_cache.shape[2], kv_cache.shape[3]
        dev, h, d = q.device, q.shape[1], q.shape[2]
        b = len(groups)
        spans = [(row[s0], row[s1]) for s0, s1, _ in groups]
        m = max(r1 - r0 for r0, r1 in spans)
        plens = [p for _, _, p in groups]
        width = -(-max(plens) // ps)
        tables = meta.block_tables[torch.tensor([s0 for s0, _, _ in groups], device=dev)] if b > 1 else meta.block_tables[groups[0][0]][None]
        k, v = self._gather(kv_cache, deq, tables[:, :width], q.dtype)  # (b, width * ps, kvh, d)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        vis = None
        if min(plens) != width * ps:
            vis = (torch.arange(width * ps, device=dev)[None, :] < torch.tensor(plens, device=dev)[:, None])[:, None, None, :]
        block = all(r1 - r0 == m for r0, r1 in spans) and all(spans[j][1] == spans[j + 1][0] for j in range(b - 1))
        if block:  # the groups' rows are one contiguous block of equal parts: no index
            rows = slice(spans[0][0], spans[-1][1])
            qb = q[rows].view(b, m, h, d)
        else:  # padded rows repeat a group's last row (discarded)
            src = torch.tensor([r0 + min(j, r1 - r0 - 1) for r0, r1 in spans for j in range(m)], device=dev)
            rows = torch.tensor([r for r0, r1 in spans for r in range(r0, r1)], device=dev)
            keep = torch.tensor([i * m + j for i, (r0, r1) in enumerate(spans) for j in range(r1 - r0)], device=dev)
            qb = q[src].view(b, m, h, d)
        o, l = attend(_fold(qb, kvh), k, v, vis, scale)
        o, l = _unfold(o, l, m)
        o, l = o.reshape(b * m, h, d), l.reshape(b * m, h)
        if block:
            out[rows] = merge(o, l, out[rows], lse[rows]).to(q.dtype)
        else:
            o, l = o.index_select(0, keep), l.index_select(0, keep)
            out.index_copy_(0, rows, merge(o, l, out[rows], lse[rows]).to(q.dtype))

    def _prefill(self, q, kv_cache, deq, pages, seq_len, scale):
        """One prefill chunk outside any group: SDPA over its gathered history (no log-sum-exp needed)."""
        qlen, ps = q.shape[0], kv_cache.shape[2]
        k, v = self._gather(kv_cache, deq, pages[: -(-seq_len // ps)], q.dtype)
        qt = q.transpose(0, 1).unsqueeze(0)  # (1, h, qlen, d)
        kt = k[:seq_len].transpose(0, 1).unsqueeze(0)
        vt = v[:seq_len].transpose(0, 1).unsqueeze(0)
        ctx = seq_len - qlen
        if ctx == 0:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
        else:
            # query row r sits at position ctx + r and may see keys 0..ctx+r
            rows = torch.arange(qlen, device=q.device)[:, None] + ctx
            mask = torch.arange(seq_len, device=q.device)[None, :] <= rows
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
        return o.squeeze(0).transpose(0, 1)


def _prefill_batches(seqs, qlens, slens, kv_lo, page_size: int) -> list[list[int]]:
    """Prefill sequences bucketed into padded batches: sorted by query length, a batch grows while its
    padded work (sequences x longest query x widest key span) stays within twice its real work and the
    mask bound. Sequences keep their order inside a batch (so runs stay contiguous slices)."""
    items = sorted(seqs, key=lambda i: (qlens[i], slens[i] - kv_lo[i]))
    batches: list[list[int]] = []
    cur: list[int] = []
    real = t = span = 0
    for i in items:
        s = slens[i] - kv_lo[i] // page_size * page_size
        nt, nspan = max(t, qlens[i]), max(span, s)
        padded = (len(cur) + 1) * nt * nspan
        if cur and (padded > 2 * (real + qlens[i] * s) or padded > _MAX_BLOCK):
            batches.append(sorted(cur))
            cur, real, nt, nspan = [], 0, qlens[i], s
        cur.append(i)
        real += qlens[i] * s
        t, span = nt, nspan
    if cur:
        batches.append(sorted(cur))
    return batches


ATTENTION_BACKENDS = ("torch", "triton")


def get_backend(name: str) -> AttentionBackend:
    """A new attention backend: "torch" (``TorchAttention``) or "triton" (``TritonAttention``, which
    imports Triton and defines the kernels: only here, on first use). Raises ValueError for another name."""
    if name == "torch":
        return TorchAttention()
    if name == "triton":
        from batchllm.kernels.backend import TritonAttention

        return TritonAttention()
    raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(ATTENTION_BACKENDS)}")
