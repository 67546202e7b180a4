"""What ``prompt_logprobs`` costs: the CPU shared-prefix workload (docs/benchmarks.md) run as a job on
SmolLM2-135M, without and with ``prompt_logprobs: K`` on every row, alternating, same loaded model.

    PYTHONPATH=. python scripts/bench_prompt_logprobs.py --repeat 2 --k 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--workload", default="shared-prefix")
    args = ap.parse_args()

    from batchllm.bench.workloads import make_workload, write_jsonl
    from batchllm.build import load_model
    from batchllm.config import JobConfig
    from batchllm.pipeline import run_job

    shape = dict(groups=4, per_group=16, prefix_len=256, suffix_len=32, output_len=16, seed=0)  # jobs/bench-cpu-shared-prefix.toml
    base = dict(model=None, device="cpu", dtype="float32", temperature=0.0, preview=0)
    lm = load_model(JobConfig(**base))
    rows = make_workload(args.workload, shape, lm.config.vocab_size).cells[0].rows
    work = tempfile.mkdtemp()
    plain, asking = os.path.join(work, "plain.jsonl"), os.path.join(work, "asking.jsonl")
    write_jsonl(rows, plain)
    write_jsonl([{**r, "prompt_logprobs": args.k} for r in rows], asking)
    results: dict[str, list[float]] = {"off": [], f"prompt_logprobs={args.k}": []}
    for _ in range(args.repeat):
        for label, inp in (("off", plain), (f"prompt_logprobs={args.k}", asking)):
            out = os.path.join(work, "out")
            shutil.rmtree(out, ignore_errors=True)
            s = run_job(JobConfig(inputs=[inp], output=out, **base), loaded=lm)
            assert s.errors == 0
            results[label].append(round(s.wall_seconds, 2))
    print(json.dumps({"workload": args.workload, "requests": len(rows),
                      "prompt_tokens": sum(len(r["prompt_token_ids"]) for r in rows), "wall_s": results}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
