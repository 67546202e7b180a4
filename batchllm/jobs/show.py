"""``batchllm show DIR``: a rich summary of a job folder, running or finished.

Reads only ``manifest.json`` (what is durably committed: shards, rows, tokens, errors by code, prefix
reuse) and ``status.json`` (live progress, throughput, ETA), both rewritten atomically by the job, so it
is safe to run while the job writes. Whether a job is still running is read from the folder lock (held by
the writing process for as long as it lives), so a killed job shows as interrupted, not as running. On an
object store the lock is a lease (``batchllm.io.storage``): a killed job shows as running until its lease
expires (``BATCHLLM_LEASE_TTL``, 60 s). The folder may be a path or any pyarrow filesystem URI.

It also checks the job's integrity (``batchllm.jobs.integrity``): every listed shard exists with its
recorded size (with ``verify``: and its sha256); a damaged job shows its damaged shards and the repair
command. While no job runs, shard files the manifest does not list (left by a kill between a shard's
rename and the manifest write) are reported: they are never read, and the next resume deletes them
and redoes their rows.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from rich.console import Console
from rich.table import Table

from batchllm.errors import BatchLLMError
from batchllm.io.writer import committed_totals, storage_of
from batchllm.jobs.integrity import check_shards, damage_message, unlisted_shards
from batchllm.jobs.manifest import read_manifest
from batchllm.jobs.status import read_status


def is_running(output_dir: str) -> bool:
    """True while a batchllm process holds the folder's lock (or, on an object store, its lease)."""
    return storage_of(output_dir).locked()


def job_state(output_dir: str, verify: bool = False) -> dict[str, Any]:
    """Everything ``show`` prints, as plain values (also used by tests). ``verify``: the full integrity
    check (sha256 of every shard) instead of the fast one (sizes)."""
    manifest = read_manifest(output_dir)
    if manifest is None:
        raise BatchLLMError(f"{output_dir} holds no batchllm job (no manifest.json)")
    status = read_status(output_dir) or {}
    totals = committed_totals(manifest)
    running = is_running(output_dir)
    state = status.get("status") or "in_progress"
    if state == "in_progress" and not running:
        state = "interrupted"  # the process died without writing a final status: resume continues it
    try:
        damaged = check_shards(output_dir, manifest, full=verify)
    except OSError as e:
        raise BatchLLMError(f"cannot read {output_dir}: {e.strerror or e}") from None
    if damaged:
        state = "damaged"
    counts = status.get("request_counts") or {}
    done = max(counts.get("completed", 0) + counts.get("failed", 0), totals["completed"] + totals["failed"])
    return {
        "status": state,
        "running": running,
        "job_id": manifest.get("job_id"),
        "model": (manifest.get("fingerprint") or {}).get("model_name") or (manifest.get("job") or {}).get("model"),
        "inputs": manifest.get("input_files") or [],
        "total": counts.get("total") or None,
        "done": done,
        "completed": max(counts.get("completed", 0), totals["completed"]),
        "failed": max(counts.get("failed", 0), totals["failed"]),
        "committed": totals,
        "live": status.get("batchllm") or {},
        "created_at": manifest.get("created_at"),
        "completed_at": status.get("completed_at"),
        "errors": status.get("errors"),
        "runs": len(manifest.get("runs") or []),
        "damaged": damaged,
        "damage_message": damage_message(output_dir, damaged, len(manifest["shards"])) if damaged else None,
        "unlisted": [] if running else unlisted_shards(output_dir, manifest),  # running: a commit in flight
    }


def show_job(output_dir: str, console: Console, verify: bool = False) -> dict[str, Any]:
    """Print the summary; the caller reports ``s["damage_message"]`` (a damaged job) as its error."""
    s = job_state(output_dir, verify)
    c = s["committed"]
    live = s["live"]
    style = {"completed": "green", "failed": "red", "cancelled": "yellow", "interrupted": "yellow", "damaged": "red"}.get(s["status"], "cyan")
    t = Table(title=f"batchllm job {output_dir}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("status", f"[{style}]{s['status']}[/]" + ("  (running)" if s["running"] else ""))
    if s["status"] in ("interrupted", "cancelled", "failed"):
        t.add_row("", f"resume with: batchllm resume {output_dir}")
    if s["damaged"]:
        t.add_row("damaged shards", "\n".join(f"{d.file}: {d.reason} ({d.rows:,} rows)" for d in s["damaged"][:10])
                  + (f"\n... {len(s['damaged']) - 10} more" if len(s["damaged"]) > 10 else ""))
        t.add_row("", f"repair with: batchllm resume {output_dir} --repair")
    if s["unlisted"]:
        t.add_row("unlisted shards", f"{', '.join(s['unlisted'][:5])}{' ...' if len(s['unlisted']) > 5 else ''}: left by an "
                  "interrupted commit, never read; the next resume deletes them and redoes their rows")
    t.add_row("model", str(s["model"]))
    t.add_row("inputs", "\n".join(s["inputs"]) or "-")
    total = s["total"]
    pct = f"  ({100 * s['done'] / total:.1f}%)" if total else ""
    t.add_row("progress", f"{s['done']:,} / {total:,} requests{pct}" if total else f"{s['done']:,} requests done")
    t.add_row("", f"{s['completed']:,} completed, {s['failed']:,} failed")
    t.add_row("committed", f"{c['shards']:,} shards, {c['rows']:,} rows ({c['samples']:,} samples)"
              + ("" if s["damaged"] else f"  [dim]({'sha256' if verify else 'sizes'} checked)[/]"))
    thr = live.get("throughput") or {}
    if thr.get("output_tok_s"):
        t.add_row("throughput", f"{thr['output_tok_s']:,.1f} output tok/s, {thr.get('requests_s', 0):,.2f} requests/s")
    if s["running"] and live.get("eta_seconds") is not None:
        t.add_row("eta", _duration(live["eta_seconds"]))
    if live.get("replicas"):  # a distributed run (batchllm.distributed): one line per engine replica
        t.add_row("replicas", "\n".join(_replica_line(r) for r in live["replicas"]))
    prompt, cached = c["prompt_tokens"], c["cached_tokens"]
    t.add_row("tokens", f"{prompt:,} prompt, {c['completion_tokens']:,} completion")
    reuse = f"{100 * cached / prompt:.1f}%" if prompt else "-"
    t.add_row("prefix reuse", f"{cached:,} prompt tokens reused ({reuse})")
    if c["errors_by_code"]:
        t.add_row("errors by code", "\n".join(f"{k}: {v:,}" for k, v in c["errors_by_code"].items()))
    if s["errors"]:
        t.add_row("job error", "\n".join(e.get("message", "") for e in s["errors"].get("data", [])))
    t.add_row("created", _when(s["created_at"]))
    if s["completed_at"]:
        t.add_row("completed", _when(s["completed_at"]))
    t.add_row("runs", str(s["runs"]))
    console.print(t)
    return s


def _replica_line(r: dict[str, Any]) -> str:
    where = "/".join(str(x) for x in (r.get("node"), r.get("device")) if x)
    line = f"{r.get('replica')}: {r.get('state')}{f' on {where}' if where else ''}, {r.get('units_done', 0)} units, " \
           f"{r.get('requests_done', 0):,} requests"
    return line + (f" ({r['error']})" if r.get("error") else "")


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
