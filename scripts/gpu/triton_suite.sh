#!/usr/bin/env bash
# GPU verification of the triton backend (issue #3). Run from anywhere on a CUDA machine:
#
#   bash scripts/gpu/triton_suite.sh                    # every step below, in order
#   bash scripts/gpu/triton_suite.sh small model        # some steps (each fits one 10-minute device call)
#
# Steps (each writes <results>/<name>-$VIGOR_GPU_TAG/, <results> = $VIGOR_BENCH_RESULTS or bench/results, and
# with $VIGOR_BENCH_PACK set to a folder also packs what it wrote into $VIGOR_BENCH_PACK/triton-<step>.tgz,
# for a machine from which only one folder comes back):
#   small      tests/test_ops.py, test_triton_kernels.py, test_triton_engine.py on CUDA: small awkward
#              shapes, tiny models of every family vs the oracle             -> triton-gpu-tests-*/small*
#   model      tests/test_triton_gpu.py: every op at Qwen2.5-1.5B / 7B layer shapes
#              (autotuned, as users run it)                                   -> triton-gpu-tests-*/model*
#   ghost      ghost kernel vs torch backend vs Opacus at 7B shapes, 16 x T in {512..4096}: time,
#              Gram TFLOP/s against the bf16 peak, extra memory              -> triton-ghost-*
#   ops        bench/op_bench.py --preset h100-7b, backends torch,triton(,opacus) -> ops-*
#   calibrate  ghost/direct crossover per layer shape, fitted ghost_cost_factor, installed into
#              vigor_kernels/triton_backend/calibration.json                   -> triton-calibration-*
#   engine     Qwen2.5-1.5B-shaped random model, VIGOR_BACKEND=triton, fp32 and bf16, against the
#              autograd oracle and the torch backend                          -> triton-engine-*
#
# Without Opacus installed, put its wheel in .whl/ (pip download --no-deps opacus==1.6.0 -d .whl); this
# script installs it into /tmp/site. Without it the Opacus
# columns stay empty and the scripts say so.
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG=${VIGOR_GPU_TAG:-gpu}
RES=${VIGOR_BENCH_RESULTS:-bench/results}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! "$PY" -c "import opacus" 2>/dev/null && compgen -G ".whl/opacus-*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/opacus-*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if "$PY" -c "import opacus" 2>/dev/null; then OPACUS=",opacus"; else OPACUS=""; echo "note: opacus not importable"; fi
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

pack() {  # pack <step> <paths...>: what the step wrote, into one tarball
    local step=$1; shift
    local present=()
    for p in "$@"; do [ -e "$p" ] && present+=("$p"); done
    if [ -n "${VIGOR_BENCH_PACK:-}" ] && [ ${#present[@]} -gt 0 ]; then
        tar czf "$VIGOR_BENCH_PACK/triton-$step.tgz" "${present[@]}"
    fi
}

# Each step runs its command, packs what it wrote (also after a failure), and returns the command's status.
TESTS=$RES/triton-gpu-tests-$TAG

step_small() {
    local rc=0
    mkdir -p "$TESTS"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$TESTS/gpu.txt" || true
    # one pinned config per kernel: no autotuning over dozens of tiny shapes
    VIGOR_TRITON_AUTOTUNE=0 VIGOR_TEST_BACKENDS=torch,triton "$PY" -m pytest -q -rs -p no:cacheprovider \
        tests/test_ops.py tests/test_triton_kernels.py tests/test_triton_engine.py \
        --junitxml="$TESTS/small-shapes.xml" > "$TESTS/small-shapes.log" 2>&1 || rc=$?
    tail -n 15 "$TESTS/small-shapes.log"
    echo "small shapes: exit $rc" > "$TESTS/small-shapes.exit"
    pack small "$TESTS"
    return $rc
}

step_model() {
    local rc=0
    mkdir -p "$TESTS"
    VIGOR_TEST_BACKENDS=torch,triton "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_triton_gpu.py \
        --junitxml="$TESTS/model-shapes.xml" > "$TESTS/model-shapes.log" 2>&1 || rc=$?
    tail -n 15 "$TESTS/model-shapes.log"
    echo "model shapes: exit $rc" > "$TESTS/model-shapes.exit"
    pack model "$TESTS"
    return $rc
}

step_ghost() {
    local rc=0
    "$PY" bench/gpu/triton_ghost_bench.py --out "$RES/triton-ghost-$TAG" || rc=$?
    pack ghost "$RES/triton-ghost-$TAG"
    return $rc
}

step_ops() {
    local rc=0
    "$PY" bench/op_bench.py --preset h100-7b --backends "torch,triton$OPACUS" --out "$RES/ops-$TAG" || rc=$?
    pack ops "$RES/ops-$TAG"
    return $rc
}

step_calibrate() {
    local rc=0
    "$PY" bench/gpu/triton_calibrate.py --out "$RES/triton-calibration-$TAG" --install || rc=$?
    pack calibrate "$RES/triton-calibration-$TAG" vigor_kernels/triton_backend/calibration.json
    return $rc
}

step_engine() {
    local rc=0
    for dtype in float32 bfloat16; do
        VIGOR_BACKEND=triton "$PY" bench/gpu/triton_engine_check.py --dtype $dtype \
            --out "$RES/triton-engine-$TAG/$dtype" || rc=$?
    done
    pack engine "$RES/triton-engine-$TAG"
    return $rc
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(small model ghost ops calibrate engine)
status=0
for s in "${steps[@]}"; do
    echo "=== triton suite: $s ($(date -u +%H:%M:%S))"
    case $s in
        small|model|ghost|ops|calibrate|engine) "step_$s" || status=1 ;;
        *) echo "unknown step '$s' (small model ghost ops calibrate engine)"; exit 2 ;;
    esac
done
echo "=== triton suite done ($(date -u +%H:%M:%S)), status $status"
exit $status
