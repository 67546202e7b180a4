#!/usr/bin/env bash
# One GPU session's checks of the Triton kernels and CUDA graphs, within about 9 minutes; everything
# lands under $OUT.
#   env.txt             GPU, driver, torch / triton versions
#   pytest_kernels.txt  every kernel test, compiled on the GPU (the small interpreter-sized ones and the
#                       @pytest.mark.gpu ones at realistic sizes)
#   bench_kernels.txt   the benchmark table (scripts/bench_kernels.py), bench_kernels.json its figures
#   pytest_graphs.txt   tests/test_cuda_graphs.py and tests/test_input_buffers.py on the GPU: real capture,
#                       graph vs eager token equality on dummy weights, the CPU-mode tests compiled
#   bench_graphs.txt    decode-step timing eager vs graph replay, kernel time, the share of decode-step
#                       wall time outside GPU kernels, engine tokens/s (scripts/bench_decode_graphs.py);
#                       bench_graphs.json its figures
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
timeout 160 python -m pytest -q -rs --durations=10 tests/test_kernels_attention.py tests/test_kernels_elementwise.py \
  tests/test_kernels_backend.py tests/test_kernel_sampling.py tests/test_sampler.py >"$OUT/pytest_kernels.txt" 2>&1
echo "pytest kernels (all, gpu-marked included): $?" >>"$OUT/summary.txt"

# CUDA graphs first among the long steps: they are new, the kernel benchmark has run before
timeout 70 python -m pytest -q -rs --durations=5 tests/test_cuda_graphs.py tests/test_input_buffers.py \
  >"$OUT/pytest_graphs.txt" 2>&1
echo "pytest graphs: $?" >>"$OUT/summary.txt"

timeout 100 python scripts/bench_decode_graphs.py --batches 1,8,64,128 --reps 20 --json "$OUT/bench_graphs.json" \
  >"$OUT/bench_graphs.txt" 2>&1
echo "bench_decode_graphs: $? (124 = cut by the time limit)" >>"$OUT/summary.txt"

timeout 190 python scripts/bench_kernels.py --json "$OUT/bench_kernels.json" >"$OUT/bench_kernels.txt" 2>&1
echo "bench_kernels: $? (124 = cut by the time limit; the JSON holds the sections finished)" >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
