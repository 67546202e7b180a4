"""The scoring task (``batchllm.score``): lm-eval's loglikelihood / loglikelihood_rolling contract on the
job's plan and engine, against transformers on the same weights (dummy:tiny)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from batchllm.config import JobConfig
from batchllm.models import dummy, loader
from batchllm.score import Pair, encode_pair, rolling_windows, score_file, score_pairs

transformers = pytest.importorskip("transformers")

TOL = 1e-3  # summed over up to ~40 fp32 tokens; per-token differences seen ~1e-6


def job(**kw) -> JobConfig:
    return JobConfig(model="dummy:tiny", device="cpu", dtype="float32", kv_cache_tokens=8192, page_size=4,
                     max_num_batched_tokens=64, **kw)


@pytest.fixture(scope="module")
def reference(tiny):
    c = tiny.config
    hcfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings)
    ref = transformers.LlamaForCausalLM(hcfg).eval()
    src = loader.resolve_model("dummy:tiny")
    ref.load_state_dict(dict(dummy.iter_weights(c, src.seed, torch.float32, "cpu")), strict=False)
    ref.tie_weights()
    return ref


def ref_score(ref, pair: Pair) -> tuple[float, bool]:
    """lm-eval HFLM._loglikelihood_tokens for one pair: summed logprob and is_greedy."""
    ids = pair.context + pair.continuation
    with torch.no_grad():
        lg = torch.log_softmax(ref(torch.tensor([ids[:-1]])).logits[0].float(), -1)
    cont = torch.tensor(pair.continuation)
    rows = lg[len(pair.context) - 1 :]
    return float(rows.gather(1, cont[:, None]).sum()), bool((rows.argmax(1) == cont).all())


def test_encode_pair_splits_exactly_and_moves_trailing_spaces(tiny):
    tok = tiny.tokenizer
    p = encode_pair(tok, "Question: 2+2=  ", "4")
    assert p.context == list(tok("Question: 2+2=", add_special_tokens=False)["input_ids"])
    assert p.context + p.continuation == list(tok("Question: 2+2=  4", add_special_tokens=False)["input_ids"])
    assert encode_pair(tok, "", "abc").context == [tok.bos_token_id]


def test_rolling_windows_cover_every_token_once():
    toks = list(range(100, 123))
    for max_length in (4, 7, 23, 50):
        ws = rolling_windows(toks, 1, max_length)
        assert [t for w in ws for t in w.continuation] == toks
        assert ws[0].context == [1]
        for w in ws:
            assert len(w.context) + len(w.continuation) - 1 <= max_length
            full = [1] + toks
            end = full.index(w.continuation[-1])  # windows are contiguous slices of BOS + text
            assert full[end + 1 - len(w.context) - len(w.continuation) : end + 1] == w.context + w.continuation


def test_shared_contexts_scored_once_match_transformers(tiny, reference):
    rng = np.random.default_rng(0)
    shots = [rng.integers(3, 49152, 23).tolist() for _ in range(2)]
    pairs = []
    for shot in shots:
        for q in range(3):
            question = shot + rng.integers(3, 49152, 5 + q).tolist()
            options = [rng.integers(3, 49152, k).tolist() for k in (1, 2, 3)]
            options.append(options[2][:1] + rng.integers(3, 49152, 2).tolist())  # shares a first token with another
            pairs += [Pair(question, o) for o in options]
    run = score_pairs(tiny, job(), pairs)
    for p, r in zip(pairs, run.results):
        want, greedy = ref_score(reference, p)
        assert r.num_tokens == len(p.continuation)
        assert r.logprob == pytest.approx(want, abs=TOL)
        assert r.is_greedy == greedy
    assert run.prompt_tokens == sum(len(p.context) + len(p.continuation) for p in pairs)
    assert run.achieved_saving == pytest.approx(run.planned_saving)  # the plan is what ran
    assert run.achieved_saving > 0.6


def test_a_greedy_continuation_is_greedy(tiny, reference):
    ctx = [5, 77, 901, 3000, 12]
    with torch.no_grad():
        nxt = int(reference(torch.tensor([ctx])).logits[0, -1].argmax())
    run = score_pairs(tiny, job(), [Pair(ctx, [nxt]), Pair(ctx, [(nxt + 1) % 49152])])
    assert [r.is_greedy for r in run.results] == [True, False]


def test_score_file_rows(tiny, reference, tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"id": "q1", "context": "The capital of France is", "continuations": [" Paris", " Rome"]},
            {"context": "The capital of France is ", "continuation": "Paris"},
            {"text": "A whole text, scored token by token, in windows."},
            {"context": 3}]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out.jsonl"
    written, errors, _ = score_file(job(), str(src), str(out), lm=tiny, max_length=8)
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert (written, errors) == (5, 1)
    assert [(g["id"], g["continuation_index"], g["kind"]) for g in got[:4]] == [
        ("q1", 0, "loglikelihood"), ("q1", 1, "loglikelihood"), ("1", 0, "loglikelihood"), ("2", 0, "rolling")]
    assert "context" in got[4]["error"] and got[4]["input_index"] == 3
    tok = tiny.tokenizer
    for g, (ctx, cont) in zip(got[:3], [(rows[0]["context"], " Paris"), (rows[0]["context"], " Rome"),
                                         (rows[1]["context"], "Paris")]):
        want, greedy = ref_score(reference, encode_pair(tok, ctx, cont))
        assert g["logprob"] == pytest.approx(want, abs=TOL) and g["is_greedy"] == greedy
    assert got[0]["logprob"] == pytest.approx(got[2]["logprob"], abs=1e-5)  # the trailing space moved: same split
    text_ids = list(tok(rows[2]["text"], add_special_tokens=False)["input_ids"])
    want = sum(ref_score(reference, w)[0] for w in rolling_windows(text_ids, tok.bos_token_id, 8))
    assert got[3]["num_tokens"] == len(text_ids) and got[3]["logprob"] == pytest.approx(want, abs=TOL)


def test_score_command(tmp_path, capsys):
    from batchllm.cli import main

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"context": "The sky is", "continuations": [" blue", " green"]}) + "\n")
    out = tmp_path / "scores.parquet"
    main(["score", str(src), "-o", str(out), "-m", "dummy:tiny", "--device", "cpu", "--kv-cache-tokens", "4096"])
    import pyarrow.parquet as pq

    t = pq.read_table(out).to_pylist()
    assert [r["continuation_index"] for r in t] == [0, 1] and all(r["logprob"] < 0 for r in t)
    assert "2 rows (0 errors)" in capsys.readouterr().out


def test_a_job_file_runs_the_score_task(tmp_path, capsys):
    """``task = "score"`` in a job file (jobs/score.toml) runs what ``batchllm score`` runs, options included."""
    import pyarrow.parquet as pq

    from batchllm.cli import main
    from batchllm.config import load_job_file

    example = os.path.join(os.path.dirname(__file__), "..", "jobs", "score.toml")
    assert load_job_file(example)["task"] == "score"
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"context": "The sky is", "continuations": [" blue", " green"]}) + "\n"
                   + json.dumps({"text": "A whole text, scored in windows of eight tokens."}) + "\n")
    (tmp_path / "score.toml").write_text('task = "score"\nmodel = "dummy:tiny"\ndevice = "cpu"\n'
                                         'kv_cache_tokens = 4096\nmax_length = 8\n')
    via_job, via_score = tmp_path / "job.parquet", tmp_path / "score.parquet"
    main(["run", "--job", str(tmp_path / "score.toml"), str(src), "-o", str(via_job)])
    main(["score", str(src), "-o", str(via_score), "-m", "dummy:tiny", "--device", "cpu", "--kv-cache-tokens", "4096",
          "--max-length", "8"])
    assert "3 rows (0 errors)" in capsys.readouterr().out
    assert pq.read_table(via_job).to_pylist() == pq.read_table(via_score).to_pylist()


def test_score_task_options_are_checked():
    from batchllm.config import JobConfig
    from batchllm.errors import BatchLLMError

    with pytest.raises(BatchLLMError, match="one input file"):
        JobConfig(task="score", inputs=["a.jsonl", "b.jsonl"], output="o.jsonl").validate()
    with pytest.raises(BatchLLMError, match="task score"):
        JobConfig(inputs=["a.jsonl"], output="out", max_length=8).validate()
    with pytest.raises(BatchLLMError, match="task"):
        JobConfig(task="embed", inputs=["a.jsonl"], output="out").validate()
