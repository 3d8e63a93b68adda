#!/usr/bin/env bash
# The whole benchmark on one GPU, in bfloat16, in one command (issue 18, goal 6); sized to finish in under
# 8 minutes on one current GPU (the 58M model is small: most of the time is server start-ups and the naive
# PEFT server's one-request-at-a-time loop):
#
#   bash bench/gpu.sh                      # writes bench/results-gpu.md and bench/scaling-gpu.png
#   DEVICE=cpu QUICK=1 bash bench/gpu.sh   # the same path on CPU in bfloat16, tiny sizes (a dry run)
#
# Steps: `bench.run` (every HTTP scenario, each beside its base-model run), then `bench.curves` (distinct
# adapters, rank, resident limit). Each step has its own time limit (280 s + 190 s, under 8 minutes in all),
# so a slow or stuck step fails instead of overrunning the budget.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
OUT=${OUT_DIR:-bench}
RESULTS=$OUT/results-gpu.md
PNG=$OUT/scaling-gpu.png

if [[ $DEVICE == cuda ]]; then
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh: no CUDA device")'
  "$PY" -c 'import torch; print("GPU:", torch.cuda.get_device_name(0))'
fi

if [[ -n "${QUICK:-}" ]]; then  # a dry run of the same code path: every scenario and curve, tiny sizes
  RUN_ARGS=(--clients 2 --requests-per-client 1 --max-new-tokens 4 --rounds 1)
  CURVE_ARGS=(--distinct 1,8 --ranks 8,16 --limits 8,48 --rows 8 --max-new-tokens 4 --clients 2
              --requests-per-client 1)
else
  RUN_ARGS=(--clients 16 --requests-per-client 8 --max-new-tokens 32 --rounds 1)  # 8 requests each: one round fits 280 s
  CURVE_ARGS=(--repeats 3 --clients 16 --requests-per-client 8)
fi

started=$SECONDS
mkdir -p "$OUT"
timeout 280 "$PY" -m bench.run --device "$DEVICE" --dtype "$DTYPE" "${RUN_ARGS[@]}" --results "$RESULTS"
echo "bench.run: $((SECONDS - started)) s"
timeout 190 "$PY" -m bench.curves --device "$DEVICE" --dtype "$DTYPE" "${CURVE_ARGS[@]}" --png "$PNG" \
  --results "$RESULTS"
echo "bench/gpu.sh: $((SECONDS - started)) s in all; results in $RESULTS, plot in $PNG"
