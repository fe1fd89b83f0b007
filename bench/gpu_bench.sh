#!/usr/bin/env bash
# One prepared GPU check (a few minutes on an H200): run from the repository root on the device machine,
# where torch and transformers are installed. Results land in $OUT (or ./bench-out) as JSON and a log.
set -euo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python bench/gpu_bench.py --out "$out/gpu_bench.json" 2>&1 | tee "$out/gpu_bench.log"
