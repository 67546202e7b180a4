"""The attention-backend interface and its torch reference implementation.

Every engine step is one flat batch of tokens: decode tokens of running sequences first (one query
each), then prefill chunks (several queries each, causal inside the chunk, attending to the sequence's
paged history). ``AttentionMetadata`` describes that batch; a backend stores the step's K/V into the
paged cache and computes attention for all queries. The Triton kernels (``batchllm.kernels``) implement
the same interface; ``TorchAttention`` stays as the reference they are tested against.

KV cache layout, one tensor per layer::

    kv_cache[layer] : (2, num_pages, page_size, num_kv_heads, head_dim)    # [0] = K, [1] = V
    slot s          = page * page_size + offset            (slot_mapping holds one per new token)
    block_tables[i] = the pages of sequence i, in order; entries past its length are padding (0)

A sequence's tokens ``[0, seq_len)`` live at ``block_tables[i][t // page_size]``, offset
``t % page_size``. Pages may be shared between sequences (a prefix group's prefix); sharing is visible
only through the page tables, so a backend needs no extra information to be correct.
``prefix_groups`` lets a backend that can exploit sharing (prefix-shared attention) read a shared prefix
once for all members; the torch backend ignores it.
"""

from __future__ import annotations

import abc
import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class PrefixGroupDescriptor:
    """Consecutive sequences ``seq_start:seq_end`` of the step have identical K/V at positions
    ``[0, prefix_len)`` and each has seq_len >= prefix_len. A backend may read the prefix through
    ``block_tables[seq_start]`` alone; ``prefix_len`` counts tokens and may end inside a page (each
    member's private copy of the partial last prefix page holds the same prefix tokens)."""

    seq_start: int
    seq_end: int
    prefix_len: int


@dataclasses.dataclass
class AttentionMetadata:
    """One step's attention inputs. Device tensors plus the few host-side sizes backends branch on.

    Sequences are ordered decodes first: ``query_lens[i] == 1`` for ``i < num_decodes``.
    """

    query_start_loc: torch.Tensor  # (S+1,) int32: query tokens of seq i are [qsl[i], qsl[i+1])
    seq_lens: torch.Tensor  # (S,) int32: KV length of seq i after this step (history + new tokens)
    block_tables: torch.Tensor  # (S, max_pages) int32
    slot_mapping: torch.Tensor  # (T,) int64: cache slot of each new token; -1 = padding, not stored
    num_decodes: int
    query_lens_host: list[int]
    seq_lens_host: list[int]
    prefix_groups: list[PrefixGroupDescriptor] | None = None
    has_padding: bool = False  # some slot_mapping entries are -1 (padded rows); known on the host: no sync


    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)


