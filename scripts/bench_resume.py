"""How fast a big job resumes: a 1,000,000-row job whose manifest says 999,000 rows are done.

Builds the job folder directly (the fingerprint ``batchllm run`` would compute, 100 shards of 9,990
finished rows scattered over the input, as a prefix-sharing plan would leave them), then times
``batchllm resume DIR`` as a user would run it: from process start to the first engine step (the job's status file
switches to "generating"), and to the end. Rows are ``prompt_token_ids`` and the model is dummy:tiny,
so the figure measures batchllm's own resume path, not tokenization or the model.

    python scripts/bench_resume.py [--rows 1000000] [--remaining 1000] [--workdir /tmp/bench_resume]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# a plain checkout (no pip install) imports batchllm from this repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchllm.io.writer import STATUS  # noqa: E402
from batchllm.jobs.manifest import MANIFEST  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--remaining", type=int, default=1_000)
    ap.add_argument("--workdir", default="/tmp/bench_resume")
    args = ap.parse_args()

    from batchllm.config import JobConfig
    from batchllm.io.writer import ShardWriter
    from batchllm.models import loader
    from batchllm.pipeline import job_fingerprint

    os.makedirs(args.workdir, exist_ok=True)
    inp = os.path.join(args.workdir, "in.jsonl")
    out = os.path.join(args.workdir, "out")
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    if not os.path.exists(inp):
        toks = rng.integers(3, 49000, size=(args.rows, 8))
        with open(inp, "w") as f:
            for i in range(args.rows):
                f.write(f'{{"custom_id": "r{i}", "prompt_token_ids": [{", ".join(map(str, toks[i]))}], "max_tokens": 4}}\n')
    print(f"input: {args.rows:,} rows ({os.path.getsize(inp) / 1e6:.0f} MB), {time.perf_counter() - t:.1f} s")

    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    cfg = JobConfig(inputs=[inp], output=out, model="dummy:tiny", device="cpu", dtype="float32", max_tokens=4,
                    shard_rows=10_000, preview=0).with_absolute_paths()
    src = loader.resolve_model(cfg.model)
    fp = job_fingerprint(cfg, src, loader.load_tokenizer(src), __import__("torch").float32)
    done = np.sort(rng.choice(args.rows, args.rows - args.remaining, replace=False))
    order = rng.permutation(done)  # commit order of a planned job: scattered over the input
    writer = ShardWriter(out, 10_000, job_spec=cfg.to_dict(), fingerprint=fp, input_files=cfg.inputs)
    writer.manifest["read_complete"] = True
    for i in order.tolist():
        writer.add_request([{"custom_id": f"r{i}", "input_file": inp, "input_index": i, "sample_index": 0, "text": "x",
                             "finish_reason": "length", "prompt_tokens": 8, "completion_tokens": 4, "cached_tokens": 0,
                             "token_ids": [5, 6, 7, 8], "request_type": "completion"}])
    writer.close()
    size = os.path.getsize(os.path.join(out, MANIFEST))
    print(f"job folder: {len(done):,} rows done in {len(writer.manifest['shards'])} shards, manifest {size / 1e6:.1f} MB, "
          f"{time.perf_counter() - t:.1f} s")

    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "batchllm", "resume", out, "-q"], stderr=subprocess.PIPE, text=True)
    generating = None
    while p.poll() is None:
        try:
            with open(os.path.join(out, STATUS)) as f:
                st = json.load(f)
            if generating is None and st["batchllm"]["stage"] in ("generating", "completed"):
                generating = time.perf_counter() - t0
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    total = time.perf_counter() - t0
    err = p.stderr.read()
    if p.returncode != 0:
        sys.exit(f"resume failed ({p.returncode}):\n{err}")
    with open(os.path.join(out, MANIFEST)) as f:
        summary = json.load(f)["summary"]
    print(f"resume: first engine step after {generating:.1f} s (process start included); whole resume {total:.1f} s")
    print(f"planned and generated {summary['samples']:,} samples this run; requests in job {summary['requests']:,}, "
          f"done before {summary['done_before']:,}")


if __name__ == "__main__":
    main()
