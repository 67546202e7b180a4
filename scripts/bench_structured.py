"""Structured output, measured (issue 17): its cost in tokens/s, and the validity of what it produces.

(a) ``speed``: a job where every request has its own JSON schema against the same job unconstrained, both
    with ``ignore_eos`` and the same ``max_tokens`` (equal lengths: a constrained sequence whose grammar has
    ended goes on with forced EOS tokens, which the report counts apart). Runs alternate (plain,
    constrained, plain, ...) so a change of load hits both; the ratio is of output tokens/s over the job's
    wall time (reading, compiling each schema and the grammar's tokenizer view included).
(b) ``validity``: ``--schemas`` generated JSON schemas of varied shape (nested objects, arrays, enums,
    integers with bounds, numbers, booleans, nullable values, optional properties, bounded and patterned
    strings), one request each through ``response_format``; every output that finishes with "stop" must
    validate against its schema (``jsonschema``). Outputs cut by ``max_tokens`` ("length") are counted.

Usage::

    PYTHONPATH=. python scripts/bench_structured.py [--model dummy:tiny] [--requests 64] [--tokens 48] [--repeats 2]
                                       [--schemas 200] [--part speed|validity|both] [--json FILE]

The default model is batchllm's built-in SmolLM2-135M-Instruct GGUF (a realistic forward on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

import jsonschema

from batchllm.bench.schemas import random_json_schema
from batchllm.build import load_model
from batchllm.config import JobConfig
from batchllm.io.writer import read_results
from batchllm.pipeline import run_job


# the bench's schemas: the tests' generator with longer strings and readable property names
PROPERTY_NAMES = ["name", "id", "city", "score", "items", "color", "count", "note", "valid", "kind"]


def gen_schema(rng: random.Random) -> dict:
    return random_json_schema(rng, max_string_len=12, names=PROPERTY_NAMES)


def row(i: int, schema: dict | None, max_tokens: int, ignore_eos: bool, show_schema: bool) -> dict:
    """A chat request for one JSON object; ``show_schema``: the schema is in the prompt too (the speed part
    leaves it out, so that decoding, where the masks cost, dominates the job rather than prefill)."""
    ask = "Reply with one JSON object (request %d)" % i
    if show_schema:
        ask += " that follows this schema: " + json.dumps(schema)
    r = {"custom_id": f"r{i}", "temperature": 0.7, "max_tokens": max_tokens, "ignore_eos": ignore_eos,
         "messages": [{"role": "user", "content": ask + "."}]}
    if schema is not None:
        r["response_format"] = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
    return r


def run(lm, args, rows: list[dict], d: str, name: str) -> tuple[list[dict], object]:
    inp, out = os.path.join(d, name + ".jsonl"), os.path.join(d, name)
    with open(inp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    summary = run_job(JobConfig(inputs=[inp], output=out, model=args.model, device="cpu", dtype="float32", preview=0, seed=1), loaded=lm, overwrite=True)
    return read_results(out).to_pylist(), summary


def speed(lm, args, d: str) -> dict:
    schemas = [gen_schema(random.Random(1000 + i)) for i in range(args.requests)]
    plain_rows = [row(i, None, args.tokens, True, False) for i in range(args.requests)]
    con_rows = [row(i, s, args.tokens, True, False) for i, s in enumerate(schemas)]
    runs = {"plain": [], "structured": []}
    forced = None
    for rep in range(args.repeats):
        for kind, rows in (("plain", plain_rows), ("structured", con_rows)):
            results, summary = run(lm, args, rows, d, f"{kind}{rep}")
            assert all(r["error_code"] is None for r in results), [r["error_message"] for r in results if r["error_code"]]
            tps = summary.output_tokens / summary.wall_seconds
            runs[kind].append({"output_tokens": summary.output_tokens, "seconds": round(summary.wall_seconds, 2),
                               "tokens_per_s": round(tps, 1), "load_avg_1m": os.getloadavg()[0]})
            print(f"{kind:10s} run {rep}: {summary.output_tokens} tokens in {summary.wall_seconds:.2f} s = {tps:.1f} tok/s "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
            if kind == "structured" and forced is None:
                text_done = sum(1 for r in results if r["finish_reason"] == "length" and _parses(r["text"]))
                forced = {"outputs_complete_within_max_tokens": text_done, "outputs": len(results)}
    ratios = [c["tokens_per_s"] / p["tokens_per_s"] for p, c in zip(runs["plain"], runs["structured"])]
    best = max(c["tokens_per_s"] for c in runs["structured"]) / max(p["tokens_per_s"] for p in runs["plain"])
    return {"requests": args.requests, "max_tokens": args.tokens, "runs": runs, "ratio_per_pair": [round(r, 3) for r in ratios],
            "ratio_median": round(statistics.median(ratios), 3), "ratio_best_of_each": round(best, 3), "grammar_ended": forced}


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def validity(lm, args, d: str) -> dict:
    schemas = [gen_schema(random.Random(5000 + i)) for i in range(args.schemas)]
    rows = [row(i, s, args.validity_tokens, False, True) for i, s in enumerate(schemas)]
    t0 = time.perf_counter()
    results, summary = run(lm, args, rows, d, "validity")
    by_id = {f"r{i}": s for i, s in enumerate(schemas)}
    stop = length = valid = errors = 0
    failures = []
    for r in results:
        if r["error_code"] is not None:
            errors += 1
            failures.append((r["custom_id"], r["error_code"], r["error_message"]))
            continue
        if r["finish_reason"] == "length":
            length += 1
            continue
        stop += 1
        try:
            jsonschema.validate(json.loads(r["text"]), by_id[r["custom_id"]])
            valid += 1
        except (ValueError, jsonschema.ValidationError) as e:
            failures.append((r["custom_id"], type(e).__name__, str(e)[:200]))
    return {"schemas": len(schemas), "max_tokens": args.validity_tokens, "stop": stop, "length": length,
            "error_rows": errors, "stop_valid": valid, "stop_valid_share": round(valid / stop, 4) if stop else None,
            "seconds": round(time.perf_counter() - t0, 1), "output_tokens": summary.output_tokens,
            "failures": failures[:10]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model spec (default: the built-in SmolLM2-135M-Instruct GGUF)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=48, help="max_tokens of the speed part (ignore_eos: every output this long)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--schemas", type=int, default=200)
    ap.add_argument("--validity-tokens", type=int, default=384)
    ap.add_argument("--part", choices=("speed", "validity", "both"), default="both")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    lm = load_model(JobConfig(model=args.model, device="cpu", dtype="float32"))
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
              "model": lm.source.display_name, "python": sys.version.split()[0], "load_avg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as d:
        if args.part in ("speed", "both"):
            report["speed"] = speed(lm, args, d)
        if args.part in ("validity", "both"):
            report["validity"] = validity(lm, args, d)
    report["load_avg_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
