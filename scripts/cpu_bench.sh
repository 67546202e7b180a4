#!/usr/bin/env bash
# The CPU figures of docs/benchmarks.md: the five workloads at CPU size (jobs/bench-cpu-*.toml),
# SmolLM2-135M in float32, batchllm against fcfs-lru in one process each, one JSON per workload.
# Run it on an otherwise idle machine (`uptime`): other processes make OpenMP timings meaningless.
#   scripts/cpu_bench.sh [OUT_DIR]        (OMP_NUM_THREADS=1 in the environment pins one thread)
set -euo pipefail
out=${1:-cpu-bench}
mkdir -p "$out"
for w in shared-prefix prefix-grid no-sharing decode-heavy-mix nested; do
  echo "== $w (load: $(cut -d' ' -f1-3 /proc/loadavg))"
  batchllm bench --job "jobs/bench-cpu-$w.toml" --peers "" --json "$out/$w.json"
done
