#!/usr/bin/env bash
# Issue 17 on one GPU, in at most 10 minutes: every part writes its results as it finishes, under
# its own time limit, so a slow or failing part costs only itself.
#
#   1. tests.log              the compiled Pallas tests (paged attention, LoRA kernels, the
#                             fused SGMV; the classes CPU CI skips); from their results,
#      verified.json          the record of kernel forms verified compiled on this device kind,
#                             which `auto` may measure at warm-up (carajax.autotune;
#                             scripts/record_verified.py adds the forms whose classes all passed,
#                             bench_kernels --verified removes a LoRA form that disagreed): commit
#                             it as data/kernel_tables/verified.json and
#                             carajax/data/kernel_tables/verified.json
#   2. gpu_check.json         Llama-2-7B (random bf16) decode steps at batch 1 / 8 / 32 and context
#                             512 / 2048 against the bandwidth roofline, with 32 adapters (ranks
#                             8-64) against none, and the paged attention alone (pallas vs
#                             reference): scripts/bench_gpu_decode.py; its log in decode.log
#   3. bench_kernels.json     the LoRA kernel benchmark, short (kernels.log): two-call Pallas
#                             unpadded / padded, fused, jnp reference; and kernel_table.json, the
#                             table lora_impl="auto" reads (commit it, from a full run, as
#                             data/kernel_tables/<device>.json and its copy in carajax/data/);
#                             its plot: python scripts/bench_kernels.py --replot bench_kernels.json
#   summary.txt               device, driver, jax, commit; each part's command and exit status
# (8 files: the device tool brings back at most 8; the JUnit report stays in a temporary folder.)
#
#   on the device:  bash scripts/gpu_check.sh            (results in $OUT, else out/gpu_check)
#                   bash scripts/gpu_check.sh DIR        (results in DIR)
#   here (CPU smoke test of the same path, ~2 minutes):
#                   bash scripts/gpu_check.sh --cpu /tmp/gpu_check
# Commit gpu_check.json as data/benchmarks/gpu_check_<device>_<date>.json.
set -uo pipefail
CPU=0
if [ "${1:-}" = "--cpu" ]; then CPU=1; shift; fi
DIR=${1:-${OUT:-out/gpu_check}}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
# What bench_gpu_decode.py records as the command that made gpu_check.json.
export GPU_CHECK_COMMAND="bash scripts/gpu_check.sh $([ $CPU = 1 ] && echo '--cpu ')$DIR"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$CPU" = 1 ]; then
  PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3)}
  export JAX_PLATFORMS=cpu
  T_TESTS=${T_TESTS:-120} T_DECODE=${T_DECODE:-120} T_KERNELS=${T_KERNELS:-90}
  # No GPU: the interpret-mode twins of the compiled classes, a few of them.
  TEST_SELECT=(tests/test_attention.py tests/test_fused_kernels.py
               -k "Interpret and (mixed_batch or decode_only)")
  DECODE_ARGS=(--cpu)
  KERNEL_ARGS=(--quick --tokens 8 --adapters 2 --repeats 1)
else
  PY=${PY:-$(command -v python3)}
  # Seconds per part; together under 10 minutes with room for start-up.
  T_TESTS=${T_TESTS:-150} T_DECODE=${T_DECODE:-300} T_KERNELS=${T_KERNELS:-100}
  TEST_SELECT=(tests/test_attention.py tests/test_kernels.py tests/test_fused_kernels.py
               -k "GPU or lowers")
  DECODE_ARGS=()
  KERNEL_ARGS=(--full --tokens 16 256 --adapters 1 16 --repeats 3)
fi

{ date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())'
  echo "commit $(git rev-parse HEAD 2>/dev/null)$(git diff --quiet HEAD -- 2>/dev/null || echo -dirty)"
  echo "command: $GPU_CHECK_COMMAND"; } 2>&1 | tee "$DIR/summary.txt"

status=0
part() {  # part NAME SECONDS LOG COMMAND...: run under a time limit, log, record the exit status
  local name=$1 limit=$2 logf=$3; shift 3
  local t0=$SECONDS
  [[ $logf = /* ]] || logf="$DIR/$logf"  # an absolute LOG stays out of $DIR
  echo "== $name (limit ${limit}s): $*" | tee -a "$DIR/summary.txt"
  timeout --kill-after=10 "$limit" "$@" > "$logf" 2>&1
  local rc=$?
  tail -n 15 "$logf"
  echo "== $name: exit $rc after $((SECONDS - t0))s (124 = over its limit)" | tee -a "$DIR/summary.txt"
  [ "$rc" -eq 0 ] || status=$rc
}

TMP=$(mktemp -d)  # what need not come back: the JUnit report, the record's log
part tests "$T_TESTS" tests.log "$PY" -m pytest -q -n 0 -p no:cacheprovider \
  --junitxml="$TMP/tests.xml" "${TEST_SELECT[@]}"
# Off a GPU (--cpu) this records nothing: verified.json is the shipped record.
part record 60 "$TMP/record.log" "$PY" scripts/record_verified.py --junit "$TMP/tests.xml" \
  --out "$DIR/verified.json"
part decode "$T_DECODE" decode.log "$PY" scripts/bench_gpu_decode.py "${DECODE_ARGS[@]}" \
  --out "$DIR/gpu_check.json"
part kernels "$T_KERNELS" kernels.log "$PY" scripts/bench_kernels.py "${KERNEL_ARGS[@]}" \
  --out "$DIR/bench_kernels.json" --plot "" --write-table "$DIR/kernel_table.json" \
  --verified "$DIR/verified.json"
echo "results in $DIR: $(ls "$DIR" | tr '\n' ' ')"
exit $status
