#!/usr/bin/env bash
# Every check that needs a CUDA device, in one run: the tests skipped without one, then the projection cost on the GPU
# (each driver, decomposed on the GPU or copied to the CPU) against a training step, and the callback's overhead.
# Usage: bash scripts/gpu_checks.sh [OUT_DIR]   (default results/gpu; needs lrlightning importable, e.g. pip -e .)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-results/gpu}"
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0

"$python" -m pytest -q -rs tests/test_projection.py tests/schemes/test_base.py tests/test_callback.py \
  tests/test_speed.py -k "cuda or gpu or device or cusolver or waits or recording" 2>&1 | tee "$out/tests.log" \
  || status=1

"$python" scripts/bench_projection.py --device cuda --backbones resnet56 --batch-size 128 --repeats 5 \
  --projection-devices same cpu --out "$out/projection-resnet56-cuda.json" 2>&1 | tee "$out/projection.log" \
  || status=1

"$python" scripts/bench_overhead.py --accelerator gpu --backbones resnet56 --periods 1 50 200 --steps 40 --rounds 2 \
  --drivers exact gram auto --projection-devices same cpu --objectives weight activation \
  --out "$out/overhead-resnet56-cuda.json" 2>&1 | tee "$out/overhead.log" | grep -v "it/s" || status=1

exit $status
