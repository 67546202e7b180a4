"""``prompt_logprobs`` as a request field of a job (vLLM's semantics), end to end through ``run_job``:
the output column against transformers' log-softmax on the same dummy weights, through a planned shared
prefix and ``n > 1``; rows that do not ask get null; bad values and the fcfs-lru baseline give error rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from batchllm.config import JobConfig
from batchllm.io.writer import read_results
from batchllm.models import dummy
from batchllm.pipeline import run_job
from tests.test_prompt_logprobs import hf_reference

BASE = dict(model="dummy:tiny", device="cpu", dtype="float32", max_tokens=3, temperature=0.0, preview=0)
TOL = 1e-4  # float32 both sides; paged attention and the fused CPU kernel reorder sums


@pytest.fixture(scope="module")
def reference(tiny):
    cfg = tiny.config
    sd = {name: t for name, t in dummy.iter_weights(cfg, 0, torch.float32, "cpu")}
    sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])  # tied: transformers' state dict names both
    return hf_reference(cfg, sd)


def write_rows(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def ref_entries(ref, prompt: list[int], k: int):
    """Per prompt position j >= 1: (log P(token j | tokens < j), its rank, the top-k ids) from transformers."""
    with torch.no_grad():
        lg = torch.log_softmax(ref(torch.tensor([prompt])).logits[0].float(), -1)
    out = []
    for j in range(1, len(prompt)):
        row = lg[j - 1]
        lp = row[prompt[j]]
        out.append((float(lp), int((row > lp).sum()) + 1, row.topk(k).indices.tolist() if k else []))
    return out


def test_prompt_logprobs_column_matches_transformers_through_a_shared_prefix(tmp_path, tiny, reference):
    rng = np.random.default_rng(0)
    head = rng.integers(3, 40000, 40).tolist()  # a planned shared prefix (several pages)
    prompts = [head + rng.integers(3, 40000, k).tolist() for k in (5, 9, 2, 7)]
    rows = [
        {"custom_id": "a", "prompt_token_ids": prompts[0], "prompt_logprobs": 2},
        {"custom_id": "b", "prompt_token_ids": prompts[1], "prompt_logprobs": 0},
        {"custom_id": "c", "prompt_token_ids": prompts[2]},  # does not ask
        {"custom_id": "d", "prompt_token_ids": prompts[3], "prompt_logprobs": 5, "n": 2, "temperature": 0.8, "seed": 1},
        {"custom_id": "bad", "prompt_token_ids": prompts[0], "prompt_logprobs": 21},
    ]
    cfg = JobConfig(inputs=[write_rows(tmp_path / "in.jsonl", rows)], output=str(tmp_path / "out"),
                    max_num_batched_tokens=16, page_size=4, **BASE)  # chunked prefill across steps
    summary = run_job(cfg, loaded=tiny)
    assert summary.errors == 1 and summary.samples == 5
    assert summary.prompt_tokens_computed < summary.prompt_tokens  # the prefix was shared, not recomputed
    out = read_results(cfg.output).to_pylist()
    by_id = {}
    for r in out:
        by_id.setdefault(r["custom_id"], []).append(r)
    assert by_id["bad"][0]["error_code"] == "invalid_parameter" and "prompt_logprobs" in by_id["bad"][0]["error_message"]
    assert by_id["c"][0]["prompt_logprobs"] is None
    for cid, prompt, k in (("a", prompts[0], 2), ("b", prompts[1], 0), ("d", prompts[3], 5)):
        expected = ref_entries(reference, prompt, k)
        for row in by_id[cid]:  # every sample's row carries its request's prompt log-probabilities
            got = row["prompt_logprobs"]
            assert len(got) == len(prompt) and got[0] is None
            for j, (entry, (lp, rank, top)) in enumerate(zip(got[1:], expected), start=1):
                assert entry["token_id"] == prompt[j]
                assert abs(entry["logprob"] - lp) < TOL, (cid, j, entry["logprob"], lp)
                assert entry["rank"] == rank, (cid, j)
                assert [t["token_id"] for t in entry["top_logprobs"]] == top, (cid, j)
    assert len(by_id["d"]) == 2


def test_no_prompt_logprobs_leaves_the_fingerprint_and_column_alone(tmp_path, tiny):
    from batchllm.pipeline import job_fingerprint
    from batchllm.models import loader

    cfg = JobConfig(inputs=[write_rows(tmp_path / "in.jsonl", [{"custom_id": "x", "prompt_token_ids": [5, 6, 7]}])],
                    output=str(tmp_path / "out"), **BASE)
    fp = job_fingerprint(cfg, loader.resolve_model(cfg.model), tiny.tokenizer, torch.float32)
    assert "prompt_logprobs" not in json.dumps(fp)  # folders written before the field resume
    run_job(cfg, loaded=tiny)
    (row,) = read_results(cfg.output).to_pylist()
    assert row["prompt_logprobs"] is None and row["error_code"] is None


def test_the_fcfs_lru_baseline_refuses_prompt_logprobs_per_row(tmp_path, tiny):
    rows = [{"custom_id": "ask", "prompt_token_ids": [5, 6, 7, 8], "prompt_logprobs": 1},
            {"custom_id": "plain", "prompt_token_ids": [5, 6, 7, 9]}]
    cfg = JobConfig(inputs=[write_rows(tmp_path / "in.jsonl", rows)], output=str(tmp_path / "out"),
                    policy="fcfs-lru", **BASE)
    summary = run_job(cfg, loaded=tiny)
    assert summary.errors == 1 and summary.samples == 1
    got = {r["custom_id"]: r for r in read_results(cfg.output).to_pylist()}
    assert got["ask"]["error_code"] == "unsupported_parameter" and "--policy batchllm" in got["ask"]["error_message"]
    assert got["plain"]["error_code"] is None


def test_prompt_logprobs_validation():
    from batchllm.sampling_params import SamplingParams

    assert SamplingParams.from_fields({"prompt_logprobs": 3}).prompt_logprobs == 3
    assert SamplingParams.from_fields({"prompt_logprobs": None}).prompt_logprobs is None
    for bad in (-1, 21, True, "2"):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams.from_fields({"prompt_logprobs": bad})


def test_logprob_entries_carry_the_tokenizers_text(tmp_path, tiny):
    """Every log-probability entry (sampled token, alternatives, prompt tokens and their top) names its
    token as the tokenizer decodes it alone; a token that is part of a UTF-8 character carries its bytes."""
    tok = tiny.tokenizer
    prompt = tok("héllo wörld ✓ 日本語 text", add_special_tokens=False)["input_ids"]
    rows = [{"custom_id": "a", "prompt_token_ids": prompt, "logprobs": 2, "prompt_logprobs": 1},
            {"custom_id": "b", "prompt": "plain"}]
    cfg = JobConfig(inputs=[write_rows(tmp_path / "in.jsonl", rows)], output=str(tmp_path / "out"), **BASE)
    run_job(cfg, loaded=tiny)
    a, b = sorted(read_results(cfg.output).to_pylist(), key=lambda r: r["custom_id"])
    assert b["logprob_tokens"] is None and b["top_logprobs"] is None

    def check(token_id, entry):
        raw = bytes(entry["bytes"]) if entry["bytes"] is not None else entry["token"].encode("utf-8")
        decoded = tok.decode([token_id])
        if entry["bytes"] is None:
            assert entry["token"] == decoded
        else:  # part of a character: the tokenizer alone shows a replacement character
            assert "\ufffd" in decoded and entry["token"] == raw.decode("utf-8", "backslashreplace")
        return raw

    assert len(a["logprob_tokens"]) == len(a["logprobs"]) == len(a["token_ids"])
    for t, entry, alts in zip(a["token_ids"], a["logprob_tokens"], a["top_logprobs"]):
        check(t, entry)
        for alt in alts:
            check(alt["token_id"], alt)
    spelled = b"".join(check(e["token_id"], e) for e in a["prompt_logprobs"][1:])
    assert spelled.decode("utf-8") == tok.decode(prompt[1:])  # the pieces' bytes make the prompt's text
    assert any(e["bytes"] is not None for e in a["prompt_logprobs"][1:])  # the CJK characters span tokens
    for e in a["prompt_logprobs"][1:]:
        for alt in e["top_logprobs"]:
            check(alt["token_id"], alt)


def test_a_prompt_logprobs_job_resumes_with_the_same_column(tmp_path, tiny):
    """Interrupted after some requests committed, the job resumes (same fingerprint, prompt_logprobs in it)
    and every row's prompt_logprobs equals an uninterrupted run's."""
    from batchllm.jobs.signals import JobInterrupted
    from tests.job_utils import SigintAt

    shared = list(range(3, 40))  # a planned prefix: its rows are computed once, before and after the resume
    job = dict(BASE, max_tokens=6)
    rows = [{"custom_id": f"r{i}", "prompt_token_ids": shared + [50 + i, 60 + i], "max_tokens": 2 if i % 2 else 6,
             "prompt_logprobs": 2} for i in range(8)]
    inp = write_rows(tmp_path / "in.jsonl", rows)
    run_job(JobConfig(inputs=[inp], output=str(tmp_path / "ref"), **job), loaded=tiny)
    ref = {r["custom_id"]: r["prompt_logprobs"] for r in read_results(str(tmp_path / "ref")).to_pylist()}
    cfg = JobConfig(inputs=[inp], output=str(tmp_path / "out"), shard_rows=1, **job)
    with pytest.raises(JobInterrupted):
        run_job(cfg, progress=SigintAt("step", 3), loaded=tiny)
    partial = read_results(cfg.output).to_pylist()
    assert 0 < len(partial) < len(rows)
    s = run_job(cfg, loaded=tiny)
    assert s.done_before == len(partial) and s.errors == 0
    done = {r["custom_id"]: r["prompt_logprobs"] for r in read_results(cfg.output).to_pylist()}
    assert done.keys() == ref.keys()
    for cid, entries in done.items():  # other batches after the resume: equal within float32 reordering
        assert entries[0] is None and len(entries) == len(ref[cid]) == len(shared) + 2
        for got, want in zip(entries[1:], ref[cid][1:]):
            assert (got["token_id"], got["rank"]) == (want["token_id"], want["rank"])
            assert got["logprob"] == pytest.approx(want["logprob"], abs=TOL)
            assert [a["token_id"] for a in got["top_logprobs"]] == [a["token_id"] for a in want["top_logprobs"]]
