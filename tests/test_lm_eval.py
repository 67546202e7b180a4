"""The lm-eval adapter: ``lm_eval.simple_evaluate`` on a local multiple-choice task (a task file and a data
file written here, no hub access) gives the accuracy and per-sample log-likelihoods of a transformers
reference on the same weights (dummy:tiny)."""

from __future__ import annotations

import json

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from batchllm.score import encode_pair  # noqa: E402
from tests.test_score import TOL, ref_score, reference  # noqa: E402,F401  (the reference fixture)

TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_simple_evaluate_matches_transformers(tiny, reference, tmp_path):
    from lm_eval.tasks import TaskManager

    from batchllm.lm_eval_adapter import BatchLLMLM

    rng = np.random.default_rng(0)
    words = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "river"]
    docs = [{"question": "Context: " + " ".join(rng.choice(words, 12)) + ". Which word fits?",
             "choices": [" ".join(rng.choice(words, int(k))) for k in rng.integers(1, 4, 4)],
             "answer": int(rng.integers(0, 4))} for _ in range(8)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (tmp_path / "tiny_mc.yaml").write_text(TASK.format(data=data))
    model = BatchLLMLM(model="dummy:tiny", device="cpu", dtype="float32", kv_cache_tokens=8192, page_size=4,
                       loaded=tiny)
    out = lm_eval.simple_evaluate(model=model, tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
                                  log_samples=True, bootstrap_iters=0)
    tok = tiny.tokenizer
    correct = 0
    samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs)
    for s, d in zip(samples, docs):
        want = [ref_score(reference, encode_pair(tok, d["question"], " " + c))[0] for c in d["choices"]]
        got = [r[0][0] for r in s["resps"]]
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
        correct += int(np.argmax(want) == d["answer"])
    assert out["results"]["tiny_mc"]["acc,none"] == pytest.approx(correct / len(docs))


def test_rolling_and_generate(tiny, reference):
    from batchllm.lm_eval_adapter import BatchLLMLM
    from batchllm.score import rolling_windows

    class Req:
        def __init__(self, *args):
            self.args = args

    model = BatchLLMLM(model="dummy:tiny", device="cpu", dtype="float32", kv_cache_tokens=8192, page_size=4,
                       max_length=6, loaded=tiny)
    text = "rolling windows over a text"
    [got] = model.loglikelihood_rolling([Req(text)])
    ids = list(tiny.tokenizer(text, add_special_tokens=False)["input_ids"])
    want = sum(ref_score(reference, w)[0] for w in rolling_windows(ids, tiny.tokenizer.bos_token_id, 6))
    assert got == pytest.approx(want, abs=TOL)
    outs = model.generate_until([Req("abc", {"until": ["zz"], "max_gen_toks": 5})] * 2)
    assert len(outs) == 2 and outs[0] == outs[1]  # greedy: the same text for the same context
