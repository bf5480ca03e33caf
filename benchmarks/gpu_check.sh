#!/usr/bin/env bash
# GPU check for a lent CUDA machine (target: under 8 minutes on an H200): consumer cards simulated by memory
# caps (base 24 GiB, small 12/16, tiny 8), batch 1 and vl2's batch, auto dtype and forced float16.
# Writes benchmarks/gpu/gpu_check.jsonl (a line per run, as it finishes) and gpu_check.json; copy the
# figures into benchmarks/RESULTS.md. Without CUDA it refuses at once; `--dry-run` exercises it on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 benchmarks/gpucheck.py --out "${OUT:-benchmarks/gpu}" "$@"
