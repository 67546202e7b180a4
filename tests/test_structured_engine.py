"""Structured output wired into the engine (issue 17): constrained rows of the dummy:tiny model (SmolLM2's
vocabulary width, the byte-level tokenizer) decode under their grammars, greedy and sampled, n > 1, with
stop strings, max_tokens, min_tokens, ignore_eos and preemption, next to unconstrained rows whose outputs do
not change; and whole jobs through run_job: flat rows and OpenAI batch bodies, invalid specs as
invalid_structured_output rows while the job goes on, a job without llguidance, Ray replicas."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from tests.engine_utils import run_engine  # noqa: E402
from batchllm.bench.schemas import random_json_schema  # noqa: E402

from batchllm.config import JobConfig  # noqa: E402
from batchllm.io.writer import read_results  # noqa: E402
from batchllm.models.dummy import iter_weights, preset_config  # noqa: E402
from batchllm.models.dummy_tokenizer import build_tokenizer  # noqa: E402
from batchllm.models.llama import build_model  # noqa: E402
from batchllm.pipeline import run_job  # noqa: E402
from batchllm.sampling_params import SamplingParams, StructuredOutput  # noqa: E402

CFG = preset_config("tiny")
EOS = frozenset(CFG.eos_token_ids)
BASE = dict(model="dummy:tiny", device="cpu", dtype="float32", kv_cache_tokens=4096, preview=0)


@pytest.fixture(scope="module")
def model_tok():
    model = build_model(CFG, iter_weights(CFG, 0, torch.float32, "cpu"), torch.float32, "cpu")
    return model, build_tokenizer(CFG)


def prompts(tok, n: int) -> list[list[int]]:
    return [tok.encode(f"request {i}: answer in the format asked", add_special_tokens=False) for i in range(n)]


def run(model_tok, params, n_prompts=None, **kw):
    model, tok = model_tok
    plist = params if isinstance(params, list) else [params] * n_prompts
    done, engine = run_engine(model, CFG, prompts(tok, len(plist)), plist, tokenizer=tok, eos=EOS, **kw)
    return [done[i] for i in range(len(plist))], engine


def json_spec(schema: dict) -> StructuredOutput:
    return StructuredOutput("json", json.dumps(schema, separators=(",", ":")), any_whitespace=False)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_json_schemas_greedy_and_sampled_n2_validate_and_unconstrained_rows_unchanged(model_tok, temperature):
    rng = random.Random(7)
    schemas = [random_json_schema(rng) for _ in range(6)]
    constrained = [SamplingParams(max_tokens=200, temperature=temperature, n=2, structured=json_spec(s)) for s in schemas]
    free = SamplingParams(max_tokens=12, temperature=temperature)
    seqs, engine = run(model_tok, constrained + [free, free])
    stopped = 0
    for schema, samples in zip(schemas, seqs[:6]):
        assert len(samples) == 2
        for s in samples:
            assert s.matcher.num_tokens == len(s.output_ids)  # every sampled token went through the grammar
            if s.finish_reason == "stop":
                stopped += 1
                jsonschema.validate(json.loads(s.text), schema)
    assert stopped >= 4  # most end inside 200 tokens (a random model may write digits of a number on and on)
    assert engine._grammar.compiled == 6  # one compile per distinct schema, shared by the n samples
    # the same batch with nothing constrained: the unconstrained rows' outputs do not change
    plain, _ = run(model_tok, [dataclasses.replace(p, structured=None, max_tokens=8) for p in constrained] + [free, free])
    assert [s.output_ids for s in seqs[6] + seqs[7]] == [s.output_ids for s in plain[6] + plain[7]]


def test_regex_choice_grammar_stop_strings_max_tokens(model_tok):
    params = [
        SamplingParams(temperature=0.0, structured=StructuredOutput("regex", r"[a-c]{2,4}-\d{3}")),
        SamplingParams(temperature=0.7, n=3, structured=StructuredOutput("choice", '["yes","no","maybe not"]')),
        SamplingParams(temperature=0.0, structured=StructuredOutput("grammar", 'root ::= "hello" " " ("world" | "there")')),
        SamplingParams(temperature=0.0, stop=("ll",), structured=StructuredOutput("choice", '["hello world"]')),
        SamplingParams(temperature=0.0, max_tokens=4, structured=StructuredOutput("choice", '["a long answer"]')),
    ]
    regex, choice, grammar, stop, cut = run(model_tok, params)[0]
    assert regex[0].finish_reason == "stop" and re.fullmatch(r"[a-c]{2,4}-\d{3}", regex[0].text)
    assert all(s.finish_reason == "stop" and s.text in ("yes", "no", "maybe not") for s in choice)
    assert grammar[0].finish_reason == "stop" and grammar[0].text in ("hello world", "hello there")
    assert stop[0].finish_reason == "stop" and stop[0].text == "he"  # the stop string cuts the grammar's output
    assert cut[0].finish_reason == "length" and cut[0].text == "a lo"  # max_tokens: incomplete, as in vLLM


def test_min_tokens_ignore_eos_and_logprobs_under_a_grammar(model_tok):
    params = [
        # the grammar ends after "yes": its EOS is not banned by min_tokens (nothing else is allowed)
        SamplingParams(temperature=0.0, min_tokens=10, structured=StructuredOutput("choice", '["yes"]')),
        # ignore_eos: the forced EOS tokens run to max_tokens and stay out of the text
        SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=9, structured=StructuredOutput("choice", '["yes"]')),
        # min_tokens still bans EOS where the grammar could go on: "1" must become at least "1234"
        SamplingParams(temperature=0.0, min_tokens=4, structured=StructuredOutput("regex", r"1\d{0,6}")),
        SamplingParams(temperature=0.8, logprobs=3, structured=StructuredOutput("choice", '["ab","ac"]')),
    ]
    short, forced, banned, lp = run(model_tok, params)[0]
    assert short[0].finish_reason == "stop" and short[0].text == "yes" and len(short[0].output_ids) == 4
    assert forced[0].finish_reason == "length" and len(forced[0].output_ids) == 9 and forced[0].text == "yes"
    assert set(forced[0].output_ids[3:]) <= EOS
    assert banned[0].finish_reason in ("stop", "length") and len(banned[0].text) >= 4 and re.fullmatch(r"1\d*", banned[0].text)
    s = lp[0]
    assert s.text in ("ab", "ac")
    # log-probs see the mask (as vLLM v1): "a" is the only token allowed first, then "b" or "c"
    assert s.logprobs[0] == pytest.approx(0.0, abs=1e-5)
    second = [v for _, v in s.top_logprobs[1]]
    assert second[2] == float("-inf") and math.exp(second[0]) + math.exp(second[1]) == pytest.approx(1.0, abs=1e-5)


def test_preemption_keeps_matchers_consistent(model_tok):
    rng = random.Random(3)
    schemas = [random_json_schema(rng) for _ in range(8)]
    params = [SamplingParams(max_tokens=120, temperature=0.9, structured=json_spec(s)) for s in schemas]
    seqs, engine = run(model_tok, params, num_pages=40, growth_reserve=0.0)
    assert engine.scheduler.num_preemptions > 0
    for schema, (s,) in zip(schemas, seqs):
        assert s.matcher.num_tokens == len(s.output_ids)
        if s.finish_reason == "stop":
            jsonschema.validate(json.loads(s.text), schema)


# ---------------------------------------------------------------------------------------------- whole jobs

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0,
          "maximum": 120}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["name", "age"], "additionalProperties": False}


def job_rows() -> tuple[list[dict], list[dict]]:
    """(flat rows, OpenAI batch lines): a file of each."""
    body = {"model": "m", "messages": [{"role": "user", "content": "json please"}], "max_tokens": 150,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}}
    return [
        {"custom_id": "json", "prompt": "person", "max_tokens": 150, "guided_json": SCHEMA,
         "structured_outputs": None, "temperature": 0.0},
        {"custom_id": "rf", "prompt": "person", "max_tokens": 150, "temperature": 0.8, "n": 2,
         "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}},
        {"custom_id": "regex", "prompt": "code", "guided_regex": "[A-Z]{3}-[0-9]{2}"},
        {"custom_id": "choice", "prompt": "pick", "guided_choice": ["red", "green"], "temperature": 0.5},
        {"custom_id": "grammar", "prompt": "g", "guided_grammar": 'root ::= "x" ("y" | "z")'},
        {"custom_id": "so", "prompt": "s", "structured_outputs": {"regex": "ab?c", "disable_any_whitespace": True}},
        {"custom_id": "bad-regex", "prompt": "b", "guided_regex": "(unclosed"},
        {"custom_id": "bad-grammar", "prompt": "b", "guided_grammar": "root ::= missing_rule"},
        {"custom_id": "free", "prompt": "plain", "max_tokens": 5, "temperature": 0.0},
    ], [{"custom_id": "body", "method": "POST", "url": "/v1/chat/completions", "body": body}]


def check_job_rows(rows: list[dict]) -> None:
    by = {}
    for r in rows:
        by.setdefault(r["custom_id"], []).append(r)
    for cid in ("json", "rf", "body"):
        for r in by[cid]:
            assert r["error_code"] is None
            if r["finish_reason"] == "stop":
                jsonschema.validate(json.loads(r["text"]), SCHEMA)
    assert len(by["rf"]) == 2
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", by["regex"][0]["text"])
    assert by["choice"][0]["text"] in ("red", "green")
    assert by["grammar"][0]["text"] in ("xy", "xz")
    assert by["so"][0]["text"] in ("ac", "abc")
    for cid in ("bad-regex", "bad-grammar"):
        assert by[cid][0]["error_code"] == "invalid_structured_output" and by[cid][0]["error_message"]
    assert "unclosed" in by["bad-regex"][0]["error_message"]
    assert by["free"][0]["error_code"] is None and by["free"][0]["finish_reason"] == "length"


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def job_inputs(d) -> list[str]:
    flat, bodies = job_rows()
    return [write_rows(d / "flat.jsonl", flat), write_rows(d / "batch.jsonl", bodies)]


def test_job_flat_rows_bodies_and_invalid_specs(tmp_path, tiny):
    summary = run_job(JobConfig(inputs=job_inputs(tmp_path), output=str(tmp_path / "out"), **BASE), loaded=tiny)
    rows = read_results(str(tmp_path / "out"), verify=True).to_pylist()
    check_job_rows(rows)
    assert summary.errors == 2


def test_job_without_the_grammar_engine_runs_unconstrained_rows(tmp_path, tiny, monkeypatch):
    """Where llguidance cannot be imported, constrained rows are unsupported_parameter rows; the rest run."""
    from batchllm.engine.engine import LLMEngine

    def missing(self, eos):
        raise ImportError("No module named 'llguidance'")

    monkeypatch.setattr(LLMEngine, "grammar_compiler", missing)
    flat, _ = job_rows()
    inp = write_rows(tmp_path / "in.jsonl", flat[-1:] + flat[2:3])
    run_job(JobConfig(inputs=[inp], output=str(tmp_path / "out"), **BASE), loaded=tiny)
    rows = {r["custom_id"]: r for r in read_results(str(tmp_path / "out")).to_pylist()}
    assert rows["free"]["error_code"] is None
    assert rows["regex"]["error_code"] == "unsupported_parameter" and "llguidance" in rows["regex"]["error_message"]


def test_batchllm_imports_and_runs_without_llguidance(tmp_path):
    """The GPU image has no llguidance: batchllm imports and an unconstrained job runs (a fresh process in
    which importing llguidance fails)."""
    inp = write_rows(tmp_path / "in.jsonl", [{"custom_id": "a", "prompt": "hi", "max_tokens": 3}])
    code = (
        "import sys; sys.modules['llguidance'] = None\n"
        "import batchllm.cli, batchllm.pipeline, batchllm.execute, batchllm.engine.engine\n"
        "from batchllm.config import JobConfig\nfrom batchllm.pipeline import run_job\n"
        f"run_job(JobConfig(inputs=[{inp!r}], output={str(tmp_path / 'out')!r}, **{BASE!r}))\n"
        "assert 'batchllm.engine.structured' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)
    (row,) = read_results(str(tmp_path / "out")).to_pylist()
    assert row["error_code"] is None and row["finish_reason"] == "length"


def test_job_on_ray_replicas(tmp_path, ray_local):
    """Each replica builds its own grammar compiler (it does not pickle; the specs travel)."""
    run_job(JobConfig(inputs=job_inputs(tmp_path), output=str(tmp_path / "out"), replicas=2, **BASE))
    check_job_rows(read_results(str(tmp_path / "out"), verify=True).to_pylist())


def test_job_file_default_structured_output_and_rows_that_replace_it(tmp_path, tiny):
    """Job-file keys with the request fields' names set a default constraint; a row's own field replaces it
    (``response_format: {"type": "text"}`` clears it); a malformed default fails the job up front."""
    from batchllm.config import load_job_file, merge
    from batchllm.errors import BatchLLMError

    inp = write_rows(tmp_path / "in.jsonl", [{"custom_id": "default", "prompt": "p", "max_tokens": 80},
                                             {"custom_id": "regex", "prompt": "p", "guided_regex": "z{2,3}"},
                                             {"custom_id": "free", "prompt": "p", "max_tokens": 4,
                                              "response_format": {"type": "text"}}])
    job = tmp_path / "job.toml"
    job.write_text(f'inputs = ["{inp}"]\noutput = "{tmp_path / "out"}"\nkv_cache_tokens = 4096\n'
                   'guided_json = {type = "object", properties = {a = {type = "integer", minimum = 0, maximum = 9}}, '
                   'required = ["a"], additionalProperties = false}\n'
                   'structured_outputs = {disable_any_whitespace = true}\n')
    cfg = merge(load_job_file(str(job)), {"model": "dummy:tiny", "device": "cpu", "dtype": "float32"})
    assert cfg.sampling_defaults().structured == StructuredOutput(
        "json", '{"type":"object","properties":{"a":{"type":"integer","minimum":0,"maximum":9}},"required":["a"],'
        '"additionalProperties":false}', any_whitespace=False)
    run_job(cfg, loaded=tiny)
    rows = {r["custom_id"]: r for r in read_results(str(tmp_path / "out")).to_pylist()}
    assert rows["default"]["finish_reason"] == "stop" and re.fullmatch(r'\{"a":[0-9]\}', rows["default"]["text"])
    assert re.fullmatch("z{2,3}", rows["regex"]["text"])
    assert rows["free"]["finish_reason"] == "length" and rows["free"]["error_code"] is None
    bad = merge({"inputs": [inp], "output": str(tmp_path / "bad"), "guided_regex": "(", "guided_choice": ["a"]}, {})
    with pytest.raises(BatchLLMError, match="one structured output only, got guided_regex and guided_choice"):
        bad.validate()
