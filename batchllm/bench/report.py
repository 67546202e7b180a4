"""Showing a bench report: the rich table, the profile table, the JSON file and the plot.

The report is the dict ``harness.run_bench`` returns; everything here only formats it. Ratios are
against the first entry (``wall_vs_first``: entry wall / first wall, so 1.6x on fcfs-lru's row means
the first entry, batchllm by default, is 1.6 times faster).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any

from rich.table import Table

from batchllm.bench.harness import PROFILE_KINDS
from batchllm.errors import BatchLLMError
from batchllm.plotting import pyplot, save_figure


def _num(v: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{fmt}}{suffix}"


def results_table(report: dict[str, Any], results: list[dict] | None = None, title: str | None = None) -> Table:
    """One row per policy / peer with the metrics of ``docs/benchmarks.md`` and ratios to the first."""
    wl, m = report["workload"], report["model"]
    results = report["results"] if results is None else results
    t = Table(title=title or f"batchllm bench {wl['name']}: {wl['requests']:,} requests, {m['name']} on {m['device']} ({m['dtype']})")
    for name in ("policy / peer", "wall s", "wall / first", "total tok/s", "output tok/s", "prefill saving", "eff. MFU",
                 "peak KV GB", "decode batch", "same tokens", "load s"):
        t.add_column(name, justify="left" if name == "policy / peer" else "right")
    for e in results:
        if e.get("unavailable"):
            t.add_row(e["policy"], f"unavailable: {e['unavailable']}", *["-"] * 9)
            continue
        runs = e.get("wall_s_runs") or []
        wall = _num(e["wall_s"], ".2f") + (f" ({', '.join(f'{w:.2f}' for w in runs)})" if len(runs) > 1 else "")
        db = e.get("decode_batch")
        t.add_row(
            e["policy"], wall, _num(e.get("wall_vs_first"), ".2f", "x"), _num(e["total_tok_s"], ",.0f"),
            _num(e["output_tok_s"], ",.1f"), _num(e["prefill_saving"], ".1%"), _num(e["effective_mfu"], ".1%"),
            _num(e.get("peak_kv_gb"), ".3f"), f"{db['min']:g} / {db['median']:g} / {db['max']:g}" if db else "-",
            _num(e.get("same_tokens_as_first"), ".0%"), _num(e.get("load_s"), ".1f"),
        )
    return t


def profile_table(report: dict[str, Any]) -> Table | None:
    """Seconds (and share of wall) per kind of work for each profiled policy; None if not profiled."""
    rows = [e for e in report["results"] if "profile" in e]
    if not rows:
        return None
    t = Table(title="where the wall time goes (s, share of wall)")
    t.add_column("policy")
    for k in PROFILE_KINDS:
        t.add_column(k, justify="right")
    for e in rows:
        p = e["profile"]
        t.add_row(e["policy"], *[f"{p[k]:.2f} ({p[k] / e['wall_s']:.0%})" if e["wall_s"] else f"{p[k]:.2f}" for k in PROFILE_KINDS])
    return t


def headline(report: dict[str, Any]) -> str | None:
    """'batchllm is 1.62x faster than fcfs-lru' for the first entry against each other one."""
    res = report["results"]
    if len(res) < 2 or res[0].get("wall_s") is None:
        return None
    geo = " (geometric mean over cells)" if report.get("cells") else ""
    parts = [f"{e['wall_vs_first']:.2f}x vs {e['policy']}" for e in res[1:] if e.get("wall_vs_first")]
    return f"{res[0]['policy']} speed-up{geo}: " + ", ".join(parts) if parts else None


def write_json(report: dict[str, Any], path: str) -> None:
    """Write ``report`` to ``path`` atomically (a temporary file in the same folder, then a rename): a
    reader, or a run killed mid-write, sees the previous complete file or the new one, never half."""
    tmp = None
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise BatchLLMError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def plot(report: dict[str, Any], path: str) -> None:
    """Bar charts: wall time, total and output tok/s per entry; per-cell ratios for grid workloads."""
    plt = pyplot()
    res = [e for e in report["results"] if e.get("wall_s") is not None]
    cells = report.get("cells") or []
    names = [e["policy"] for e in res]
    fig, axes = plt.subplots(1, 3 if cells else 2, figsize=(15 if cells else 10, 4))
    axes[0].bar(names, [e["wall_s"] for e in res], color="tab:blue")
    axes[0].set_ylabel("wall time (s)")
    for i, e in enumerate(res):
        axes[0].annotate(f"{e['wall_s']:.2f}", (i, e["wall_s"]), ha="center", va="bottom", fontsize=8)
    x = range(len(res))
    axes[1].bar([i - 0.2 for i in x], [e["total_tok_s"] for e in res], width=0.4, label="total tok/s")
    axes[1].bar([i + 0.2 for i in x], [e["output_tok_s"] for e in res], width=0.4, label="output tok/s")
    axes[1].set_xticks(list(x), names)
    axes[1].set_ylabel("tokens / s")
    axes[1].legend(fontsize=8)
    if cells:
        first = names[0]
        for j, e in enumerate(res[1:], start=1):
            ratios = [c["results"][report["results"].index(e)].get("wall_vs_first") or 0 for c in cells]
            axes[2].bar([k + (j - 1) * 0.8 / max(1, len(res) - 1) for k in range(len(cells))], ratios,
                        width=0.8 / max(1, len(res) - 1), label=e["policy"])
        axes[2].axhline(1.0, color="gray", lw=0.8)
        axes[2].set_xticks(range(len(cells)), [c["label"].replace(" x ", "\n") for c in cells], fontsize=6)
        axes[2].set_ylabel(f"wall / {first} wall")
        axes[2].legend(fontsize=8)
    wl, m = report["workload"], report["model"]
    fig.suptitle(f"{wl['name']} ({wl['requests']:,} requests), {m['name']}, {m['device']} {m['dtype']}", fontsize=10)
    save_figure(fig, path)
