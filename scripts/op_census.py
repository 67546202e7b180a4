"""Which torch ops a bench run executes, to tell a code change from machine noise.

On a shared VM a single bench run varies by 15-40%, so "is checkout B slower than A?" needs more than
wall times. This records every aten op of one ``batchllm bench`` policy run (name, input shapes, calls,
self CPU time) under torch's profiler; ``--compare`` then says whether two records executed the same
ops on the same shapes the same number of times. Identical censuses with different times mean the
machine, not the code, made the difference; a different census points at the ops that changed.

    cd checkout-A && PYTHONPATH=. python scripts/op_census.py record jobs/bench-cpu-nested.toml /tmp/a.json
    cd checkout-B && PYTHONPATH=. python scripts/op_census.py record jobs/bench-cpu-nested.toml /tmp/b.json
    python scripts/op_census.py compare /tmp/a.json /tmp/b.json
"""

from __future__ import annotations

import argparse
import json
import sys


def record(job: str, out: str) -> None:
    """Run ``batchllm bench --job job`` (policy batchllm, one repeat, no peers) under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    from batchllm.cli import app

    sys.argv = ["batchllm", "bench", "--job", job, "--peers", "", "--policies", "batchllm", "--repeat", "1"]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        try:
            app()
        except SystemExit as e:
            if e.code not in (0, None):
                raise
    rows = [[e.key, str(e.input_shapes), e.count, e.self_cpu_time_total / 1e6]
            for e in prof.key_averages(group_by_input_shape=True)]
    with open(out, "w") as f:
        json.dump(rows, f)


def compare(a: str, b: str, top: int = 20) -> bool:
    """Print whether ``a`` and ``b`` ran the same (op, shapes) with the same calls, and the ops whose
    calls differ (or, when none do, the ops with the largest time difference). True when identical."""
    ra, rb = json.load(open(a)), json.load(open(b))
    ca = {(k, s): c for k, s, c, _ in ra}
    cb = {(k, s): c for k, s, c, _ in rb}
    ta = {(k, s): t for k, s, _, t in ra}
    tb = {(k, s): t for k, s, _, t in rb}
    same = ca == cb
    print(f"{a}: {sum(ca.values()):,} op calls, {sum(ta.values()):.2f} s self CPU")
    print(f"{b}: {sum(cb.values()):,} op calls, {sum(tb.values()):.2f} s self CPU")
    print("identical ops, shapes and calls" if same else "the op census differs:")
    keys = set(ca) | set(cb)
    if same:
        worst = sorted(keys, key=lambda k: -abs(tb.get(k, 0) - ta.get(k, 0)))[:top]
        for k in worst:
            print(f"  {k[0]:<50} {k[1][:60]:<60} {ta.get(k, 0):8.3f} s -> {tb.get(k, 0):8.3f} s")
    else:
        for k in sorted((k for k in keys if ca.get(k, 0) != cb.get(k, 0)), key=lambda k: -abs(cb.get(k, 0) - ca.get(k, 0)))[:top]:
            print(f"  {k[0]:<50} {k[1][:60]:<60} calls {ca.get(k, 0)} -> {cb.get(k, 0)}")
    return same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="profile one bench run of a job file")
    r.add_argument("job")
    r.add_argument("out")
    c = sub.add_parser("compare", help="compare two records")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args()
    if args.cmd == "record":
        record(args.job, args.out)
    else:
        sys.exit(0 if compare(args.a, args.b) else 1)


if __name__ == "__main__":
    main()
