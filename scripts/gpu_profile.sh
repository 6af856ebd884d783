#!/usr/bin/env bash
# Issue 5 on a lent GPU: profile Llama-2-7B-shaped engine steps (random bf16 weights, the Pallas
# LoRA kernels), fit the cost models and print their held-out R^2 / MAPE (`carajax profile`).
#
# One run per LoRA kernel mode, each in its own process under its own time limit, so a slow
# compile costs one mode and not both; each mode's raw rows, fitted model and plot land in $OUT
# as soon as it finishes. The engine compiles one step per (phase, batch, chunk) shape and the
# model's 32 layers are unrolled, so the grid is kept to a few shapes.
#
#   on the device:  bash scripts/gpu_profile.sh
#   here (CPU smoke run of the same path, a few minutes):
#       MODEL=llama-test DTYPE=float32 BATCHES=1,2 TOKENS=16 CONTEXTS=0,16 SEQ_LEN=64 \
#       MIXES=base,uniform8 REPEATS=2 bash scripts/gpu_profile.sh
set -uo pipefail
OUT=${OUT:-out/gpu_profile}
MODEL=${MODEL:-llama2-7b}
DTYPE=${DTYPE:-bfloat16}
BATCHES=${BATCHES:-1,4,16,32}
TOKENS=${TOKENS:-64,256,512}
CONTEXTS=${CONTEXTS:-0,512}
SEQ_LEN=${SEQ_LEN:-1024}           # KV rows per request: 32 x 1024 rows of a 7B model = 16 GiB
MIXES=${MIXES:-base,uniform8,uniform64,mixed 8..64}
REPEATS=${REPEATS:-5}
LIMIT=${LIMIT:-240}                # seconds per kernel mode, compiling included
PY=${PY:-$(command -v python3)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())'; git rev-parse --short HEAD 2>/dev/null; } \
  | tee "$OUT/env.txt"

status=0
for kernel in unpadded padded; do
  tag="${MODEL}_${kernel}"
  timeout "$LIMIT" "$PY" -m carajax.cli profile --model "$MODEL" --dtype "$DTYPE" --impl auto \
    --kernels "$kernel" --batch-sizes "$BATCHES" --prompt-tokens "$TOKENS" --contexts "$CONTEXTS" \
    --seq-len "$SEQ_LEN" --mixes "$MIXES" --warmup 2 --repeats "$REPEATS" --no-progress \
    --out "$OUT/profile_$tag.json" --fit "$OUT/cost_model_$tag.json" --plot "$OUT/fit_$tag.png" \
    2>&1 | tee "$OUT/profile_$tag.log"
  rc=${PIPESTATUS[0]}
  echo "== $kernel: exit $rc (124 = over its $LIMIT s limit)"
  [ "$rc" -eq 0 ] || status=$rc
done
exit $status