class AttentionBackend(abc.ABC):
    """Stores new K/V into the paged cache and computes attention for one layer of one step."""

    name: str = "abstract"

    @abc.abstractmethod
    def store_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> None:
        """Write ``k``, ``v`` of shape (T, num_kv_heads, head_dim) into ``kv_cache`` at ``meta.slot_mapping``."""

    @abc.abstractmethod
    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Attention of ``q`` (T, num_heads, head_dim) over each sequence's cached K/V; returns (T, num_heads, head_dim).

        Must be called after ``store_kv`` for the same step (a query attends to its own token).
        """


class TorchAttention(AttentionBackend):
    """Reference backend in plain torch; runs on CPU and GPU.

    Decodes are batched: their pages are gathered into a padded (S, L, kv_heads, d) tensor and masked
    by length. Each prefill chunk runs as one SDPA call over its gathered history. Clear rather than
    fast: it materialises every sequence's KV, which the Triton backend avoids.
    """

    name = "torch"

    def store_kv(self, k, v, kv_cache, meta):
        num_pages, page_size = kv_cache.shape[1], kv_cache.shape[2]
        slots = meta.slot_mapping
        flat = kv_cache.view(2, num_pages * page_size, kv_cache.shape[3], kv_cache.shape[4])
        if meta.has_padding:  # padded rows (CUDA-graph buckets) are skipped
            keep = slots >= 0
            slots, k, v = slots[keep], k[keep], v[keep]
        flat[0].index_copy_(0, slots, k)
        flat[1].index_copy_(0, slots, v)

    def forward(self, q, kv_cache, meta, scale):
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            # decodes of a prefix group read the shared prefix once for all members (Hydragen split);
            # the others are batched plainly. Both are exact; the split only changes float rounding.
            # Contiguous runs are sliced, never indexed: no index tensor crosses to the device (a sync).
            start = 0
            for g in sorted((g for g in meta.prefix_groups or () if g.seq_end <= nd and g.seq_end - g.seq_start >= 2), key=lambda g: g.seq_start):
                if g.seq_start > start:
                    out[start : g.seq_start] = self._decode(q[start : g.seq_start], kv_cache, meta, start, g.seq_start, scale)
                out[g.seq_start : g.seq_end] = self._decode_group(q[g.seq_start : g.seq_end], kv_cache, meta, g, scale)
                start = g.seq_end
            if start < nd:
                out[start:nd] = self._decode(q[start:nd], kv_cache, meta, start, nd, scale)
        # prefill chunks: a run of group members shares one pass over the prefix; others go one by one
        starts = [nd]
        for i in range(nd, meta.num_seqs):
            starts.append(starts[-1] + meta.query_lens_host[i])
        grouped = {g.seq_start: g for g in meta.prefix_groups or () if g.seq_start >= nd and g.seq_end - g.seq_start >= 2}
        i = nd
        while i < meta.num_seqs:
            g = grouped.get(i)
            if g is not None:
                r0, r1 = starts[g.seq_start - nd], starts[g.seq_end - nd]
                out[r0:r1] = self._prefill_group(q[r0:r1], kv_cache, meta, g, scale)
                i = g.seq_end
                continue
            r0, r1 = starts[i - nd], starts[i - nd + 1]
            out[r0:r1] = self._prefill(q[r0:r1], kv_cache, meta.block_tables[i], meta.seq_lens_host[i], scale)
            i += 1
        return out

    @staticmethod
    def _gather(kv_cache: torch.Tensor, pages: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one or more sequences: pages (..., n) -> (..., n*page_size, kv_heads, d), cut to length."""
        page_size = kv_cache.shape[2]
        n = (length + page_size - 1) // page_size
        pages = pages[..., :n].long()
        k = kv_cache[0][pages].flatten(-4, -3)[..., :length, :, :]
        v = kv_cache[1][pages].flatten(-4, -3)[..., :length, :, :]
        return k, v

    def _decode(self, q, kv_cache, meta, first: int, end: int, scale):
        """Decode queries of sequences ``first:end``, batched with a length mask."""
        max_len = max(meta.seq_lens_host[first:end])
        k, v = self._gather(kv_cache, meta.block_tables[first:end], max_len)  # (n, L, kvh, d)
        valid = torch.arange(max_len, device=q.device)[None, :] < meta.seq_lens[first:end].to(torch.long)[:, None]
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # (n, h, 1, d)
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=valid[:, None, None, :],
            scale=scale,
            enable_gqa=True,
        )
        return o.squeeze(2)

    def _prefix_part(self, q, kv_cache, meta, g: PrefixGroupDescriptor, scale):
        """All query rows of a group against the shared prefix, read once: (kvh, rows*g, d) x (kvh, d, P).

        Every query sits at a position >= prefix_len, so no mask is needed. Returns fp32 output
        (rows, kvh, g, d) and log-sum-exp (rows, kvh, g)."""
        rows, h, d = q.shape
        kvh = kv_cache.shape[3]
        kp, vp = self._gather(kv_cache, meta.block_tables[g.seq_start], g.prefix_len)
        qs = q.float().view(rows, kvh, h // kvh, d).permute(1, 0, 2, 3).reshape(kvh, -1, d)
        sp = torch.bmm(qs, kp.float().permute(1, 2, 0)) * scale
        lse = torch.logsumexp(sp, dim=-1)
        o = torch.bmm(torch.softmax(sp, dim=-1), vp.float().transpose(0, 1))
        return o.view(kvh, rows, h // kvh, d).permute(1, 0, 2, 3), lse.view(kvh, rows, h // kvh).permute(1, 0, 2)

    @staticmethod
    def _merge(o_a, lse_a, o_b, lse_b):
        """Exact combination of two partial attentions over disjoint key sets."""
        top = torch.maximum(lse_a, lse_b)
        wa, wb = torch.exp(lse_a - top).unsqueeze(-1), torch.exp(lse_b - top).unsqueeze(-1)
        return (o_a * wa + o_b * wb) / (wa + wb)

    def _prefill_group(self, q, kv_cache, meta, g: PrefixGroupDescriptor, scale):
        """Prefill chunks of consecutive group members: the prefix part for all their rows at once, then
        each member's own tokens (causal), merged exactly."""
        rows, h, d = q.shape
        kvh, ps = kv_cache.shape[3], kv_cache.shape[2]
        P = g.prefix_len
        op, lse_p = self._prefix_part(q, kv_cache, meta, g, scale)
        out = torch.empty_like(q)
        first_page, offset = P // ps, P % ps
        r = 0
        for i in range(g.seq_start, g.seq_end):
            qlen, seq_len = meta.query_lens_host[i], meta.seq_lens_host[i]
            own = seq_len - P
            ko, vo = self._gather(kv_cache, meta.block_tables[i, first_page:], offset + own)
            ko, vo = ko[offset:].float(), vo[offset:].float()  # (own, kvh, d)
            qi = q[r : r + qlen].float().view(qlen, kvh, h // kvh, d)
            so = torch.einsum("qkgd,lkd->qkgl", qi, ko) * scale
            # query row t sits at position seq_len - qlen + t; own key j at position P + j
            qpos = torch.arange(qlen, device=q.device) + (seq_len - qlen - P)
            so.masked_fill_((torch.arange(own, device=q.device)[None, :] > qpos[:, None])[:, None, None, :], float("-inf"))
            lse_o = torch.logsumexp(so, dim=-1)
            oo = torch.einsum("qkgl,lkd->qkgd", torch.softmax(so, dim=-1), vo)
            merged = self._merge(op[r : r + qlen], lse_p[r : r + qlen], oo, lse_o)
            out[r : r + qlen] = merged.reshape(qlen, h, d).to(q.dtype)
            r += qlen
        return out

    def _decode_group(self, q, kv_cache, meta, g: PrefixGroupDescriptor, scale):
        """Decodes of one prefix group: all members' queries against the prefix (one matrix product,
        the prefix read once), each member against its own tokens, then the exact log-sum-exp merge."""
        m, h, d = q.shape
        kvh, ps = kv_cache.shape[3], kv_cache.shape[2]
        P = g.prefix_len
        qf = q.float().view(m, kvh, h // kvh, d)
        op, lse_p = self._prefix_part(q, kv_cache, meta, g, scale)
        # own tokens: positions [P, seq_len) of each member, from the page holding position P on
        lens = meta.seq_lens[g.seq_start : g.seq_end].to(torch.long) - P
        max_own = max(meta.seq_lens_host[g.seq_start : g.seq_end]) - P
        first_page, offset = P // ps, P % ps
        ko, vo = self._gather(kv_cache, meta.block_tables[g.seq_start : g.seq_end, first_page:], offset + max_own)
        ko, vo = ko[:, offset:].float(), vo[:, offset:].float()  # (m, Lo, kvh, d)
        so = torch.einsum("mkgd,mlkd->mkgl", qf, ko) * scale
        invalid = torch.arange(max_own, device=q.device)[None, :] >= lens[:, None]
        so.masked_fill_(invalid[:, None, None, :], float("-inf"))
        lse_o = torch.logsumexp(so, dim=-1)
        oo = torch.einsum("mkgl,mlkd->mkgd", torch.softmax(so, dim=-1), vo)
        return self._merge(op, lse_p, oo, lse_o).reshape(m, h, d).to(q.dtype)

    def _prefill(self, q, kv_cache, pages, seq_len, scale):
        qlen = q.shape[0]
        k, v = self._gather(kv_cache, pages, seq_len)  # (seq_len, kvh, d)
        qt = q.transpose(0, 1).unsqueeze(0)  # (1, h, qlen, d)
        kt = k.transpose(0, 1).unsqueeze(0)
        vt = v.transpose(0, 1).unsqueeze(0)
        ctx = seq_len - qlen
        if ctx == 0:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
        else:
            # query row r sits at position ctx + r and may see keys 0..ctx+r
            rows = torch.arange(qlen, device=q.device)[:, None] + ctx
            mask = torch.arange(seq_len, device=q.device)[None, :] <= rows
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
        return o.squeeze(0).transpose(0, 1)


_BACKENDS: dict[str, type[AttentionBackend]] = {"torch": TorchAttention}


def register_backend(name: str, cls: type[AttentionBackend]) -> None:
    _BACKENDS[name] = cls


def get_backend(name: str) -> AttentionBackend:
    """The backend registered under ``name`` ('torch'; 'triton' once the kernels register it)."""
    if name == "triton" and name not in _BACKENDS:
        import batchllm.kernels.backend  # noqa: F401  (registers itself)
    try:
        return _BACKENDS[name]()
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(sorted(_BACKENDS))}") from None
