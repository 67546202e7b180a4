#!/usr/bin/env bash
# The GPU benchmark session: the five workloads of docs/benchmarks.md on dummy:llama-3-8b shapes in
# bfloat16, --policy batchllm against --policy fcfs-lru in each run, plus transformers' static-batch
# generate on shared-prefix. One JSON report and one log per workload go to $OUT (default out/gpu-bench).
#
#   OUT=/some/dir bash scripts/gpu_bench.sh          # BUDGET_S=480 (seconds, all workloads together)
#   PROFILE=1 bash scripts/gpu_bench.sh              # adds --profile to shared-prefix (syncs: a bit slower)
#
# Sized for about 8 minutes on one H100/H200, in priority order (the targets first). shared-prefix and
# nested run at their full benchmarks.md shapes; no-sharing (256 of 1024 requests), prefix-grid (32
# requests per cell; the share-64 cells still hold 64) and decode-heavy-mix (16 per group, 512-token
# long outputs) are scaled down to fit; the reports record the shapes used, and jobs/bench-*.toml hold
# the full ones. Each workload is cut off at its limit or at what is left of the budget, whichever
# comes first, and the next one still runs. Each JSON is rewritten after every run ("complete": false
# until its bench ends), so a workload cut off at its limit keeps the runs it finished. The engine
# (KV pool profile, KV cache, decode graphs up to the largest batch the workload can reach) is set
# up once per workload, not per run. Where vLLM imports, shared-prefix adds it as a peer (PEERS
# overrides: PEERS=transformers leaves it out).
set -u
OUT=${OUT:-out/gpu-bench}
BUDGET_S=${BUDGET_S:-480}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

run() {  # run NAME LIMIT_S ARGS...: one bench process, at most LIMIT_S seconds and what the budget has left
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - SECONDS))
    if ((left < 45)); then
        echo "== $name: skipped, ${left}s of the budget left" | tee "$OUT/$name.log"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit}s, ${SECONDS}s used)"
    timeout -k 10 "$limit" python -m batchllm bench --workload "$name" --model dummy:llama-3-8b --device cuda \
        --dtype bfloat16 --policies batchllm,fcfs-lru --json "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 12 "$OUT/$name.log"
    ((rc == 124 || rc == 137)) && echo "== $name: cut off after ${limit}s (rc $rc); the JSON keeps the finished runs"
}

if [[ -z ${PEERS+x} ]]; then
    PEERS=transformers
    python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)" 2>/dev/null && PEERS=transformers,vllm
fi
run shared-prefix 180 --peers "$PEERS" ${PROFILE:+--profile}
run prefix-grid 150 --requests 32
run no-sharing 100 --requests 256
run nested 90
run decode-heavy-mix 90 --per-group 16 --output-len 512

# one line per workload: wall times and the batchllm / fcfs-lru ratio (geometric mean for the grid)
python - "$OUT" <<'EOF'
import glob, json, math, os, sys

def speedup(r):  # fcfs-lru wall / batchllm wall; geometric mean over the cells of a grid
    ratios = []
    for c in r.get("cells") or [r]:
        d = {e["policy"]: e.get("wall_s") for e in c["results"]}
        if d.get("batchllm") and d.get("fcfs-lru"):
            ratios.append(d["fcfs-lru"] / d["batchllm"])
    return math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None

for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    r = json.load(open(path))
    res = {e["policy"]: e for e in r["results"]}
    parts = [f"{n} {e['wall_s']:.2f} s" for n, e in res.items() if e.get("wall_s") is not None]
    x, mfu = speedup(r), res.get("batchllm", {}).get("effective_mfu")
    print(f"{r['workload']['name']:17s} " + ", ".join(parts) + (f"; batchllm {x:.2f}x fcfs-lru" if x else "")
          + (f"; batchllm MFU {mfu:.1%}" if mfu else "") + ("" if r.get("complete") else "  (INCOMPLETE)"))
EOF
echo "== done in ${SECONDS}s; reports in $OUT"
