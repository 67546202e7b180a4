"""``batchllm bench``: the typer command and its TOML job files.

A bench job file holds one ``[bench]`` table (a ``run`` job file has none, and ``batchllm run`` would
reject this one, so the two schemas cannot be confused) with the run options, and an optional
``[bench.shape]`` table with the workload's shape parameters (``workloads.WORKLOADS``)::

    [bench]
    workload = "shared-prefix"
    model = "dummy:llama-3-8b"      # a path is relative to the job file
    dtype = "bfloat16"
    policies = ["batchllm", "fcfs-lru"]
    peers = ["transformers"]

    [bench.shape]
    groups = 8
    per_group = 64

Flags given on the command line override the file, which overrides the defaults (as for ``run``).
Registered in ``cli.py`` with ``app.command()(bench)``.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import typer

from batchllm.config import read_toml
from batchllm.errors import BatchLLMError

BENCH_KEYS = {"workload", "model", "device", "dtype", "policies", "peers", "kv_cache_tokens", "kv_cache_dtype", "max_num_batched_tokens",
              "repeat", "profile", "warmup", "peer_batch_size", "json", "plot", "shape"}


def load_bench_job(path: str) -> dict[str, Any]:
    """The ``[bench]`` table of a TOML file as run_bench keyword values (+ ``json`` / ``plot`` paths).

    Unknown keys are an error (a typo never falls back to a default); ``policies`` / ``peers`` may be
    lists or comma-separated strings; model / json / plot paths are relative to the file.
    """
    data = read_toml(path, "bench job file")
    if set(data) != {"bench"} or not isinstance(data["bench"], dict):
        raise BatchLLMError(f"{path}: a bench job file has exactly one [bench] table (found: {', '.join(data) or 'nothing'})")
    values = dict(data["bench"])
    unknown = sorted(set(values) - BENCH_KEYS)
    if unknown:
        raise BatchLLMError(f"bench job file {path}: unknown key(s) {', '.join(unknown)}")
    for key in ("policies", "peers"):
        if isinstance(values.get(key), str):
            values[key] = _split(values[key])
    if "shape" in values and not isinstance(values["shape"], dict):
        raise BatchLLMError(f"bench job file {path}: shape must be a table ([bench.shape])")
    base = os.path.dirname(os.path.abspath(path))
    for key in ("model", "json", "plot"):
        v = values.get(key)
        if isinstance(v, str) and not v.startswith("dummy:") and v.lower() not in ("default", "smollm2"):
            v = os.path.expanduser(v)
            values[key] = v if os.path.isabs(v) else os.path.normpath(os.path.join(base, v))
    return values


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def bench(
    workload: Optional[str] = typer.Option(None, "--workload", "-w", help="shared-prefix | prefix-grid | no-sharing | decode-heavy-mix | nested."),
    job: Optional[str] = typer.Option(None, "--job", help="TOML bench job file ([bench] table); flags given here override it."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="HF folder, .gguf, or dummy:PRESET. Default: built-in SmolLM2-135M-Instruct."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    dtype: Optional[str] = typer.Option(None, help="auto | float32 | bfloat16 | float16 (vLLM's half and float too)"),
    policies: Optional[str] = typer.Option(None, help="Comma-separated policies to measure (default batchllm,fcfs-lru); the first is the reference."),
    peers: Optional[str] = typer.Option(None, help="Comma-separated peers on the same weights: transformers, transformers-cb, vllm."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the report as JSON to this file (rewritten after every run, \"complete\": false until the end)."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write bar charts (wall time, tok/s) to this PNG."),
    groups: Optional[int] = typer.Option(None, help="Workload shape: prefix groups."),
    per_group: Optional[int] = typer.Option(None, help="Workload shape: requests per group (prefix-grid: the share degree)."),
    prefix_len: Optional[int] = typer.Option(None, help="Workload shape: shared prefix tokens (nested: the system prompt)."),
    suffix_len: Optional[int] = typer.Option(None, help="Workload shape: own prompt tokens per request."),
    output_len: Optional[int] = typer.Option(None, help="Workload shape: output tokens per request (EOS ignored)."),
    requests: Optional[int] = typer.Option(None, help="Workload shape: requests (no-sharing), requests per cell (prefix-grid)."),
    seed: Optional[int] = typer.Option(None, help="Workload seed (default 0)."),
    shuffle: Optional[bool] = typer.Option(None, "--shuffle/--no-shuffle", help="Shuffle the request file (default: shuffled)."),
    kv_cache_tokens: Optional[int] = typer.Option(None, help="KV pool size in tokens (default: from free memory)."),
    kv_cache_dtype: Optional[str] = typer.Option(None, help="KV cache dtype of batchllm's runs: auto | fp8 (e4m3, twice the tokens)."),
    max_num_batched_tokens: Optional[int] = typer.Option(None, help="Token budget per engine step."),
    repeat: Optional[int] = typer.Option(None, help="Runs per policy / peer; the best is reported, all are listed."),
    profile: bool = typer.Option(False, "--profile", help="Show where the wall time goes per kind of work."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show library logs."),
) -> None:
    """Measure policies and peers on one synthetic workload, in one process (docs/benchmarks.md)."""
    from rich.console import Console

    from batchllm.bench import report as rep
    from batchllm.bench.harness import run_bench

    console, out = Console(stderr=True), Console()
    if not out.is_terminal:  # a file or pipe gets the full table, not rich's 80-column default
        out = Console(width=170)
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    values = load_bench_job(job) if job else {}
    shape = dict(values.pop("shape", {}))
    for key, v in dict(groups=groups, per_group=per_group, prefix_len=prefix_len, suffix_len=suffix_len,
                       output_len=output_len, requests=requests, seed=seed, shuffle=shuffle).items():
        if v is not None:
            shape[key] = v
    flags = dict(workload=workload, model=model, device=device, dtype=dtype,
                 policies=_split(policies) if policies is not None else None,
                 peers=_split(peers) if peers is not None else None, kv_cache_tokens=kv_cache_tokens,
                 kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=max_num_batched_tokens, repeat=repeat, json=json_path, plot=plot)
    values.update({k: v for k, v in flags.items() if v is not None})
    if profile:
        values["profile"] = True
    name = values.pop("workload", None)
    if not name:
        raise BatchLLMError("no workload given (--workload NAME or a --job file)")
    json_out, plot_out = values.pop("json", None), values.pop("plot", None)
    # the JSON file follows the bench: a run cut off by a timeout keeps every figure it finished
    on_report = (lambda partial: rep.write_json(partial, json_out)) if json_out else None
    report = run_bench(name, shape, log=lambda msg: console.print(f"[dim]{msg}[/]", highlight=False), on_report=on_report, **values)
    out.print(rep.results_table(report))
    line = rep.headline(report)
    if line:
        out.print(line)
    if report.get("cells") and verbose:
        for c in report["cells"]:
            out.print(rep.results_table(report, c["results"], title=c["label"]))
    pt = rep.profile_table(report)
    if pt is not None:
        out.print(pt)
    if json_out:
        rep.write_json(report, json_out)
        console.print(f"report written to {json_out}")
    if plot_out:
        rep.plot(report, plot_out)
        console.print(f"plot written to {plot_out}")
