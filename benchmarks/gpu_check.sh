#!/usr/bin/env bash
# The GPU checks of the benchmark and pooling issues, as one script for a GPU machine.
#
#   OUT=/some/folder BUDGET=420 bash benchmarks/gpu_check.sh          # from the repository root
#
# Needs python3 with torch (CUDA), torchvision, timm, pytest and hypothesis; the project is
# used from the checkout (PYTHONPATH), nothing is installed. About 5-8 minutes on an H100.
# Without OUT the results go to gpu-check-out/ in the checkout (ignored by git).
# Steps, most important first, each with its own time limit, cut so that the whole script
# ends within BUDGET seconds (default 420); a failed or cut step does not stop the others:
#   1. the device and versions;
#   2. the CUDA tests (tests/test_cuda.py: GPU results against the CPU's);
#   3. with BEFORE=DIR (a folder holding an earlier commit's bilinearpool/ package): that
#      code's Fast BCNN layer cases, run from inside DIR, into fp32-before/ (an A/B of a
#      change on the same machine; each run's ratios are to its own naive chain; the log
#      names the package file it imported);
#   4. the layer benchmark, float32;
#   5. host or device bound: the layer cases' host time and kernel count
#      (benchmarks/profile_layer.py); where a Fast BCNN model's inference time goes
#      (benchmarks/profile_head.py);
#   6. the classifier's product: F.linear, the library's kernel and two candidate kernels
#      (benchmarks/bench_wide_linear.py, "wide"); the whole head for inference: the
#      library's one-step head against pooling then classifier (bench_head.py, "head"; its
#      candidate kernels are left out here: committed in results/gpu-h200-head/run1/);
#   7. the model benchmark at 224 px, float32;
#   8. matrix square root (Newton-Schulz vs eig) and Tensor Sketch (FFT vs Gram) on CUDA;
#   9. layers and models again under autocast + channels-last;
#  10. the Fast BCNN layer cases with torch ops instead of the Triton kernels ("eager",
#      BILINEARPOOL_TRITON=0);
#  11. models at 197 and 448 px, float32, if time is left.
# STEPS (default: all) picks steps by name: tests before layers profile wide head models
# sqrtm sketch amp eager res, e.g. STEPS="tests layers models amp" for a rerun after a change.
# After every step the results so far are packed into $OUT/gpu-results.tar.gz (one folder
# named after the GPU, e.g. h100/: unpack it into benchmarks/results/ and rename it like the
# committed gpu-h100/), so a run cut short still returns what finished; the whole log is
# $OUT/gpu_check.log. PYTHON=.venv/bin/python uses the environment `make test` made.
#
# Dry run of the script itself on a CPU machine (short runs, the CUDA tests fail there):
#   DEVICE=cpu DRY=1 PYTHON=.venv/bin/python OUT=/tmp/gpu-dry bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-gpu-check-out}
PY=${PYTHON:-python3}
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # absolute, as OUT
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-420}
STEPS=" ${STEPS:-tests before layers profile wide head models sqrtm sketch amp eager res} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
if [ -n "${DRY:-}" ]; then  # tiny settings, only to check the script's steps
    QUICK=(--quick --shapes 2x64x7x7)
    MODELS=(--quick --backbones resnet18 --heads plain fast-bcnn --no-train)
    MORE_RES=(--quick --backbones resnet18 --heads plain --no-train --resolutions 64)
    SQRTM=(--channels 16 --repeats 1)
    SKETCH=(--shapes 2,64,7,7,256 --repeats 1)
    PROFILE=(--backbone resnet18 --batch-size 2 --resolution 64 --repeats 2 --warmup 1)
    LAYER_PROFILE=(--shapes 2x64x7x7 --calls 5 --cprofile 2x64x7x7)
    WIDE=(--shapes 2x40000x3 --repeats 1 --warmup 0)
    HEAD=(--shapes 2x64x49 --repeats 1 --warmup 0)
else
    QUICK=()
    MODELS=(--resolutions 224)
    MORE_RES=(--resolutions 197 448)
    SQRTM=(--channels 64 256 512 --warmup 3 --repeats 10)
    SKETCH=(--repeats 5)
    PROFILE=(--batch-size 32)
    LAYER_PROFILE=(--cprofile 32x256x14x14)
    WIDE=()
    HEAD=(--shapes 32x2048x49 32x2048x25 32x1536x25 8x2048x49 8x2048x25 1x2048x49 32x256x196 --repeats 10 --no-candidates)
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: the "before" step runs in another folder
LOG="$OUT/gpu_check.log"
: >"$LOG"

