#!/usr/bin/env bash
# GPU check for a lent CUDA machine (target: under 8 minutes on an H200).
# Writes benchmarks/gpu/gpu_check.json and gpu_check.md; copy the table into benchmarks/RESULTS.md.
# `benchmarks/gpu_check.sh --dry-run` runs the same script on CPU with toy shapes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 benchmarks/gpucheck.py --out "${OUT:-benchmarks/gpu}" "$@"
