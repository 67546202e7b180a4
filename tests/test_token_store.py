"""The job's token file (``io.token_store``): prompts spilled while reading and mapped back, checked
against the job's own ids; a resumed job takes its ids from it without tokenizing; a store of another
job or with a torn file is never used."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from batchllm.config import JobConfig
from batchllm.io import tokenize as tokenize_module
from batchllm.io.requests import Request
from batchllm.io.token_store import INDEX, TOKENS, TokenSpill, TokenStore, attach, detach
from batchllm.io.storage import storage_of
from batchllm.io.writer import read_results
from batchllm.jobs.manifest import read_manifest
from batchllm.jobs.signals import JobInterrupted
from batchllm.pipeline import run_job
from batchllm.sampling_params import SamplingParams
from tests.job_utils import SigintAt

BASE = dict(model="dummy:tiny", device="cpu", dtype="float32", max_tokens=4, temperature=0.8, preview=0)


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_spill_commit_and_lookup(tmp_path):
    spill = TokenSpill(str(tmp_path), "job-a")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 1000, n).astype(np.int32) for n in (5, 1, 9, 3)]
    off = spill.add(np.array([1, 0]), np.array([7, 2]), prompts[:2])
    assert off.tolist() == [0, 5]
    assert spill.add(np.array([0, 1]), np.array([0, 8]), prompts[2:]).tolist() == [6, 15]
    assert not os.path.exists(tmp_path / INDEX)  # nothing is a store before commit
    store = spill.commit()
    assert len(store) == 4 and os.path.getsize(tmp_path / TOKENS) == 4 * 18
    for (fid, idx), p in zip([(1, 7), (0, 2), (0, 0), (1, 8)], prompts):
        got = store.lookup(fid, idx)
        assert not got.flags.writeable and got.dtype == np.int32 and np.array_equal(got, p)
        assert isinstance(got.base.base, np.memmap)  # a view of the mapped file, not a copy
    assert store.lookup(0, 1) is None and store.lookup(2, 0) is None
    assert TokenStore.open(str(tmp_path), "job-b") is None  # another job's store
    with open(tmp_path / TOKENS, "r+b") as f:  # a torn token file
        f.truncate(4 * 17)
    assert TokenStore.open(str(tmp_path), "job-a") is None


def test_abandoned_spill_leaves_no_store(tmp_path):
    spill = TokenSpill(str(tmp_path), "job-a")
    spill.add(np.array([0]), np.array([0]), [np.arange(4, dtype=np.int32)])
    spill.abandon()
    assert os.listdir(tmp_path) == [] and TokenStore.open(str(tmp_path), "job-a") is None


def test_a_replica_reads_back_the_ids_the_driver_leaves_in_the_store(tmp_path):
    """What Ray's driver sends (``detach``) carries no ids when they are in the store; the replica's
    ``attach`` gives back the same ids (a token-id row's ``prompt_token_ids`` too). Ids not in a store
    travel with the request."""
    spill = TokenSpill(str(tmp_path), "job-a")
    spill.add(np.array([0, 1]), np.array([3, 0]), [np.arange(5, dtype=np.int32), np.arange(7, 10, dtype=np.int32)])
    store = spill.commit()
    sp = SamplingParams(max_tokens=2)
    text = Request("t", "a.jsonl", 3, sp, prompt="hi", token_ids=store.lookup(0, 3))
    ids = Request("i", "b.jsonl", 0, sp, prompt_token_ids=store.lookup(1, 0), token_ids=store.lookup(1, 0))
    memory = Request("m", "a.jsonl", 4, sp, prompt="yo", token_ids=np.arange(2, dtype=np.int32))
    assert detach(memory) is memory
    sent = [detach(text), detach(ids)]
    assert all(r.token_ids is None for r in sent) and sent[0].prompt_token_ids is None and sent[1].prompt_token_ids == []
    assert text.token_ids is not None  # the driver's own request keeps its view
    for r, fid in zip(sent, (0, 1)):
        attach(store, fid, r)
    assert sent[0].token_ids.tolist() == [0, 1, 2, 3, 4] and sent[0].prompt_token_ids is None
    assert sent[1].token_ids.tolist() == sent[1].prompt_token_ids.tolist() == [7, 8, 9]
    with pytest.raises(KeyError):
        attach(store, 0, detach(Request("x", "a.jsonl", 9, sp, prompt="no", token_ids=store.lookup(0, 3))))


def rows(k: int) -> list[dict]:
    out = []
    for i in range(k):
        if i % 3 == 0:
            out.append({"custom_id": f"t{i}", "prompt_token_ids": [1, 100 + i % 5, 200 + i, 300]})
        elif i % 3 == 1:
            out.append({"custom_id": f"p{i}", "prompt": f"Say something about the number {i}."})
        else:
            out.append({"custom_id": f"c{i}", "messages": [{"role": "user", "content": f"Count to {i}."}]})
    out.append({"custom_id": "bad", "prompt_token_ids": [1, 10**9]})  # an error row: not in the store
    return out


def test_a_job_spills_its_tokens_and_a_resume_does_not_tokenize(tmp_path, tiny, monkeypatch):
    inp = write_jsonl(tmp_path / "in.jsonl", rows(18))
    ref_cfg = JobConfig(inputs=[inp], output=str(tmp_path / "ref"), **BASE)
    run_job(ref_cfg, loaded=tiny)
    ref = {(r["custom_id"], r["sample_index"]): r for r in read_results(ref_cfg.output).to_pylist()}
    store = TokenStore.open(ref_cfg.output, read_manifest(storage_of(ref_cfg.output))["job_id"])
    assert store is not None and len(store) == 18  # every valid row; the bad one is an error row
    for key, r in ref.items():
        if r["error_code"] is None:
            fid_index = r["input_index"]
            assert len(store.lookup(0, fid_index)) == r["prompt_tokens"]

    out = tmp_path / "out"
    cfg = JobConfig(inputs=[inp], output=str(out), shard_rows=2, max_num_seqs=2, **BASE)
    with pytest.raises(JobInterrupted):
        run_job(cfg, progress=SigintAt("step", 3), loaded=tiny)
    assert os.path.exists(out / TOKENS) and os.path.exists(out / INDEX)
    calls = []
    real = tokenize_module.batch_encode

    def counting(tok, texts, add_special_tokens):
        calls.append(len(texts))
        return real(tok, texts, add_special_tokens)

    monkeypatch.setattr(tokenize_module, "batch_encode", counting)
    summary = run_job(cfg, loaded=tiny)
    assert summary.done_before > 0 and summary.samples > 0  # a real resume, with prompts left to run
    assert calls == []  # every remaining prompt came from the store
    got = {(r["custom_id"], r["sample_index"]): r for r in read_results(str(out), verify=True).to_pylist()}
    assert got.keys() == ref.keys()
    for key, r in ref.items():  # seeded sampling: the same text whichever run made it
        assert (got[key]["text"], got[key]["token_ids"], got[key]["error_code"]) == (r["text"], r["token_ids"], r["error_code"])


def test_object_store_folders_keep_tokens_in_memory(tmp_path, tiny):
    """A job folder given as a URI has no token file (nothing can be mapped there)."""
    inp = write_jsonl(tmp_path / "in.jsonl", rows(3))
    cfg = JobConfig(inputs=[inp], output=(tmp_path / "uri").as_uri(), **BASE)
    run_job(cfg, loaded=tiny)
    assert not os.path.exists(tmp_path / "uri" / TOKENS)
    assert len(read_results(cfg.output).to_pylist()) == 4