step() {  # step SECONDS COMMAND...: run with a time limit (cut to what BUDGET leaves), log it
    local limit=$1
    shift
    local left=$((BUDGET - SECONDS - 5))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 10 ]; then
        echo "=== skipped (budget spent): $*" | tee -a "$LOG"
        return
    fi
    local part="$OUT/.step.log"
    echo "=== $(date -u +%H:%M:%S) [limit ${limit}s] $*" | tee -a "$LOG"
    timeout "$limit" "$@" >"$part" 2>&1
    local rc=$?
    cat "$part" >>"$LOG"
    tail -n 4 "$part"
    rm -f "$part"
    echo "=== exit $rc, $SECONDS s since the start" | tee -a "$LOG"
    if [ -d "$OUT/results" ]; then tar czf "$OUT/gpu-results.tar.gz" -C "$OUT/results" .; fi
}

step 30 nvidia-smi
step 60 "$PY" -c "import torch, torchvision, timm; print(torch.__version__, torchvision.__version__, timm.__version__, torch.cuda.get_device_name())"
NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())" 2>/dev/null || echo "$DEVICE")
RES="$OUT/results/$NAME"
mkdir -p "$RES"

want tests && step 120 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider

BENCH=("$PY" -m bilinearpool.bench)
FUSED=(--cases fast-bcnn fast-bcnn-triu bcnn-2stream)
if want before && [ -n "${BEFORE:-}" ]; then
    # From inside BEFORE: `python -m` puts the working folder first on the import path, so
    # run from the checkout it would import the current package, whatever PYTHONPATH says.
    (
        cd "$BEFORE" && export PYTHONPATH="$PWD" &&
            step 30 "$PY" -c "import bilinearpool; print('before: bilinearpool from', bilinearpool.__file__)" &&
            step 60 "${BENCH[@]}" layers --device "$DEVICE" "${QUICK[@]}" "${FUSED[@]}" --out "$RES/fp32-before" --no-progress
    )
fi
want layers && step 90 "${BENCH[@]}" layers --device "$DEVICE" "${QUICK[@]}" --out "$RES/fp32" --no-progress
want profile && step 45 "$PY" benchmarks/profile_layer.py --device "$DEVICE" "${LAYER_PROFILE[@]}" --out "$RES/profile-layer.md"
want profile && step 60 "$PY" benchmarks/profile_head.py --device "$DEVICE" "${PROFILE[@]}" --out "$RES/profile-head.md"
want wide && step 60 "$PY" benchmarks/bench_wide_linear.py --device "$DEVICE" "${WIDE[@]}" --out "$RES/wide-linear"
want head && step 90 "$PY" benchmarks/bench_head.py --device "$DEVICE" "${HEAD[@]}" --out "$RES/head"
want models && step 120 "${BENCH[@]}" models --device "$DEVICE" "${MODELS[@]}" --out "$RES/fp32" --no-progress
[ -d "$RES/fp32" ] && step 60 "${BENCH[@]}" report "$RES/fp32" --out "$RES/fp32.md" --title "$NAME, float32"
want sqrtm && step 60 "$PY" benchmarks/bench_matrix_sqrt.py --device "$DEVICE" "${SQRTM[@]}" --out "$RES/sqrtm"
want sketch && step 60 "$PY" benchmarks/bench_tensor_sketch.py --device "$DEVICE" "${SKETCH[@]}" --out "$RES/tensor-sketch"
want amp && step 60 "${BENCH[@]}" layers --device "$DEVICE" "${QUICK[@]}" --amp --channels-last --out "$RES/amp-cl" --no-progress
want amp && step 90 "${BENCH[@]}" models --device "$DEVICE" "${MODELS[@]}" --amp --channels-last --out "$RES/amp-cl" --no-progress
[ -d "$RES/amp-cl" ] && step 30 "${BENCH[@]}" report "$RES/amp-cl" --out "$RES/amp-cl.md" --title "$NAME, autocast (float16) and channels-last"
want eager && BILINEARPOOL_TRITON=0 step 45 "${BENCH[@]}" layers --device "$DEVICE" "${QUICK[@]}" "${FUSED[@]}" --out "$RES/fp32-torch-ops" --no-progress
want res && step 120 "${BENCH[@]}" models --device "$DEVICE" "${MORE_RES[@]}" --out "$RES/fp32-197-448" --no-progress
rm -rf "$OUT/results"
echo "results: $OUT/gpu-results.tar.gz; log: $LOG ($SECONDS s)"
