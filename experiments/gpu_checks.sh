#!/usr/bin/env bash
# Everything owed on one GPU, in one call of the device tool (about 9 minutes at most).
# Results go to $OUT (at most 8 files come back): gpu_checks.txt (this output),
# gpu_bench.json and gpu_bench.log (experiments/gpu_bench.py), memory_check.json
# (experiments/gpu_memory_check.py).
#
# Prepare on the development machine, once (runs/ is git-ignored, so carry it):
#   pip download galore-torch==1.0 --no-deps -d runs/wheels/
# Run with the device tool:
#   command: bash experiments/gpu_checks.sh    carry: ["runs/wheels"]    timeout_s: 600
# The GPU image's python3 has jax (CUDA), flax, optax, orbax, torch, transformers and
# sentencepiece, but no grain, tensorflow-datasets or galore-torch (the wheel is
# imported in place: gpu_bench.py --galore-torch).
#
# Budget (GPU_CHECKS_BUDGET, default 570 s), in the order GPU_CHECKS names. The checks owed
# to issues #11 and #16 do not fit one call (each llama_1b compile takes about a minute), so
# they are two calls; the second right after the first finds the machine warm (30 s). The
# 2026-11-30 run took 316 s and 481 s (README, "GPU benchmark", third run); since then the
# GaLore step is two programs on a GPU (--refresh-programs auto), each compiled, so:
#   1. GPU_CHECKS=bench1b GPU_CHECKS_BUDGET=420 bash experiments/gpu_checks.sh (timeout 450)
#      llama_1b in one run: the peak matmul rate, GaLore (svd subspace: its refresh step is
#      issue #11's target, timed three times and then traced; exact and randomized predicted
#      from per-shape probes), a jax.profiler breakdown of its steady step (the program
#      without refresh code), the reference, AdamW, 8-bit GaLore.
#   2. GPU_CHECKS=memory7b GPU_CHECKS_BUDGET=380 bash experiments/gpu_checks.sh (timeout 400)
#      llama_7b 8-bit GaLore under a 24 GB cap: the plain program's compile time and steady
#      peak, then the refresh program's compile time, its refresh-step peak and the first
#      refresh (count 0), then a second start through the step and compilation caches (#16),
#      which loads only the plain program.
#   Later: GPU_CHECKS="train1b packed smaller sample1b oom": the trainer's own llama_1b step
#      rate (its loop overlapping the steps vs waiting for each), llama_350m and llama_60m
#      GaLore vs the reference and llama_1b's staggered subspace refresh, and the checks below.
#   GPU_CHECKS=compile1b: only the compile times of llama_1b's subspace and exact steps
#      (experiments/gpu_compile_probe.py), e.g. if the subspace step in (1) does not compile
#      in time: the subspace step with XLA's compile statistics, then without Triton GEMM
#      fusion, then exact (COMPILE_VARIANTS to choose others, e.g. "subspace:weightwise|").
#   GPU_CHECKS=compileslope: the seconds each llama_7b block adds to its 8-bit step's
#      compile (experiments/trace_time.py at 2 and 6 layers, about a minute); it fits after
#      memory7b in call 2 when that finishes early, or in any call's spare time.
#   GPU_CHECKS=train1b: the trainer's own llama_1b step rate, overlapping the next step vs
#      waiting for each (experiments/loop_overhead.py --compare-wait; about 2-3 minutes,
#      estimated: two compiles, then loaded from a cache by the second run).
#   GPU_CHECKS=sample1b: sampling speed of llama_1b (experiments/bench_sample.py); it fits
#      after memory7b and smaller in call 2 if they finish early, or in any call's spare time.
#   GPU_CHECKS=packed: packed instruction batches (several examples per row, kept apart by
#      a mask) through cuDNN's fused attention vs XLA's (experiments/gpu_packed_check.py,
#      six compiles of llama_130m, a minute or two); it fits in any call's spare time.
#   GPU_CHECKS=oom: out of memory mid-run (experiments/gpu_oom_check.py, about a minute):
#      does the failed step leave its donated inputs, so that train saves the step before?
#   GPU_CHECKS="adafactor7b clip7b": the llama_7b peak under the 24 GB cap with
#      --optimizer galore_adafactor (planned 16.70 GB with --svd subspace), then 8-bit GaLore with --grad-clip 1
#      --per-layer-clip (the clip's second backward pass); each a 7B compile (~3 minutes).
# GPU_CHECKS=bench and GPU_CHECKS=memory are the older whole-bench and memory calls.
# Each stage's figures are in $OUT as soon as its subprocess writes them.
# GPU_BENCH_ARGS adds flags (a dry run here: GPU_BENCH_ARGS="--cpu-smoke" MEMORY_ARGS=--cpu-smoke
# GPU_CHECKS_BUDGET=200 OUT=/tmp/gc bash experiments/gpu_checks.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECKS_BUDGET:-570}
MEMORY_S=${MEMORY_S:-200}
CHECKS=${GPU_CHECKS:-bench memory}

