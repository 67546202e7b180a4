"""Prompt log-probabilities from the engine's prefill (``prompt_logprobs.PromptLogprobs``) against transformers'
logits on the same weights: chunked prefill, multi-level shared prefixes (each member's tokens scored from
its prefixes' rows, the prefix's last position from its kept distribution) and preemption-free release."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchllm.engine.attention import get_backend
from batchllm.engine.engine import LLMEngine
from batchllm.engine.kv_cache import KVCache
from batchllm.engine.prompt_logprobs import PromptLogprobs
from batchllm.engine.scheduler import SchedulerConfig
from batchllm.engine.sequence import Sequence, SharedPrefix
from batchllm.sampling_params import SamplingParams
from tests.engine_utils import FakeTokenizer, build, random_state_dict, tiny_config

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # fp32 both sides; paged attention and the fused CPU kernel reorder sums (seen: 1.5e-6)


def hf_reference(cfg, sd):
    hcfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings)
    ref = transformers.LlamaForCausalLM(hcfg).eval()
    ref.load_state_dict(sd, strict=True)
    return ref


def reference_logprobs(ref, prompt: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """log P(token j | tokens[:j]) and whether token j is the argmax, for j = 1 .. len - 1."""
    with torch.no_grad():
        lg = torch.log_softmax(ref(torch.tensor([prompt])).logits[0].float(), -1)
    nxt = torch.tensor(prompt[1:])
    return lg[:-1].gather(1, nxt[:, None])[:, 0].double().numpy(), (lg[:-1].argmax(1) == nxt).numpy()


@pytest.fixture(scope="module")
def weights():
    cfg = tiny_config()
    sd = random_state_dict(cfg)
    return cfg, build(cfg, sd), hf_reference(cfg, sd)


def make_engine(cfg, model, budget: int) -> LLMEngine:
    kv = KVCache(cfg, 256, 4, torch.float32, "cpu")
    sched = SchedulerConfig(page_size=4, max_num_batched_tokens=budget, max_num_seqs=None, max_model_len=512,
                            growth_reserve=1.0)
    return LLMEngine(model, FakeTokenizer(), kv, get_backend("torch"), sched, torch.device("cpu"), cfg.vocab_size)


@pytest.mark.parametrize("budget", [5, 64])
def test_prompt_logprobs_match_transformers_through_nested_prefixes(weights, budget):
    cfg, model, ref = weights
    rng = np.random.default_rng(budget)
    outer = rng.integers(0, 97, 8).tolist()
    inner = outer + rng.integers(0, 97, 5).tolist()
    prompts = [inner + rng.integers(0, 97, k).tolist() for k in (1, 3, 7)] + [outer + rng.integers(0, 97, 6).tolist()]
    params = SamplingParams(max_tokens=2, temperature=0)
    engine = make_engine(cfg, model, budget)
    engine.runner.prompt_logprobs = pl = PromptLogprobs(lambda s: 0)

    def source():
        o = SharedPrefix(100, np.array(outer, dtype=np.int32), unfinished=2)
        yield o
        g = SharedPrefix(101, np.array(inner, dtype=np.int32), unfinished=3, prefix=o)
        yield g
        for i in range(3):
            yield Sequence(i, i, 0, np.array(prompts[i], dtype=np.int32), params, 1, frozenset(), prefix=g)
        yield Sequence(3, 3, 0, np.array(prompts[3], dtype=np.int32), params, 1, frozenset(), prefix=o)

    got = {}

    def finished(s):
        got[s.request_index] = [pl.score(s, j, j + 1) for j in range(1, s.prompt_len)]
        whole = pl.score(s, 1)
        assert whole.logprob == pytest.approx(sum(t.logprob for t in got[s.request_index]), abs=1e-9)
        assert whole.is_greedy == all(t.is_greedy for t in got[s.request_index])
        pl.release(s)

    engine.run(source(), finished)
    assert len(pl) == 0  # every prefix's rows dropped with its last dependent
    for i, p in enumerate(prompts):
        want, argmax = reference_logprobs(ref, p)
        np.testing.assert_allclose([t.logprob for t in got[i]], want, atol=TOL, rtol=0)
        assert [t.is_greedy for t in got[i]] == argmax.tolist()


def test_first_position_limits_what_a_sequence_scores(weights):
    cfg, model, _ = weights
    engine = make_engine(cfg, model, 64)
    engine.runner.prompt_logprobs = pl = PromptLogprobs(lambda s: 4)
    prompt = np.arange(10, 20, dtype=np.int32)
    seqs = []
    engine.run(iter([Sequence(0, 0, 0, prompt, SamplingParams(max_tokens=1), 1, frozenset())]), seqs.append)
    assert pl.score(seqs[0], 5).logprob < 0  # positions 4.. were scored
    with pytest.raises(ValueError, match="position 3"):
        pl.score(seqs[0], 4)
    with pytest.raises(ValueError, match="cannot score"):
        pl.score(seqs[0], 0)


def test_entries_are_vllm_prompt_logprobs(weights):
    """Entry 0 None; entry j: token j's logprob, its rank and the top-k, through a shared prefix whose last
    position's distribution serves each member's own next token."""
    cfg, model, ref = weights
    rng = np.random.default_rng(7)
    head = rng.integers(0, 97, 8).tolist()
    prompts = [head + rng.integers(0, 97, 4).tolist(), head + rng.integers(0, 97, 6).tolist()]
    params = SamplingParams(max_tokens=1, temperature=0)
    engine = make_engine(cfg, model, 6)
    engine.runner.prompt_logprobs = pl = PromptLogprobs(lambda s: 0, top_k=3)

    def source():
        g = SharedPrefix(10, np.array(head, dtype=np.int32), unfinished=2)
        yield g
        for i, p in enumerate(prompts):
            yield Sequence(i, i, 0, np.array(p, dtype=np.int32), params, 1, frozenset(), prefix=g)

    got = {}
    engine.run(source(), lambda s: got.setdefault(s.request_index, pl.entries(s, 2)))
    for i, p in enumerate(prompts):
        with torch.no_grad():
            lg = torch.log_softmax(ref(torch.tensor([p])).logits[0].float(), -1)
        e = got[i]
        assert e.logprobs[0] is None and e.ranks[0] is None and e.top[0] is None
        assert len(e.logprobs) == len(p)
        for j in range(1, len(p)):
            row = lg[j - 1]
            assert e.logprobs[j] == pytest.approx(float(row[p[j]]), abs=TOL)
            assert e.ranks[j] == int((row > row[p[j]]).sum()) + 1
            vals, ids = row.topk(2)
            assert [t for t, _ in e.top[j]] == ids.tolist()
            np.testing.assert_allclose([v for _, v in e.top[j]], vals.numpy(), atol=TOL)
