"""Benchmark READ + TOKENIZE (``pipeline.read_and_tokenize``) on SmolLM2's tokenizer: this checkout against
another one (``--base``, e.g. an untouched copy of main), on the same generated JSONL files.

Three files of ``--rows`` rows each are written to ``--data`` (kept and reused if present): raw ``prompt``
rows, chat ``messages`` rows (200 shared system prompts, as evaluation sweeps have) and
``prompt_token_ids`` rows. Each (checkout, file) pair runs in a fresh process (``PYTHONPATH`` set to the
checkout) and reports:
- ``read+tok s``: ``read_and_tokenize`` from the file to the list of requests, and its tokens/s;
- ``tok s``: ``io.tokenize.tokenize`` alone on the already-read requests, and its tokens/s;
- ``B/req``: RSS after ``read_and_tokenize`` minus RSS before, per request (the requests as held until
  planning: their prompts, token ids and fields).

``--first-step`` (or ``--only-first-step``) also times ``run_job`` on the prompt file (the default model on
the CPU) from its start to its first engine step, with the time of each progress event on the way.

The load average (``os.getloadavg``) is printed with every figure: the machine may be shared. Runs are
one at a time. Usage: ``python scripts/bench_tokenize.py [--rows N] [--data DIR] [--base /work/base]
[--first-step | --only-first-step]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("prompt", "chat", "ids")
WORDS = (
    "the model answer question data system user reason step first then result value because number "
    "list write short explain code function return error test case input output batch token prompt "
    "language summary example table city river history science music energy water light small large "
    "quickly carefully always never between during after before under over simple complex"
).split()


def make_data(folder: Path, rows: int, seed: int = 0) -> dict[str, Path]:
    """Write (or reuse) the three JSONL files; returns kind -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {k: folder / f"{k}-{rows}.jsonl" for k in KINDS}
    if all(p.exists() for p in paths.values()):
        return paths
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)

    def text(n: int) -> str:
        return " ".join(words[rng.integers(0, len(words), n)])

    systems = [f"You are assistant #{i}. " + text(int(rng.integers(20, 120))) for i in range(200)]
    with open(paths["prompt"], "w") as fp, open(paths["chat"], "w") as fc, open(paths["ids"], "w") as fi:
        for i in range(rows):
            question = f"Question {i}: " + text(int(rng.integers(40, 200)))
            system = systems[int(rng.zipf(1.3)) % len(systems)]
            fp.write(json.dumps({"custom_id": f"p{i}", "prompt": system + "\n\n" + question}) + "\n")
            chat = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            fc.write(json.dumps({"custom_id": f"c{i}", "messages": chat}) + "\n")
            ids = rng.integers(0, 49152, int(rng.integers(100, 400))).tolist()
            fi.write(json.dumps({"custom_id": f"t{i}", "prompt_token_ids": ids}) + "\n")
    return paths


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(path: str) -> dict:
    """One measurement in this process, with whatever ``batchllm`` PYTHONPATH gives."""
    import batchllm
    from batchllm import pipeline
    from batchllm.config import JobConfig
    from batchllm.models import loader

    src = loader.resolve_model("default")
    tok, mcfg = loader.load_tokenizer(src), loader.load_config(src)
    max_model_len = 8192
    cfg = JobConfig(inputs=[path])
    tok("warm up", add_special_tokens=True)
    gc.collect()
    before = rss_bytes()
    t0 = time.perf_counter()
    errors: list = []
    requests = pipeline.read_and_tokenize(cfg, tok, mcfg, max_model_len, errors.append)
    read_tok = time.perf_counter() - t0
    gc.collect()
    per_request = (rss_bytes() - before) / max(1, len(requests))
    tokens = int(sum(len(r.token_ids) for r in requests))
    kinds = {type(r.token_ids).__name__ for r in requests} | {type(r.prompt_token_ids).__name__ for r in requests}
    load_read_tok = os.getloadavg()[0]
    del requests
    gc.collect()
    # the same rows read again, untokenized: pipeline.tokenize (a module attribute in both layouts, the
    # function itself before issue 14 and io.tokenize's since) swapped for a collector while reading
    fresh: list = []
    tokenize = pipeline.tokenize
    pipeline.tokenize = lambda reqs, *a: (fresh.extend(reqs), ([], []))[1]
    try:
        pipeline.read_and_tokenize(cfg, tok, mcfg, max_model_len, lambda e: None)
    finally:
        pipeline.tokenize = tokenize
    t0 = time.perf_counter()
    ok, _ = tokenize(fresh, tok, max_model_len, mcfg.vocab_size)
    tok_s = time.perf_counter() - t0
    assert int(sum(len(r.token_ids) for r in ok)) == tokens
    return dict(
        batchllm=str(Path(batchllm.__file__).parents[1]), requests=len(ok), errors=len(errors), tokens=tokens,
        read_tok_s=read_tok, tok_s=tok_s, bytes_per_request=per_request, types=sorted(kinds),
        load_read_tok=load_read_tok, load_tok=os.getloadavg()[0],
    )