main() {
  echo "== gpu_checks: $(date -u +%FT%TZ), budget ${BUDGET} s"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader || true
  "$PY" - <<'PYEOF' || true
import importlib.util
for m in ("jax", "flax", "optax", "orbax.checkpoint", "torch", "transformers", "sentencepiece",
          "grain", "tensorflow_datasets", "galore_torch", "bitsandbytes"):
    try:
        found = importlib.util.find_spec(m) is not None
    except ModuleNotFoundError:
        found = False
    ver = ""
    if found and m in ("jax", "torch", "transformers", "flax", "optax"):
        ver = __import__(m).__version__
    print(f"  {m:<20} {'yes ' + ver if found else 'MISSING'}")
PYEOF

  WHEEL=${GALORE_TORCH:-$(ls runs/wheels/galore_torch-*.whl wheels/galore_torch-*.whl 2>/dev/null | head -n 1)}
  if [ -z "$WHEEL" ]; then
    echo "WARNING: no galore_torch wheel carried (runs/wheels/): the reference cases will fail"
  else
    echo "  galore_torch from   $WHEEL"
  fi

  for check in $CHECKS; do
    case "$check" in
      memory) memory_check ;;
      bench) bench ;;
      bench1b) bench1b ;;
      memory7b) memory7b ;;
      smaller) smaller ;;
      compile1b) compile1b ;;
      compileslope) compileslope ;;
      sample1b) sample1b ;;
      train1b) train1b ;;
      oom) oom ;;
      packed) packed ;;
      adafactor7b) variant7b adafactor7b --optimizer galore_adafactor ;;
      clip7b) variant7b clip7b --per-layer-clip ;;
      *) echo "unknown check $check (bench1b, memory7b, smaller, compile1b, compileslope, sample1b, train1b, oom, packed," \
        "adafactor7b, clip7b, bench, memory)" ;;
    esac
  done
}

# Issue #4: llama_7b and llama_1b, 8-bit GaLore, bf16, 1 x 256 tokens, 3 train steps each
# in a subprocess capped at 24 GB; planned vs measured peak_bytes_in_use, s/step.
memory_check() {
  local left=$(( BUDGET - SECONDS - 5 ))
  (( left > MEMORY_S )) && left=$MEMORY_S
  echo "== memory check (24 GB cap): at most ${left} s (elapsed ${SECONDS} s)"
  timeout "$left" "$PY" experiments/gpu_memory_check.py --cases llama_7b,llama_1b \
      --timeout $(( left - 10 )) --budget $(( left - 5 )) \
      --json "$OUT/memory_check.json" ${MEMORY_ARGS:-} || echo "== memory check rc=$?"
}

# Issue #6: galore_jax vs galore_torch + HF LLaMA, and the refresh cost.
bench() {
  local left=$(( BUDGET - SECONDS - 20 ))
  # Keep the memory check's time when it runs after this.
  [[ " $CHECKS " == *" bench "*"memory "* ]] && left=$(( left - MEMORY_S ))
  echo "== gpu_bench: ${left} s (elapsed ${SECONDS} s)"
  timeout $(( left + 15 )) "$PY" experiments/gpu_bench.py --refresh-cost \
      --models llama_1b,llama_350m,llama_60m --job-timeout 240 \
      --json "$OUT/gpu_bench.json" --time-budget "$left" ${WHEEL:+--galore-torch "$WHEEL"} \
      ${GPU_BENCH_ARGS:-}
  echo "== gpu_bench rc=$? after ${SECONDS} s"
}

