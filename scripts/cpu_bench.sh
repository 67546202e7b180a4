#!/usr/bin/env bash
# The CPU figures of docs/benchmarks.md: the five workloads at CPU size (jobs/bench-cpu-*.toml),
# SmolLM2-135M in float32, batchllm against fcfs-lru (and vLLM where it imports) in one process per
# workload, without and with memory pressure. One JSON report and one log per run go to OUT_DIR; each
# JSON is rewritten after every run ("complete": false until its bench ends), so a run cut off by its
# limit keeps every figure it finished.
#
#   scripts/cpu_bench.sh [OUT_DIR]                 (default cpu-bench)
#   /work/vllm-venv/bin/python is used when PYTHON says so, or run it with that venv activated:
#     source /work/vllm-venv/bin/activate && scripts/cpu_bench.sh out/cpu
#
# Environment:
#   PYTHON=python          the interpreter (vLLM's venv for --peers vllm)
#   PEERS=...              peers for every run; default "vllm" when vLLM imports in $PYTHON, else none
#   PRESSURE_TOKENS=2048   the KV pool of the memory-pressure runs (--kv-cache-tokens); 0: none of them
#   BUDGET_S=2400          seconds for everything; each run also has its own limit (below)
#   TOY=1                  every workload at toy size, one repeat (checks the script in about 5 minutes)
#   OMP_NUM_THREADS=1      pins one thread (else torch's default: every core)
#
# Expected on the 2-core machine of docs/benchmarks.md: about 15 minutes without pressure (batchllm
# and fcfs-lru about 7.5 of them; vLLM, its load and the model loads the rest) and 20-25 minutes in
# all; the default budget leaves room. Run it on an otherwise idle machine (`uptime`): other processes
# make OpenMP timings meaningless. Runs go workload by workload, pressure right after the default
# pool, so a budget that runs out cuts the last workloads, not one whole mode.
set -u
cd "$(dirname "$0")/.."
out=${1:-cpu-bench}
PYTHON=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-2400}
PRESSURE_TOKENS=${PRESSURE_TOKENS:-2048}
mkdir -p "$out"
if [[ -z ${PEERS+x} ]]; then
    if "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)" 2>/dev/null; then
        PEERS=vllm
    else
        PEERS=""
        echo "== vLLM does not import in $PYTHON: batchllm and fcfs-lru only (PEERS=vllm forces the peer's one-line reason)"
    fi
fi

toy_shape() {  # toy-size flags of one workload (TOY=1)
    case $1 in
        shared-prefix) echo "--groups 2 --per-group 2 --prefix-len 32 --suffix-len 8 --output-len 2" ;;
        prefix-grid) echo "--prefix-len 32 --per-group 4 --output-len 2 --requests 8 --suffix-len 8" ;;
        no-sharing) echo "--requests 4 --suffix-len 16 --output-len 2" ;;
        decode-heavy-mix) echo "--groups 2 --per-group 2 --prefix-len 32 --suffix-len 8" ;;
        nested) echo "--prefix-len 32 --groups 2 --per-group 2 --suffix-len 8 --output-len 2" ;;
    esac
}

run() {  # run WORKLOAD LIMIT_S TAG [ARGS...]: one bench process, cut at LIMIT_S or what the budget has left
    local w=$1 limit=$2 tag=$3
    shift 3
    local left=$((BUDGET_S - SECONDS))
    if ((left < 30)); then
        echo "== $w $tag: skipped, ${left}s of the budget left" | tee "$out/$w$tag.log"
        return
    fi
    ((limit > left)) && limit=$left
    local extra=()
    if [[ -n ${TOY:-} ]]; then
        read -r -a extra <<< "$(toy_shape "$w") --repeat 1"
    fi
    echo "== $w$tag (limit ${limit}s, ${SECONDS}s used, load: $(cut -d' ' -f1-3 /proc/loadavg))"
    timeout -k 10 "$limit" "$PYTHON" -m batchllm bench --job "jobs/bench-cpu-$w.toml" --peers "$PEERS" \
        --json "$out/$w$tag.json" "${extra[@]}" "$@" > "$out/$w$tag.log" 2>&1
    local rc=$?
    grep -E "^(│|batchllm speed-up|.*unavailable)" "$out/$w$tag.log" | tail -n 6
    ((rc == 124 || rc == 137)) && echo "== $w$tag: cut off after ${limit}s (rc $rc); the JSON keeps the finished runs"
    ((rc != 0 && rc != 124 && rc != 137)) && echo "== $w$tag: failed (rc $rc), see $out/$w$tag.log"
}

# workload and per-run limit (s): about 2x the expected time of the default-pool run
for spec in shared-prefix:300 prefix-grid:600 no-sharing:240 decode-heavy-mix:180 nested:120; do
    w=${spec%%:*} limit=${spec##*:}
    run "$w" "$limit" ""
    if ((PRESSURE_TOKENS > 0)); then
        run "$w" "$limit" "-kv$PRESSURE_TOKENS" --kv-cache-tokens "$PRESSURE_TOKENS"
    fi
done

# one line per run: wall times, the batchllm / fcfs-lru ratio (geometric mean for the grid), agreement
"$PYTHON" - "$out" <<'EOF'
import glob, json, math, os, sys

def speedup(r, other):  # other wall / batchllm wall; geometric mean over the cells of a grid
    ratios = []
    for c in r.get("cells") or [r]:
        d = {e["policy"]: e.get("wall_s") for e in c["results"]}
        if d.get("batchllm") and d.get(other):
            ratios.append(d[other] / d["batchllm"])
    return math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None

for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    r = json.load(open(path))
    res = {e["policy"]: e for e in r["results"]}
    parts = [f"{n} {e['wall_s']:.2f} s" for n, e in res.items() if e.get("wall_s") is not None]
    ratios = [f"{x:.2f}x {n}" for n in res if n != "batchllm" for x in [speedup(r, n)] if x]
    same = [f"{n} {e['same_tokens_as_first']:.0%}" for n, e in res.items() if n != "batchllm" and e.get("same_tokens_as_first") is not None]
    print(f"{os.path.basename(path)[:-5]:26s} " + ", ".join(parts) + ("; batchllm vs " + ", ".join(ratios) if ratios else "")
          + ("; same tokens: " + ", ".join(same) if same else "") + ("" if r.get("complete") else "  (INCOMPLETE)"))
EOF
echo "== done in ${SECONDS}s; reports in $out"