class _FirstStep(Exception):
    """Raised from the progress hook at the first engine step: the measurement ends there."""


def first_step_child(path: str, output: str) -> dict:
    """``run_job`` on ``path`` (the default model on the CPU) from its start to its first engine step:
    seconds at which each progress event first came."""
    import batchllm
    from batchllm.config import JobConfig
    from batchllm.pipeline import run_job

    seen: dict[str, float] = {}
    t0 = time.perf_counter()

    def progress(event: str, info: dict) -> None:
        seen.setdefault(event, time.perf_counter() - t0)
        if event == "step":
            raise _FirstStep

    try:
        run_job(JobConfig(inputs=[path], output=output, device="cpu", dtype="float32", max_tokens=1), progress)
    except _FirstStep:
        pass
    return dict(batchllm=str(Path(batchllm.__file__).parents[1]), events=seen, load=os.getloadavg()[0])


def first_step(paths: dict[str, Path], checkouts: list[tuple[str, str]], kind: str) -> None:
    print(f"\nbatchllm run (default model, CPU) on {paths[kind].name}: seconds from run_job's start to each first event")
    for name, root in checkouts:
        with tempfile.TemporaryDirectory() as out:
            env = dict(os.environ, PYTHONPATH=root)
            res = subprocess.run([sys.executable, __file__, "--first-step-child", str(paths[kind]), out + "/job"], env=env,
                                 check=True, capture_output=True, text=True).stdout
        r = json.loads(res.strip().splitlines()[-1])
        assert r["batchllm"] == root, f"{name} imported batchllm from {r['batchllm']}, not {root}"
        print(f"{name:<6} " + "  ".join(f"{e} {t:.1f}" for e, t in r["events"].items()) + f"  (load {r['load']:.1f})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--data", default="/tmp/bench_tokenize")
    ap.add_argument("--base", default="/work/base", help="the checkout to compare against ('' to skip)")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--first-step", action="store_true", help="also time batchllm run to its first engine step (prompt rows)")
    ap.add_argument("--only-first-step", action="store_true", help="the --first-step timing alone")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--first-step-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    if args.first_step_child:
        print(json.dumps(first_step_child(*args.first_step_child)))
        return
    paths = make_data(Path(args.data), args.rows)
    print(f"{os.cpu_count()} CPUs; {args.rows:,} rows per file in {args.data}")
    print(f"{'checkout':<12} {'rows':<7} {'tokens':>11} {'read+tok s':>10} {'tok/s':>10} {'tok s':>7} {'tok/s':>10} "
          f"{'B/req':>7}  load  ids held as")
    checkouts = [(name, root) for name, root in (("base", args.base), ("this", str(ROOT))) if root]
    for kind in args.kinds.split(",") if not args.only_first_step else ():
        for name, root in checkouts:
            env = dict(os.environ, PYTHONPATH=root)
            out = subprocess.run([sys.executable, __file__, "--child", str(paths[kind])], env=env, check=True,
                                 capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            assert r["batchllm"] == root, f"{name} imported batchllm from {r['batchllm']}, not {root}"
            print(f"{name:<12} {kind:<7} {r['tokens']:>11,} {r['read_tok_s']:>10.2f} {r['tokens'] / r['read_tok_s']:>10,.0f} "
                  f"{r['tok_s']:>7.2f} {r['tokens'] / r['tok_s']:>10,.0f} {r['bytes_per_request']:>7,.0f}  "
                  f"{r['load_read_tok']:.1f}/{r['load_tok']:.1f}  {','.join(r['types'])}", flush=True)
    if args.first_step or args.only_first_step:
        first_step(paths, checkouts, "prompt")


if __name__ == "__main__":
    main()
