#!/usr/bin/env bash
# GPU sweep of bench/grad_norm_bench.py (issue #7): every method on the same batch, bf16, on one GPU.
# Run from anywhere on a CUDA machine:
#
#   bash scripts/gpu/bench_sweep.sh                # every step below, in order (~15-25 min)
#   bash scripts/gpu/bench_sweep.sh goal fixed     # some steps (each fits one 10-minute device call)
#
# Steps (each writes <results>/$VIGOR_GPU_TAG/<step>/grad_norms.{json,md,png}, <results> = $VIGOR_BENCH_RESULTS
# or bench/results, and with $VIGOR_BENCH_PACK set to a folder also packs it into
# $VIGOR_BENCH_PACK/bench-<step>.tgz, for a machine from which only one folder comes back):
#   goal     the issue's goal: Qwen2.5-1.5B-shaped (28 layers, vocab 151936, tied), one group of 16,
#            prompt 128, T_max = 1024, GRPO-like ragged lengths
#   fixed    the same with every completion 1024 long (no raggedness to exploit)
#   lengths  Qwen2.5-1.5B-shaped, group 16, T_max in 256, 512, 2048 (ragged)
#   small    Qwen2.5-0.5B-shaped (24 layers, full vocab, tied), group 16, T_max 1024
#   7b       Qwen2.5-7B-shaped, 8 of 28 layers (stated in the results), full vocab, untied (so Opacus
#            runs on the model itself), group 16, T_max 1024
#
# Memory: on an 80 GB GPU the 1.5B batch of 16 x 1152 tokens is near the limit for the batched methods
# (the full-vocabulary logits alone are 5.6 GB in bf16); a method that runs out is recorded as "oom" with
# the allocator's message and the others go on. A GPU with 139 GB has room for all of them.
#
# Where Opacus and BackPACK cannot be installed from an index, download their wheels first, in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl opacus==1.6.0 backpack-for-pytorch==1.7.1 unfoldNd==0.2.3
# and bring .whl along; this script installs them into /tmp/site (their other needs -- numpy, scipy,
# opt-einsum, einops, torchvision -- must be there already). Without them those rows say "refused: ... not installed".
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG=${VIGOR_GPU_TAG:-gpu}
RES=${VIGOR_BENCH_RESULTS:-bench/results}/$TAG
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! "$PY" -c "import opacus, backpack" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$PY" -c "import opacus, backpack" 2>/dev/null || echo "note: opacus/backpack not importable: their rows will say so"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, torch.cuda.get_device_name())"

# sequential: the GPU is not shared, and each method's extra state (model copies, the untied twin) is
# released before the next method starts, which leaves the most memory to each.
COMMON=(--device cuda --dtype bfloat16 --layers full --vocab full --group-size 16 --prompt-len 128
        --repeats 5 --warmup 2 --order sequential --func-max-gib 12)

pack() {  # pack <step>: what the step wrote, into one tarball
    if [ -n "${VIGOR_BENCH_PACK:-}" ] && [ -e "$RES/$1" ]; then tar czf "$VIGOR_BENCH_PACK/bench-$1.tgz" "$RES/$1"; fi
}

run_step() {  # run_step <step> <grad_norm_bench arguments...>
    local step=$1 rc=0; shift
    "$PY" bench/grad_norm_bench.py "${COMMON[@]}" "$@" --out "$RES/$step" || rc=$?
    pack "$step"
    return $rc
}

step_goal() { run_step goal --preset qwen2.5-1.5b --lengths 1024; }
step_fixed() { run_step fixed --preset qwen2.5-1.5b --lengths 1024 --length-dist fixed; }
step_lengths() { run_step lengths --preset qwen2.5-1.5b --lengths 256,512,2048; }
step_small() { run_step small --preset qwen2.5-0.5b --lengths 1024; }
step_7b() { run_step 7b --preset qwen2.5-7b --layers 8 --lengths 1024; }

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(goal fixed lengths small 7b)
status=0
for s in "${steps[@]}"; do
    echo "=== grad-norm bench: $s ($(date -u +%H:%M:%S))"
    case $s in
        goal|fixed|lengths|small|7b) "step_$s" || status=1 ;;
        *) echo "unknown step '$s' (goal fixed lengths small 7b)"; exit 2 ;;
    esac
done
echo "=== grad-norm bench done ($(date -u +%H:%M:%S)), status $status"
exit $status
