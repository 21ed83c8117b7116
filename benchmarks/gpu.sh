#!/usr/bin/env bash
# GPU checks of issue 11, in a few minutes on one CUDA device:
#   1. the CUDA tests (tests/test_scale_cuda.py: the real-scale examples as written, bf16
#      training with fp32 sharpness vs a dense Hessian, in-place-ReLU ResNet curvature,
#      float64 micro-batches, fp16 GradScaler resume, workers + pinned memory) and the CPU
#      scale tests beside them;
#   2. benchmarks/throughput.py on the GPU: ResNet-18 (torchvision's width, 64) on 32x32
#      crops of generated JPEGs, lscape vs a torchvision-reference-style loop, in fp32 and
#      bf16 (target >= 0.95); the micro-batched full-batch memory rows (peak CUDA memory);
#      the HVP/gradient time ratio;
#   3. benchmarks/distributed.py on the GPU: FSDP2 on one device in bf16 (finite-difference
#      products on sharded vectors) vs the replicated model in fp32, products/s and memory.
# Results go to benchmarks/results/gpu/ (or the folder given as $1), one file per part.
#
#   bash benchmarks/gpu.sh                     # on a machine with CUDA and lscape installed
#   bash benchmarks/gpu.sh "$OUT"              # on the device machine, then copy $OUT's files
#                                              # into benchmarks/results/gpu/
# On a machine without network access whose python lacks lscape's dependencies (zarr v3 and
# its numcodecs/donfig/crc32c), put their wheels in .wheels/ (pip download zarr -d .wheels
# --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64) and carry it.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-benchmarks/results/gpu}
mkdir -p "$RESULTS"
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA device visible to torch')"
if ! "$PY" -c "import lscape, zarr, PIL" 2>/dev/null; then
    if [ -d .wheels ]; then
        "$PY" -m pip install -q --no-index --find-links .wheels zarr pillow
    fi
    # the project itself, offline: no build isolation, no dependency resolution
    "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c "import torch, lscape; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| lscape', lscape.__version__)"
    nproc
} > "$RESULTS/device.txt" 2>&1

# 1. tests (status kept, so the benchmarks still run when one fails)
set +e
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_scale_cuda.py tests/test_scale_data.py \
    tests/test_scale_examples.py > "$RESULTS/tests.txt" 2>&1
TESTS=$?
set -e
tail -n 3 "$RESULTS/tests.txt"

# 2. benchmarks: loader workers as lscape's CUDA default (min(8, cores - 1))
WORKERS=$("$PY" -c "import os; print(max(1, min(8, (os.cpu_count() or 2) - 1)))")
COMMON=(--device cuda --channels 64 --size 32 --batch-size 256 --workers "$WORKERS" --images 6400
        --steps 100 --repeats 3 --threads 4)
bench() {  # bench FILE SECONDS ARGS...: one throughput.py run into FILE; a failure is recorded, not fatal
    local file=$1 seconds=$2
    shift 2
    timeout "$seconds" "$PY" benchmarks/throughput.py "${COMMON[@]}" "$@" > "$RESULTS/$file.log" 2>&1 \
        || echo "throughput.py $* failed or timed out (exit $?)" >> "$RESULTS/$file.log"
    grep -v "UserWarning\|warnings.warn\|check_worker_number_rationality" "$RESULTS/$file.log" > "$RESULTS/$file.txt" || true
    rm -f "$RESULTS/$file.log"
    cat "$RESULTS/$file.txt"
}
bench throughput-fp32 240 --precision fp32 --hvp --memory --memory-samples 4096 --micro-batch-size 512
bench throughput-bf16 180 --precision bf16

# 3. curvature of a sharded model: FSDP2 on one device in bf16 vs the replicated model (issue 22)
timeout 300 "$PY" benchmarks/distributed.py --device cuda --nprocs 1 --precision bf16 --threads 4 \
    > "$RESULTS/distributed-bf16.txt" 2>&1 || echo "distributed.py failed or timed out (exit $?)" >> "$RESULTS/distributed-bf16.txt"
cat "$RESULTS/distributed-bf16.txt"

echo "gpu.sh: results in $RESULTS (tests exit status $TESTS)"
exit "$TESTS"
