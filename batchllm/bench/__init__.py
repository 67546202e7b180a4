"""Benchmarks: the synthetic workloads of docs/benchmarks.md and the harness that measures policies and
transformers peers on them in one process (``batchllm bench``).

workloads.py  the five workloads, seeded, as request rows / JSONL
harness.py    run_bench: every policy and peer on the identical request set; metrics; --profile probes
peers.py      transformers generate (static batches) and generate_batch (continuous batching)
report.py     rich tables, JSON, plot
command.py    the typer command ``bench`` and its [bench] TOML job files
"""
