"""Compare --policy batchllm and --policy fcfs-lru on a shuffled shared-prefix workload, one process.

The issue-4 CPU check: SmolLM2-135M fp32, 4 groups x 16 requests, 256-token prefix, 32-token suffix,
16 output tokens (EOS ignored), requests shuffled. Both policies run on the same loaded model and the
identical request file; the script prints wall times, the ratio, and greedy agreement.

    python scripts/cpu_policy_compare.py [--kv-cache-tokens N] [--groups 4 --per-group 16 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import pyarrow.parquet as pq

from batchllm.config import JobConfig
from batchllm.pipeline import load_model, run_job


def write_workload(path, groups, per_group, prefix_len, suffix_len, output_len, vocab, seed):
    r = random.Random(seed)
    rows = []
    for g in range(groups):
        prefix = [r.randrange(vocab) for _ in range(prefix_len)]
        for m in range(per_group):
            ids = prefix + [r.randrange(vocab) for _ in range(suffix_len)]
            rows.append({"custom_id": f"g{g}-m{m}", "prompt_token_ids": ids, "max_tokens": output_len, "ignore_eos": True})
    r.shuffle(rows)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--per-group", type=int, default=16)
    ap.add_argument("--prefix-len", type=int, default=256)
    ap.add_argument("--suffix-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--kv-cache-tokens", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    base = JobConfig(model=args.model, temperature=0.0, preview=0, kv_cache_tokens=args.kv_cache_tokens,
                     max_num_batched_tokens=args.max_num_batched_tokens, device="cpu", dtype="float32")
    t = time.perf_counter()
    lm = load_model(base)
    print(f"model load {time.perf_counter() - t:.1f} s")
    path = os.path.join(tmp, "work.jsonl")
    write_workload(path, args.groups, args.per_group, args.prefix_len, args.suffix_len, args.output_len, lm.config.vocab_size, args.seed)
    results = {}
    for rep in range(args.repeat):
        for policy in ("fcfs-lru", "batchllm"):
            cfg = JobConfig(**{**base.to_dict(), "inputs": [path], "output": os.path.join(tmp, f"{policy}-{rep}"), "policy": policy})
            s = run_job(cfg, loaded=lm)
            texts = {r["custom_id"]: r["token_ids"] for r in pq.read_table(cfg.output).to_pylist()} if False else None
            results.setdefault(policy, []).append(s)
            print(f"{policy:9s} wall {s.wall_seconds:6.2f} s  steps {s.num_steps:4d}  cached {s.cached_tokens:6d}  "
                  f"seqs/step {s.batch_seqs}  preemptions {s.num_preemptions}  {s.output_tok_s:.1f} out tok/s")
    best = {p: min(x.wall_seconds for x in v) for p, v in results.items()}
    print(f"speed-up batchllm / fcfs-lru: {best['fcfs-lru'] / best['batchllm']:.2f}x")
    from batchllm.io.writer import read_results

    outs = {}
    for policy in ("fcfs-lru", "batchllm"):
        tbl = read_results(os.path.join(tmp, f"{policy}-0")).to_pylist()
        outs[policy] = {r["custom_id"]: r["token_ids"] for r in tbl}
    same = sum(outs["fcfs-lru"][k] == outs["batchllm"][k] for k in outs["batchllm"])
    print(f"greedy agreement: {same}/{len(outs['batchllm'])}")


if __name__ == "__main__":
    main()