left_s() { echo $(( BUDGET - SECONDS - ${1:-0} )); }

# Issues #11 and #16 at llama_1b, one run: every ratio's two sides measured together.
bench1b() {
  local left; left=$(left_s 10)
  echo "== bench1b: ${left} s (elapsed ${SECONDS} s)"
  timeout $(( left + 10 )) "$PY" experiments/gpu_bench.py --models llama_1b --svd subspace \
      --refresh-cost --refresh-variants subspace:synchronous --profile-steps 3 \
      --refresh-reps 3 --profile-refresh \
      --job-timeout 200 --time-budget "$left" --json "$OUT/gpu_bench.json" \
      ${WHEEL:+--galore-torch "$WHEEL"} ${GPU_BENCH_ARGS:-}
  echo "== bench1b rc=$? after ${SECONDS} s"
}

# Issue #11 (7B 8-bit compile <= 150 s, a refresh step that finishes under 24 GB) and #16
# (a second start through the traced-step and compilation caches reaches its first step in
# <= 15 s).
memory7b() {
  local left; left=$(left_s 10)
  (( left > ${MEMORY7B_S:-370} )) && left=${MEMORY7B_S:-370}
  echo "== memory7b: ${left} s (elapsed ${SECONDS} s)"
  rm -rf runs/jax-cache-7b
  timeout $(( left + 5 )) "$PY" experiments/gpu_memory_check.py --cases llama_7b \
      --compile-cache runs/jax-cache-7b --second-start --timeout $(( left - 60 )) \
      --budget "$left" --json "$OUT/memory_check.json" ${MEMORY_ARGS:-} \
      || echo "== memory7b rc=$?"
}

# The llama_7b memory check for another optimizer or step: variant7b NAME FLAGS...; its
# results in $OUT/memory_NAME.json.
variant7b() {
  local name=$1; shift
  local left; left=$(left_s 10)
  (( left > ${MEMORY7B_S:-370} )) && left=${MEMORY7B_S:-370}
  echo "== ${name}: ${left} s (elapsed ${SECONDS} s)"
  timeout $(( left + 5 )) "$PY" experiments/gpu_memory_check.py --cases llama_7b "$@" \
      --timeout $(( left - 5 )) --budget "$left" --json "$OUT/memory_${name}.json" \
      ${MEMORY_ARGS:-} || echo "== ${name} rc=$?"
}

# Issue #16: the llama_350m and llama_60m pairs; issue #11: llama_1b's staggered refresh.
smaller() {
  local left; left=$(left_s 10)
  echo "== smaller: ${left} s (elapsed ${SECONDS} s)"
  timeout $(( left + 10 )) "$PY" experiments/gpu_bench.py --models llama_350m,llama_60m \
      --optimizers galore_adamw --svd subspace --refresh-cost --refresh-models llama_1b \
      --refresh-variants subspace:staggered --job-timeout 150 --time-budget "$left" \
      --json "$OUT/gpu_bench_small.json" ${WHEEL:+--galore-torch "$WHEEL"} ${GPU_BENCH_ARGS:-}
  echo "== smaller rc=$? after ${SECONDS} s"
}

# llama_1b's GaLore step compiled with each refresh method, each in a fresh process: lowering
# and compile seconds, then a plain step and a refresh step (experiments/gpu_compile_probe.py).
# By default: the subspace step with XLA's per-pass compile statistics (in compile_probe.log),
# then with Triton GEMM fusion off (dots to cuBLAS: one suspect for the subspace refresh's
# matmuls compiling slowly where exact's gesvd is one custom call), then exact.
COMPILE_DEFAULT="subspace|--xla_gpu_print_compilation_stats"
COMPILE_DEFAULT+=",subspace|--xla_gpu_enable_triton_gemm=false,exact|"
compile1b() {
  local left; left=$(left_s 10)
  echo "== compile1b: ${left} s (elapsed ${SECONDS} s)"
  timeout $(( left + 10 )) "$PY" experiments/gpu_compile_probe.py \
      --variants "${COMPILE_VARIANTS:-$COMPILE_DEFAULT}" \
      --timeout 200 --budget "$left" \
      --json "$OUT/compile_probe.json" --log "$OUT/compile_probe.log" ${COMPILE_ARGS:-}
  echo "== compile1b rc=$? after ${SECONDS} s"
}

