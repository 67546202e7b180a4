"""Benchmark the planner (prefix tree + groups + order) on synthetic token workloads.

Two parts:
1. scale: a realistic job of N requests (default 100,000) of about 1,000 tokens: a common chat header,
   300 system prompts (200-2000 tokens, log-uniform; Zipf-like popularity), nested few-shot sub-prefixes
   under some of them, a common user-turn header, a distinct question of 50-300 tokens, and a few
   exact duplicates (n > 1 samples). Reports the time of each phase and the peak RSS
   (``resource.getrusage``; includes the prompts themselves, whose RSS is reported too).
2. the workloads of docs/benchmarks.md: planned vs. logical vs. unique prompt tokens.

Usage: ``python scripts/bench_plan.py [--requests N] [--seed S] [--skip-scale] [--skip-workloads]``
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

# a plain checkout (no pip install) imports batchllm from this repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchllm.plan.groups import batchllm_groups, order_groups  # noqa: E402
from batchllm.plan.plan import build_plan, estimate_peak_kv_tokens  # noqa: E402
from batchllm.plan.stats import plan_stats  # noqa: E402
from batchllm.plan.trie import PrefixTrie, _lcp_interval_tree, adjacent_lcp, concat_prompts, lexicographic_order  # noqa: E402

VOCAB = 128256


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def realistic(n: int, seed: int = 0, n_systems: int = 300):
    """The scale workload (see the module docstring); returns (prompts, expected_output)."""
    rng = np.random.default_rng(seed)

    def tok(k):
        return rng.integers(0, VOCAB, k, dtype=np.int32)

    header = tok(5)
    user_turn = tok(4)
    # Log-uniform lengths: many short system prompts, a few long ones (mean ~780 tokens).
    sys_len = np.exp(rng.uniform(np.log(200), np.log(2000), n_systems)).astype(int)
    systems = [np.concatenate([header, tok(int(k))]) for k in sys_len]
    # 40% of system prompts come with 2-8 few-shot blocks of 100-400 tokens; half their requests use one.
    fewshot = [
        [tok(int(rng.integers(100, 401))) for _ in range(int(rng.integers(2, 9)))] if rng.random() < 0.4 else []
        for _ in range(n_systems)
    ]
    pop = 1.0 / np.arange(1, n_systems + 1) ** 0.8
    sys_of = rng.choice(n_systems, size=n, p=pop / pop.sum())
    use_shot = rng.random(n) < 0.5
    shot_pick = rng.integers(0, 8, n)
    q_len = rng.integers(50, 301, n)
    prompts = []
    for i in range(n):
        s = int(sys_of[i])
        parts = [systems[s]]
        if fewshot[s] and use_shot[i]:
            parts.append(fewshot[s][int(shot_pick[i]) % len(fewshot[s])])
        parts += [user_turn, tok(int(q_len[i]))]
        prompts.append(np.concatenate(parts))
    dup = rng.random(n) < 0.02  # n > 1 sampling: a copy of the previous prompt
    for i in np.flatnonzero(dup[1:]) + 1:
        prompts[i] = prompts[i - 1].copy()
    expected = rng.choice([64, 256, 1024], size=n, p=[0.5, 0.35, 0.15])
    return prompts, expected


def bench_scale(n: int, seed: int) -> dict:
    t0 = time.perf_counter()
    prompts, expected = realistic(n, seed)
    t_gen = time.perf_counter() - t0
    rss_prompts = rss_mb()
    lens = np.array([len(p) for p in prompts])
    # The public entry point first, end to end, on a fresh process (the figure to report).
    t = time.perf_counter()
    plan = build_plan(prompts, expected)
    t_plan = time.perf_counter() - t
    # Then the phases one by one (warm allocator, so they may sum to less than the above).
    phases = {}
    t = time.perf_counter()
    tokens, offsets, lengths = concat_prompts(prompts)
    phases["concat"] = time.perf_counter() - t
    t = time.perf_counter()
    order = lexicographic_order(tokens, offsets, lengths)
    phases["sort"] = time.perf_counter() - t
    t = time.perf_counter()
    lcp = adjacent_lcp(tokens, offsets, lengths, order)
    phases["lcp"] = time.perf_counter() - t
    t = time.perf_counter()
    tree = _lcp_interval_tree(lcp, lengths[order])
    phases["tree"] = time.perf_counter() - t
    del tokens, offsets, lengths, order, lcp, tree
    t = time.perf_counter()
    trie = PrefixTrie.build(prompts)
    phases["trie_total"] = time.perf_counter() - t
    t = time.perf_counter()
    grouping = batchllm_groups(trie)
    phases["groups"] = time.perf_counter() - t
    t = time.perf_counter()
    order_groups(trie, grouping, expected)
    phases["order"] = time.perf_counter() - t
    del trie, grouping
    peak = peak_rss_mb()
    t = time.perf_counter()
    kv = estimate_peak_kv_tokens(plan, lens, expected, kv_budget=2_000_000)
    t_kv = time.perf_counter() - t
    st = plan_stats(plan, lens)
    return {
        "workload": f"realistic n={n} seed={seed}",
        "requests": n,
        "mean_prompt_len": float(lens.mean()),
        "generate_s": round(t_gen, 2),
        "rss_after_prompts_mb": round(rss_prompts),
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "build_plan_s": round(t_plan, 2),
        "peak_rss_mb": round(peak),
        "kv_estimate_s": round(t_kv, 2),
        "kv_estimate": kv._asdict(),
        "num_groups": st["num_groups"],
        "shared_groups": st["shared_groups"],
        "saving": round(st["saving"], 4),
        "max_saving": round(st["max_saving"], 4),
        "group_size": st["group_size"],
        "prefix_len": st["prefix_len"],
    }


def shared_prefix(groups=8, per=64, prefix=1024, distinct=64, out=128, seed=0):
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(groups):
        p = rng.integers(0, VOCAB, prefix, dtype=np.int32)
        prompts += [np.concatenate([p, rng.integers(0, VOCAB, distinct, dtype=np.int32)]) for _ in range(per)]
    return prompts, np.full(len(prompts), out)


def workloads():
    """The docs/benchmarks.md workloads (token ids only): name -> (prompts, expected_output)."""
    rng = np.random.default_rng(0)
    w = {"shared-prefix": shared_prefix()}
    for pre in (512, 2048, 8192):
        for deg in (4, 16, 64):
            for out in (32, 256):
                w[f"prefix-grid p={pre} d={deg} o={out}"] = shared_prefix(8, deg, pre, 128, out, seed=pre + deg)
    w["no-sharing"] = ([rng.integers(0, VOCAB, 512, dtype=np.int32) for _ in range(1024)], np.full(1024, 256))
    p, _ = shared_prefix(8, 64, 1024, 64, 0, seed=1)
    w["decode-heavy-mix"] = (p, np.repeat(np.tile([16, 1024], 4), 64))
    sys_p = rng.integers(0, VOCAB, 2048, dtype=np.int32)
    nested = []
    for _ in range(16):
        sub = rng.integers(0, VOCAB, 512, dtype=np.int32)
        nested += [np.concatenate([sys_p, sub, rng.integers(0, VOCAB, 64, dtype=np.int32)]) for _ in range(32)]
    w["nested"] = (nested, np.full(len(nested), 128))
    return w


def bench_workloads() -> list[dict]:
    rows = []
    for name, (prompts, out) in workloads().items():
        t = time.perf_counter()
        plan = build_plan(prompts, out)
        dt = time.perf_counter() - t
        rows.append(
            {
                "workload": name,
                "requests": len(prompts),
                "groups": len(plan.groups),
                "logical": plan.logical_prompt_tokens,
                "planned": plan.planned_prompt_tokens,
                "unique": plan.unique_prompt_tokens,
                "saving": round(plan.saving(), 4),
                "max_saving": round(plan.max_saving(), 4),
                "plan_s": round(dt, 3),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--skip-workloads", action="store_true")
    args = ap.parse_args()
    if not args.skip_workloads:
        for row in bench_workloads():
            print(json.dumps(row))
    if not args.skip_scale:
        print(json.dumps(bench_scale(args.requests, args.seed), indent=1))


if __name__ == "__main__":
    main()
