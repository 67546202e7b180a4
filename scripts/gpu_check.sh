#!/usr/bin/env bash
# The GPU check (issue 12): every GPU figure from one offline command, under a hard deadline of 480 s.
#
#   bash scripts/gpu_check.sh OUT_DIR             # on the lent H100 / H200, from a plain checkout
#   bash scripts/gpu_check.sh --dry-run OUT_DIR   # every stage at toy sizes on the CPU
#
# Stages and the report (OUT_DIR/gpu_check.json, rewritten after every stage; OUT_DIR/<stage>.log):
# see scripts/gpu_check.py. No pip install: the repository root goes on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
# the orchestrator keeps its own 480 s; this outer limit only catches a hung orchestrator
exec timeout -k 5 495 "$PY" scripts/gpu_check.py "$@"
