#!/usr/bin/env bash
# GPU op benchmark of the `cuda` backend against `torch` (and `triton` where available), run after
# scripts/gpu/cuda_suite.sh built vigor_kernels._C on this machine:
#
#   bash scripts/gpu/cuda_suite.sh && bash scripts/gpu/cuda_bench.sh
#
# Qwen2.5-7B layer shapes in bf16 (the `h100-7b` preset of bench/op_bench.py) at T = 512..2048, so that
# it ends inside a 10-minute command. Results (JSON, MD, PNG) go to
# $VIGOR_BENCH_RESULTS/ops-gpu-cuda/, else bench/results/ops-gpu-cuda/.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
"$PY" bench/op_bench.py --preset h100-7b --backends torch,cuda,triton --lengths 512,1024,2048 --repeats 3 \
  --out "${VIGOR_BENCH_RESULTS:-bench/results}/ops-gpu-cuda"
