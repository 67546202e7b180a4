"""``TritonAttention`` against ``TorchAttention``: one mixed step with a shared prefix, and whole engine runs.

``prefix_groups_for_step`` below is how the model runner can fill ``AttentionMetadata.prefix_groups``;
the engine test attaches it to every step to run the prefix-shared path end to end.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from batchllm.kernels.backend import TritonAttention

from batchllm.engine.attention import TorchAttention, get_backend
from batchllm.engine.attention_backend import AttentionMetadata, PrefixGroupDescriptor
from batchllm.engine.model_runner import ModelRunner, prefix_groups_for_step
from batchllm.engine.sequence import Sequence
from batchllm.sampling_params import SamplingParams
from tests import engine_utils
from tests.engine_utils import build, random_state_dict, run_engine, tiny_config
from tests.test_kernels_attention import make_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_backends_by_name():
    assert isinstance(get_backend("triton"), TritonAttention) and isinstance(get_backend("torch"), TorchAttention)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        get_backend("flash")


def _step_meta(ql, sl, groups, bt, page_size):
    pos = np.concatenate([np.arange(s - q, s) for q, s in zip(ql, sl)])
    seq = np.repeat(np.arange(len(ql)), ql)
    bt_host = bt.cpu().numpy()
    slots = bt_host[seq, pos // page_size].astype(np.int64) * page_size + pos % page_size
    return AttentionMetadata(
        query_start_loc=torch.tensor(np.concatenate([[0], np.cumsum(ql)]), dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(sl, dtype=torch.int32, device=DEVICE),
        block_tables=bt,
        slot_mapping=torch.from_numpy(slots).to(DEVICE),
        num_decodes=sum(1 for q in ql if q == 1),
        query_lens_host=list(ql),
        seq_lens_host=list(sl),
        prefix_groups=[PrefixGroupDescriptor(*g) for g in groups],
    )


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 1, 16), (4, 2, 64)])
def test_mixed_step_with_shared_prefix_matches_torch(heads, kv_heads, head_dim):
    # decodes: plain, 3 members of group A; prefill chunks: 2 members of group A, a plain first chunk
    ql = [1, 1, 1, 1, 3, 6, 7]
    sl = [9, 15, 12, 14, 13, 17, 7]
    groups = [(1, 4, 10), (4, 6, 10)]  # group A's decoding and prefilling members, 10-token prefix
    ps = 4
    q, kv, bt = make_step(ql, sl, [(1, 6, 10)], heads=heads, kv_heads=kv_heads, head_dim=head_dim, page_size=ps)
    g = torch.Generator().manual_seed(3)
    k_new = torch.randn(sum(ql), kv_heads, head_dim, generator=g).to(DEVICE)
    v_new = torch.randn(sum(ql), kv_heads, head_dim, generator=g).to(DEVICE)
    meta = _step_meta(ql, sl, groups, bt, ps)
    torch_be, triton_be = TorchAttention(), TritonAttention()
    kv_torch = kv.clone()
    torch_be.store_kv(k_new, v_new, kv_torch, meta)
    triton_be.store_kv(k_new, v_new, kv, meta)
    assert torch.equal(kv, kv_torch)
    expect = torch_be.forward(q, kv_torch, meta, 0.3)
    for _ in range(2):  # the second layer reuses the step's plan
        got = triton_be.forward(q, kv, meta, 0.3)
        torch.testing.assert_close(got, expect, atol=2e-5, rtol=2e-5)
    assert len(triton_be.plan(meta, heads, kv_heads, head_dim, q.device).launches) >= 1
    plain = AttentionMetadata(**{**meta.__dict__, "prefix_groups": None})
    torch.testing.assert_close(triton_be.forward(q, kv, plain, 0.3), expect, atol=2e-5, rtol=2e-5)


def test_prefix_groups_for_step_splits_runs():
    from batchllm.engine.sequence import SharedPrefix

    p1 = SharedPrefix(0, np.arange(10, dtype=np.int32), unfinished=3, num_computed=10)
    p2 = SharedPrefix(1, np.arange(5, dtype=np.int32), unfinished=1, num_computed=5)
    seqs = [Sequence(i, i, 0, np.arange(12, dtype=np.int32), SamplingParams(), 0, frozenset(), prefix=p)
            for i, p in enumerate([None, p1, p1, p2, p1, None])]
    got = [(g.seq_start, g.seq_end, g.prefix_len) for g in prefix_groups_for_step(seqs, num_decodes=2)]
    assert got == [(1, 2, 10), (2, 3, 10), (3, 4, 5), (4, 5, 10)]


@pytest.fixture
def triton_engine(monkeypatch):
    """run_engine with the Triton backend and prefix groups attached to every step's metadata."""
    monkeypatch.setattr(engine_utils, "get_backend", lambda name: TritonAttention(min_group_size=1))
    prepare = ModelRunner.prepare

    def prepare_with_groups(self, step):
        inp = prepare(self, step)
        inp.meta.prefix_groups = prefix_groups_for_step(step.items, step.num_decodes)
        return inp

    monkeypatch.setattr(ModelRunner, "prepare", prepare_with_groups)


@pytest.mark.skipif(torch.cuda.is_available(), reason="run_engine builds a CPU model; Triton runs CPU tensors only interpreted")
def test_engine_greedy_with_shared_prefix_matches_torch_backend(triton_engine):
    cfg = tiny_config(num_layers=1)
    model = build(cfg, random_state_dict(cfg, seed=5))
    r = random.Random(0)
    head = [r.randrange(cfg.vocab_size) for _ in range(10)]  # not page aligned: a partial prefix page
    prompts = [head + [r.randrange(cfg.vocab_size) for _ in range(r.randint(1, 5))] for _ in range(3)]
    prompts.append([r.randrange(cfg.vocab_size) for _ in range(6)])  # outside the group
    params = SamplingParams(max_tokens=5, temperature=0.0)
    expect, _ = _run_torch(model, cfg, prompts, params)
    got, engine = run_engine(model, cfg, prompts, params, prefix_lens=[10, 10, 10, 0], budget=16)
    for i in range(len(prompts)):
        assert got[i][0].output_ids == expect[i][0].output_ids
    assert engine.pool.num_free == engine.pool.num_pages


def _run_torch(model, cfg, prompts, params):
    """The same prompts through the torch backend without sharing (run_engine's own backend)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_utils, "get_backend", lambda name: TorchAttention())
        mp.setattr(ModelRunner, "prepare", _ORIGINAL_PREPARE)
        return run_engine(model, cfg, prompts, params, budget=16)


_ORIGINAL_PREPARE = ModelRunner.prepare
