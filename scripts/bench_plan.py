"""Benchmark the planner (prefix tree + groups + order) on synthetic token workloads.

Two parts:
1. scale: a realistic job of N requests (default 100,000) of about 1,000 tokens: a common chat header,
   300 system prompts (200-2000 tokens, log-uniform; Zipf-like popularity), nested few-shot sub-prefixes
   under some of them, a common user-turn header, a distinct question of 50-300 tokens, and a few
   exact duplicates (n > 1 samples). Reports the time of each phase and the peak RSS
   (``resource.getrusage``; includes the prompts themselves, whose RSS is reported too).
2. the workloads of docs/benchmarks.md: planned vs. logical vs. unique prompt tokens.
3. ``--stream``: the realistic mix generated batch by batch (``--scale`` shrinks every length: 0.5, the
   default, gives about 590 tokens a prompt), planned end to end by one planner (``--planner pages``: each batch is
   hashed into ``PagePrompts`` and written to a token file, then dropped, so the prompts are never all
   in memory; the planner reads one page per group member back to make group prefixes token-exact,
   unless ``--page-prefixes``; ``tokens``: the token tree, which needs them all). Reports plan time, peak RSS (``getrusage``, so one planner per
   process) and its growth over the RSS before generating, per prompt token. Run big sizes under
   ``prlimit --as=12000000000`` so that they fail instead of pushing the machine into swap.

Usage: ``python scripts/bench_plan.py [--requests N] [--seed S] [--skip-scale] [--skip-workloads]``
or ``python scripts/bench_plan.py --stream --planner pages|tokens [--requests N] [--scale F]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

# a plain checkout (no pip install) imports batchllm from this repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchllm.plan.groups import batchllm_groups, order_groups  # noqa: E402
from batchllm.plan.pages import PagePrompts  # noqa: E402
from batchllm.plan.kv_estimate import estimate_peak_kv_tokens  # noqa: E402
from batchllm.plan.plan import build_plan  # noqa: E402
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


def realistic_batches(n: int, seed: int = 0, scale: float = 1.0, n_systems: int = 300, batch: int = 4096):
    """The scale workload (``realistic``'s mix, every length times ``scale``) generated ``batch`` prompts
    at a time: yields ``(prompts, expected_output)`` per batch. A duplicate (n > 1) copies the previous
    prompt of its batch."""
    rng = np.random.default_rng(seed)

    def tok(k):
        return rng.integers(0, VOCAB, k, dtype=np.int32)

    def length(a, b, k=None):
        return np.maximum(1, (rng.integers(a, b + 1, k) * scale).astype(np.int64))

    header, user_turn = tok(5), tok(4)
    sys_len = np.maximum(1, np.exp(rng.uniform(np.log(200), np.log(2000), n_systems)) * scale).astype(int)
    systems = [np.concatenate([header, tok(int(k))]) for k in sys_len]
    fewshot = [[tok(int(k)) for k in length(100, 400, int(rng.integers(2, 9)))] if rng.random() < 0.4 else []
               for _ in range(n_systems)]
    pop = 1.0 / np.arange(1, n_systems + 1) ** 0.8
    done = 0
    while done < n:
        b = min(batch, n - done)
        sys_of = rng.choice(n_systems, size=b, p=pop / pop.sum())
        use_shot = rng.random(b) < 0.5
        shot_pick = rng.integers(0, 8, b)
        q_len = length(50, 300, b)
        questions = np.split(tok(int(q_len.sum())), np.cumsum(q_len)[:-1])
        dup = rng.random(b) < 0.02
        prompts = []
        for i in range(b):
            if dup[i] and i:
                prompts.append(prompts[-1].copy())
                continue
            s = int(sys_of[i])
            parts = [systems[s]]
            if fewshot[s] and use_shot[i]:
                parts.append(fewshot[s][int(shot_pick[i]) % len(fewshot[s])])
            parts += [user_turn, questions[i]]
            prompts.append(np.concatenate(parts))
        yield prompts, rng.choice([64, 256, 1024], size=b, p=[0.5, 0.35, 0.15])
        done += b


class TokenFile:
    """Prompts spilled to a flat int32 file (what a job folder's token file would hold), read back a
    window at a time with ``pread``: no mapping, so reads add nothing to this process's RSS."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb")
        self._starts: list[np.ndarray] = []
        self._end = 0
        self.starts = np.zeros(0, dtype=np.int64)

    def add(self, prompts: list) -> None:
        lens = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=len(prompts))
        self._starts.append(self._end + np.concatenate([[0], np.cumsum(lens[:-1])]))
        self._end += int(lens.sum())
        self._f.write(np.concatenate(prompts).astype(np.int32, copy=False).tobytes())

    def close(self) -> None:
        self._f.close()
        self.starts = np.concatenate(self._starts)
        self._starts.clear()
        self._fd = os.open(self.path, os.O_RDONLY)

    def read(self, ids: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Tokens ``start:stop`` of each prompt in ``ids``, shape ``(len(ids), stop - start)``."""
        w = 4 * (stop - start)
        fd = self._fd
        raw = b"".join([os.pread(fd, w, at) for at in ((self.starts[ids] + start) * 4).tolist()])
        return np.frombuffer(raw, dtype=np.int32).reshape(len(ids), stop - start)


def bench_stream(n: int, seed: int, scale: float, planner: str, page_size: int, exact: bool, token_dir: Path) -> dict:
    """Generate and plan ``n`` requests with one planner; see the module docstring (part 3)."""
    rss0 = rss_mb()
    t0 = time.perf_counter()
    expected, held = [], []
    pages = PagePrompts(page_size) if planner == "pages" else None
    spill = TokenFile(token_dir / f"bench_plan_tokens.{os.getpid()}.i32") if pages is not None and exact else None
    tokens = 0
    t_hash = 0.0
    for prompts, out in realistic_batches(n, seed, scale):
        expected.append(out)
        tokens += sum(len(p) for p in prompts)
        if pages is not None:
            t = time.perf_counter()
            pages.add(prompts)
            t_hash += time.perf_counter() - t
            if spill is not None:
                spill.add(prompts)
        else:
            held.extend(prompts)
        del prompts
    t_gen = time.perf_counter() - t0 - t_hash
    exp = np.concatenate(expected)
    if spill is not None:
        spill.close()
    rss_input = rss_mb()
    t = time.perf_counter()
    try:
        plan = build_plan(pages if pages is not None else held, exp, page_size=page_size, planner=planner,
                          read_tokens=spill.read if spill is not None else None)
    finally:
        if spill is not None:
            spill.path.unlink()
    t_plan = time.perf_counter() - t
    peak = peak_rss_mb()
    return {
        "workload": f"realistic-stream n={n} seed={seed} scale={scale}",
        "planner": planner + (" (token-exact group prefixes)" if spill is not None else ""),
        "page_size": page_size,
        "requests": n,
        "prompt_tokens": tokens,
        "mean_prompt_len": round(tokens / n, 1),
        "generate_s": round(t_gen, 1),
        "hash_s": round(t_hash, 1),
        "build_plan_s": round(t_plan, 1),
        "plan_s_total": round(t_plan + t_hash, 1),
        "rss_start_mb": round(rss0),
        "rss_before_plan_mb": round(rss_input),
        "peak_rss_mb": round(peak),
        "peak_bytes_per_token": round((peak - rss0) * 2**20 / tokens, 3),
        "page_symbols_mb": round(pages.nbytes() / 2**20) if pages is not None else None,
        "groups": len(plan.groups),
        "outer_prefixes": plan.nesting.num_outer,
        "logical": plan.logical_prompt_tokens,
        "planned": plan.planned_prompt_tokens,
        "saving": round(plan.saving(), 5),
        "max_saving": round(plan.max_saving(), 5),
    }


def bench_scale(n: int, seed: int) -> dict:
    t0 = time.perf_counter()
    prompts, expected = realistic(n, seed)
    t_gen = time.perf_counter() - t0
    rss_prompts = rss_mb()
    lens = np.array([len(p) for p in prompts])
    # The public entry point first, end to end, on a fresh process (the figure to report); on the token
    # tree, whose phases follow ("auto" would take the page tree past TOKEN_PLAN_MAX_TOKENS).
    t = time.perf_counter()
    plan = build_plan(prompts, expected, planner="tokens")
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
    ap.add_argument("--stream", action="store_true", help="part 3 only: generate streaming, plan with --planner")
    ap.add_argument("--planner", choices=("pages", "tokens"), default="pages")
    ap.add_argument("--scale", type=float, default=0.5, help="--stream: every length of the mix times this")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--page-prefixes", action="store_true",
                    help="--stream --planner pages: no token file; group prefixes end on a page boundary")
    ap.add_argument("--token-dir", type=Path, default=Path("/tmp"), help="--stream: where the token file goes")
    args = ap.parse_args()
    if args.stream:
        print(json.dumps(bench_stream(args.requests, args.seed, args.scale, args.planner, args.page_size,
                                      not args.page_prefixes, args.token_dir), indent=1))
        return
    if not args.skip_workloads:
        for row in bench_workloads():
            print(json.dumps(row))
    if not args.skip_scale:
        print(json.dumps(bench_scale(args.requests, args.seed), indent=1))


if __name__ == "__main__":
    main()
