#!/usr/bin/env bash
# One GPU session's checks of the Triton kernels, within about 8 minutes; everything lands under $OUT.
#   env.txt             GPU, driver, torch / triton versions
#   pytest_kernels.txt  every kernel test, compiled on the GPU (the small interpreter-sized ones and the
#                       @pytest.mark.gpu ones at realistic sizes)
#   bench_kernels.txt   the benchmark table (scripts/bench_kernels.py), bench_kernels.json its figures
#   summary.txt         exit status of each step
# Usage (repository root): OUT=/some/dir bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

pip install -e . --no-deps -q >"$OUT/pip.log" 2>&1
echo "pip install: $?" >"$OUT/summary.txt"

{
  nvidia-smi
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__); print(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0))"
} >"$OUT/env.txt" 2>&1

# compiled kernels: first compilation of each tile shape dominates the time
timeout 200 python -m pytest -q -rs --durations=10 tests/test_kernels_attention.py tests/test_kernels_elementwise.py \
  tests/test_kernels_backend.py >"$OUT/pytest_kernels.txt" 2>&1
echo "pytest kernels (all, gpu-marked included): $?" >>"$OUT/summary.txt"

timeout 270 python scripts/bench_kernels.py --json "$OUT/bench_kernels.json" >"$OUT/bench_kernels.txt" 2>&1
echo "bench_kernels: $? (124 = cut by the time limit; the JSON holds the sections finished)" >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
