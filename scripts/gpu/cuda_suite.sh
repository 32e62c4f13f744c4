#!/usr/bin/env bash
# Build vigor_kernels._C with its CUDA kernels for this machine's GPU, then run the op conformance suite
# (tests/test_ops.py) on the `cuda` backend and the cuda-specific tests (tests/test_cuda_backend.py).
#
#   bash scripts/gpu/cuda_suite.sh      # from anywhere, on a machine with a CUDA GPU (compute capability >= 8.0)
#
# Needs python3 with a CUDA build of torch, nvcc, cmake, ninja, pybind11, pytest, pytest-benchmark and tqdm
# installed. Builds in place (build/, vigor_kernels/_C*.so), installs
# nothing. The pytest log goes to $VIGOR_BENCH_RESULTS/cuda-suite/ (or runs/cuda-suite/). Exit status: pytest's.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
LOG_DIR=${VIGOR_BENCH_RESULTS:-runs}/cuda-suite
mkdir -p "$LOG_DIR"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1

"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
nvcc --version | tail -n 2
arch=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")

# A fresh build for this Python and this GPU's architecture (plus the default sm_80/sm_90 set, so the
# build that CI compiles is the one tested).
case "$arch" in 80 | 90) archs="80;90" ;; *) archs="80;90;$arch" ;; esac
export VIGOR_CUDA_ARCHS="${VIGOR_CUDA_ARCHS:-$archs}"
rm -rf build vigor_kernels/_C*.so
start=$(date +%s)
"$PY" setup.py -q build_ext --inplace 2>&1 | tail -n 3
echo "build: $(($(date +%s) - start)) s"
"$PY" -c "import vigor_kernels as vk; from vigor_kernels import _C; print(_C.build_info()); \
[print(' ', s) for s in vk.available_backends().values()]"

set +e
VIGOR_TEST_BACKENDS=cuda VIGOR_REQUIRE_BACKENDS=torch,cpp,cuda "$PY" -m pytest -q -p no:cacheprovider -rs \
  tests/test_ops.py tests/test_cuda_backend.py 2>&1 | tee "$LOG_DIR/cuda_suite.log"
status=${PIPESTATUS[0]}
set -e
echo "pytest exit status: $status"
exit "$status"
