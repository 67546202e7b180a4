"""Time from ``run_job`` to the first engine step, and peak RSS, on a large generated job (issue 16).

Generates (once, cached under --data) a JSONL of N rows: ``ids`` rows of ~600 prompt token ids (200
shared system prefixes of 400 tokens + 200 own tokens, the bench_plan mix scaled down) or ``text`` rows
(a shared instruction + a few hundred characters of their own). Each measurement runs in a fresh
process on dummy:tiny (CPU): it stops the job at its first engine step (SIGINT: the job commits and
exits as interrupted) and prints seconds to that step, the process's peak RSS and, at that step, its
anonymous and file-backed resident memory. ``--resume`` then
measures the same job resumed from the folder the first run left (everything read and planned again;
with the token store, nothing tokenized again).

    PYTHONPATH=. python scripts/bench_first_step.py --rows 200000 --kind ids --work /tmp/fs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time


def make_input(path: str, rows: int, kind: str) -> None:
    import numpy as np

    if os.path.exists(path):
        return
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(3, 49000, 400).tolist() for _ in range(200)]
    words = ["alpha", "beta", "gamma", "delta", "omega", "river", "stone", "light", "paper", "cloud"]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for i in range(rows):
            if kind == "ids":
                row = {"custom_id": f"r{i}", "prompt_token_ids": prefixes[i % 200] + rng.integers(3, 49000, 200).tolist()}
            else:
                own = " ".join(words[j] for j in rng.integers(0, 10, 60))
                row = {"custom_id": f"r{i}", "prompt": f"Instruction {i % 200}: summarise the following words. {own}"}
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def _memory() -> dict[str, int]:
    """MiB of this process's resident memory now, split as the kernel counts it: anonymous (the heap:
    what the job holds) and file-backed (mapped files such as the token store: clean pages the kernel
    may drop and read again)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile"):
                out[name.lower() + "_mb"] = int(value.split()[0]) // 1024
    return out


def measure(inp: str, out: str) -> None:
    """In this process: run the job until its first engine step; print one JSON line."""
    from batchllm.config import JobConfig
    from batchllm.jobs.signals import JobInterrupted
    from batchllm.pipeline import run_job

    t0 = time.perf_counter()
    marks: dict[str, float] = {}

    def progress(event: str, info: dict) -> None:
        marks.setdefault(event, time.perf_counter() - t0)
        if event == "step" and "memory" not in marks:
            marks["memory"] = _memory()
            os.kill(os.getpid(), signal.SIGINT)

    cfg = JobConfig(inputs=[inp], output=out, model="dummy:tiny", device="cpu", dtype="float32", max_tokens=1,
                    temperature=0.0, preview=0, kv_cache_tokens=1 << 16)
    try:
        run_job(cfg, progress=progress)
    except JobInterrupted:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    print(json.dumps({"first_step_s": marks.get("step"), "read_s": marks.get("read"), "planned_s": marks.get("planned"),
                      "peak_rss_mb": round(rss), **marks.get("memory", {})}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--kind", choices=("ids", "text"), default="ids")
    ap.add_argument("--work", default="/tmp/bench_first_step")
    ap.add_argument("--resume", action="store_true", help="also measure a resume of the interrupted job")
    ap.add_argument("--measure", nargs=2, metavar=("INPUT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        measure(*args.measure)
        return
    os.makedirs(args.work, exist_ok=True)
    inp = os.path.join(args.work, f"{args.kind}-{args.rows}.jsonl")
    make_input(inp, args.rows, args.kind)
    out = os.path.join(args.work, "job")
    shutil.rmtree(out, ignore_errors=True)
    runs = ["fresh", "resume"] if args.resume else ["fresh"]
    for what in runs:
        res = subprocess.run([sys.executable, __file__, "--measure", inp, out], capture_output=True, text=True)
        line = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr[-2000:]
        print(json.dumps({"run": what, "rows": args.rows, "kind": args.kind, **json.loads(line)}) if line.startswith("{") else line)


if __name__ == "__main__":
    main()