# Issue #16: the seconds each llama_7b block adds to compiling the 8-bit GaLore step (the
# program without refresh code, the one a resume compiles), measured at 2 and 6 layers
# (experiments/trace_time.py --compile; about a minute, estimated): how much of the 114 s
# grows with the 32 unrolled blocks, i.e. what compiling one block for all of them (a scan
# over stacked layers) could save. On 2 CPU cores llama_1b's step adds 1.43 s a layer.
compileslope() {
  local left; left=$(left_s 5)
  echo "== compileslope: ${left} s (elapsed ${SECONDS} s)"
  timeout "$left" "$PY" experiments/trace_time.py --model llama_7b --layers 2,6 --compile \
      --refresh not_due ${SLOPE_ARGS:-} > "$OUT/compile_slope.jsonl"
  local rc=$?
  cat "$OUT/compile_slope.jsonl"
  echo "== compileslope rc=$rc after ${SECONDS} s"
}

# Sampling llama_1b in bfloat16: no cache vs the key / value cache, one prompt at a time vs
# 8 together (experiments/bench_sample.py; about a minute, most of it compiling).
sample1b() {
  local left; left=$(left_s 5)
  echo "== sample1b: ${left} s (elapsed ${SECONDS} s)"
  timeout "$left" "$PY" experiments/bench_sample.py --model llama_1b --dtype bfloat16 \
      --json "$OUT/bench_sample.json" ${SAMPLE_ARGS:-}
  echo "== sample1b rc=$? after ${SECONDS} s"
}

# Issue #16: the trainer's own step rate at llama_1b (what `galore-jax train` gives), as it
# runs now (the next step dispatched before the last one's metrics are read) and waiting for
# each step, as it did before, in one process (experiments/loop_overhead.py; synthetic
# tokens, no evaluation or checkpoint; two compiles, the second run loads them from a cache).
train1b() {
  local left; left=$(left_s 5)
  echo "== train1b: ${left} s (elapsed ${SECONDS} s)"
  timeout "$left" "$PY" experiments/loop_overhead.py --real-step --compare-wait \
      --synthetic-data --steps 60 --json "$OUT/train1b.json" ${TRAIN1B_LOOP_ARGS:-} -- \
      --model llama_1b --dtype bfloat16 --param-dtype bfloat16 --rank 512 \
      --update-proj-gap 200 --lr 1e-4 ${TRAIN1B_ARGS:-}
  echo "== train1b rc=$? after ${SECONDS} s"
}

# Packed instruction batches through cuDNN's fused attention, the mask as a bias
# (experiments/gpu_packed_check.py, llama_130m, 8 x 1024, bf16; six compiles, a minute or two): is
# cuDNN used, do its logits equal XLA's and each example's alone, and at what speed.
packed() {
  local left; left=$(left_s 5)
  echo "== packed: ${left} s (elapsed ${SECONDS} s)"
  timeout "$left" "$PY" experiments/gpu_packed_check.py --json "$OUT/packed_check.json" \
      ${PACKED_ARGS:-}
  echo "== packed rc=$? after ${SECONDS} s"
}

# Out of device memory mid-run (experiments/gpu_oom_check.py): llama_130m under a 10% pool,
# filled before step 4; whether the failed step left its donated inputs for train's save,
# and the resume from it (about a minute, two compiles).
oom() {
  local left; left=$(left_s 5)
  echo "== oom: ${left} s (elapsed ${SECONDS} s)"
  timeout "$left" "$PY" experiments/gpu_oom_check.py --json "$OUT/oom_check.json" ${OOM_ARGS:-}
  echo "== oom rc=$? after ${SECONDS} s"
}

main 2>&1 | tee "$OUT/gpu_checks.txt"
