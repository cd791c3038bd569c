#!/usr/bin/env bash
# One device call (about 4 min): the card and versions; TResNet-M's bf16 train step at 448 px
# (K = 1 step per call) and at 224 px (K = 1 and K = 10 steps per call, the training loop's
# lax.scan), each profiled; PyTorch/timm TResNet-M bf16 and bf16 + torch.compile at 448 px and
# bf16 at 224 px in the same call; then, while time is left, the other sections; and a table of
# JAX/PyTorch ratios. Measured on 2026-11-27: compiling one backbone's 448 px train step takes
# about 50 s on the H100 machine even when four compile in parallel (184.6 s wall for four), so
# the other backbones (BENCH_MODELS=resnet101,...), fp32 (BENCH_DTYPES=float32) and the ML-WGAN
# benchmark (DEVICE_CHECK_SECTIONS=wgan) need a call of their own.
#
#   device:  bash scripts/device_check.sh        (carry .whl and .bench; writes under $OUT)
#   here, before: bash scripts/device_wheels.sh  (fills .whl/)
#   CPU dry run of every section at tiny sizes:
#            DEVICE_CHECK_DRY_RUN=1 OUT=/tmp/out bash scripts/device_check.sh
#
# $OUT receives check.log (everything), results.jsonl (every JSON measurement line, ours and
# PyTorch's, with the profile summaries), summary.md (the ratio table and the profiles' top
# kernels) and up to three perfetto traces (trace_*.json.gz, open in ui.perfetto.dev). Each section runs under its own timeout,
# sized from a deadline, so one failure or overrun does not lose the rest; the sections most
# needed for the issue's targets run first.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/device_check}
DRY_RUN=${DEVICE_CHECK_DRY_RUN:-0}
mkdir -p "$OUT"
LOG=$OUT/check.log
RESULTS=$OUT/results.jsonl
SUMMARY=$OUT/summary.md
: >"$LOG"
: >"$RESULTS"
export PYTHONUNBUFFERED=1
START=$SECONDS

note() { echo "=== [$((SECONDS - START)) s] $*" | tee -a "$LOG"; }

# section CAP_S NAME CMD...: run CMD under timeout min(CAP_S, time left before the deadline);
# stdout and stderr go to the log, JSON lines on stdout also to results.jsonl.
section() {
  local cap=$(($1 * CAP_SCALE)) name=$2
  shift 2
  local left=$((DEADLINE_S - (SECONDS - START)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 10)); then
    note "SKIP $name: only ${left} s left before the ${DEADLINE_S} s deadline"
    return 0
  fi
  note "BEGIN $name (timeout ${limit} s)"
  local begin=$SECONDS
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOG" | { grep --line-buffered '^{' >>"$RESULTS" || true; }
  local status=${PIPESTATUS[0]}
  local took=$((SECONDS - begin))  # 137 is also an out-of-memory kill: a timeout only past it
  note "END $name: exit $status$( ((status == 124 || (status == 137 && took >= limit))) && echo ' (TIMED OUT)') after $took s"
}

if [[ $DRY_RUN == 1 ]]; then
  PY=${PYTHON:-.venv/bin/python}
  export PYTHONPATH=$PWD
  export JAX_PLATFORMS=cpu
  TRAIN_ARGS=(--models "${BENCH_MODELS:-resnet18}" --dtypes float32 --batch 2 --warmup 1 --steps 2 --repeats 1 --batches-on-device 2)
  RES_LARGE=64 RES_SMALL=32
  WGAN_ARGS=(--pairs 2 --dtypes float32 --iterations 3 --repeats 1 --width 4)
  TORCH_ARGS=(--batch 2 --warmup 1 --steps 2 --repeats 1)
  TORCH_WGAN_ARGS=(--warmup 1 --steps 1)
  TORCH_MAIN_MODES=fp32,bf16
  PROFILE_MODELS=${BENCH_MODELS:-resnet18}
  TESTS_ARGS=(--collect-only -q)
  STREAM_ARGS=(--data "${COREL5K_DIR:-.corel}" --threads 1,2 --batches 2)
  CHECKPOINT_ARGS=(--models "${BENCH_MODELS:-resnet18}" --saves 2)
  CAP_SCALE=4  # this CPU compiles the WGAN for minutes
  note "DRY RUN on the CPU at tiny sizes; wheels not installed"
else
  PY=${PYTHON:-python3}
  note "install carried wheels"
  source scripts/device_env.sh
  TRAIN_ARGS=(--models "${BENCH_MODELS:-tresnet_m}" --dtypes "${BENCH_DTYPES:-bfloat16}")
  RES_LARGE=448 RES_SMALL=224
  # the ML-WGAN issue's measurement: float32 at two K (bfloat16 too would double the compiles)
  WGAN_ARGS=(--pairs "${WGAN_PAIRS:-32,96}" --dtypes "${WGAN_DTYPES:-float32}")
  TORCH_ARGS=()
  TORCH_WGAN_ARGS=(--warmup 3 --steps 20)  # 23 iterations, about 2 s at the H100's 77 ms
  TORCH_MAIN_MODES=${TORCH_MODES:-bf16,bf16compile}
  TESTS_ARGS=(-q -x -p no:cacheprovider)
  STREAM_ARGS=(--data .corel --threads 4,8,16)
  CHECKPOINT_ARGS=(--models tresnet_m --saves 5)
  CAP_SCALE=1
fi

# DEVICE_CHECK_SECTIONS picks sections: train,torch,torch_small_compile,tests,torch_others,
# depthwise,others,heads,wgan,stream,checkpoint
SECTIONS=",${DEVICE_CHECK_SECTIONS:-train,torch,torch_small_compile},"
wanted() { [[ $SECTIONS == *",$1,"* ]]; }

# the device call is sized for 4 min: keep a margin; the dry run's CPU is far slower
DEADLINE_S=${DEVICE_CHECK_DEADLINE_S:-$((270 * CAP_SCALE))}
note "machine"
{ nvidia-smi || echo "no nvidia-smi"; } 2>&1 | tee -a "$LOG"
section 60 "card and versions" "$PY" scripts/machine_info.py

# Profiles (jax.profiler traces + compiled HLO) go to a scratch folder: $OUT returns only 8 files,
# 2 folders deep. Their summaries (busy time per stream, top kernels) are JSON lines in
# results.jsonl; the perfetto traces are copied into $OUT at the end.
PROFILE_DIR=${TMPDIR:-/tmp}/device_check_profile
rm -rf "$PROFILE_DIR"

# 1. The seed's 448 px: JAX's train step at one step per call (compile, timing, a profile of 3
#    calls), then PyTorch bf16 and bf16 + torch.compile on the same card.
# 2. 224 px: JAX at 1 and 10 steps per call (K = 10 is what the training loop dispatches; both
#    compile together in one process), each profiled; PyTorch bf16; then, as time allows,
#    PyTorch bf16 + torch.compile (its own section, the first to go when time runs short).
wanted train && section 110 "benchmark train ${RES_LARGE} px" "$PY" scripts/benchmark.py train \
  "${TRAIN_ARGS[@]}" --res "$RES_LARGE" --steps-per-call 1 \
  --profile-dir "$PROFILE_DIR" --profile-models "${PROFILE_MODELS:-tresnet_m}"
wanted torch && section 100 "torch reference tresnet_m ${RES_LARGE} px" "$PY" \
  .bench/torch_reference.py throughput --model tresnet_m --modes "$TORCH_MAIN_MODES" \
  --res "$RES_LARGE" "${TORCH_ARGS[@]}"
wanted train && section 100 "benchmark train ${RES_SMALL} px" "$PY" scripts/benchmark.py train \
  "${TRAIN_ARGS[@]}" --res "$RES_SMALL" --steps-per-call 1,10 \
  --profile-dir "$PROFILE_DIR" --profile-models "${PROFILE_MODELS:-tresnet_m}"
wanted torch && section 40 "torch reference tresnet_m ${RES_SMALL} px" "$PY" \
  .bench/torch_reference.py throughput --model tresnet_m --modes bf16 --res "$RES_SMALL" \
  "${TORCH_ARGS[@]}"
wanted torch_small_compile && section 70 "torch reference tresnet_m ${RES_SMALL} px compiled" \
  "$PY" .bench/torch_reference.py throughput --model tresnet_m --modes bf16compile \
  --res "$RES_SMALL" "${TORCH_ARGS[@]}"

# 3. ML-WGAN throughput at several K (GPU memory: about 0.3 GB of parameters + Adam per pair), at
#    JAX's default memory fraction, as `python -m wgan.run` runs; then the seed's own loop (one
#    image at a time, torch_reference.py wgan) on the same card, for the speed-up.
wanted wgan && section 120 "benchmark wgan" "$PY" scripts/benchmark.py wgan "${WGAN_ARGS[@]}" \
  --profile-dir "$PROFILE_DIR"
wanted wgan && section 30 "torch reference wgan (the seed's loop)" "$PY" \
  .bench/torch_reference.py wgan "${TORCH_WGAN_ARGS[@]}"

# 4. GPU-relevant tests: model parity with timm (f32 at full precision: GPU convs default to
#    TF32), losses, the train step. No preallocation: pytest and torch share the card.
TESTS=()
for test_file in tests/test_models_tresnet.py tests/test_losses.py tests/test_train.py; do
  [[ -f $test_file ]] && TESTS+=("$test_file")
done
wanted tests && JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false \
  section 50 tests "$PY" -m pytest "${TESTS_ARGS[@]}" "${TESTS[@]}"

# 5a. Xception's depthwise convolutions both ways at the seed's size (docs/results.md: its 0.63x
#    of PyTorch + torch.compile, and the prediction for the shifted products): JAX's train step
#    with DepthwiseConv2d as "taps" and as "grouped" (the two compile together, about 75 s on the
#    H200), each profiled, then PyTorch bf16 and bf16 + torch.compile of Xception, so that both
#    ratios and the old/new comparison come from one call. DEVICE_CHECK_SECTIONS=depthwise; it
#    runs before "others", which it is meant to share a call with (and which then leaves
#    Xception out).
wanted depthwise && section "${DEPTHWISE_JAX_CAP_S:-170}" "benchmark train xception depthwise ${RES_LARGE} px" \
  "$PY" scripts/benchmark.py train "${TRAIN_ARGS[@]}" --models xception --res "$RES_LARGE" \
  --steps-per-call 1 --depthwise taps,grouped --profile-dir "$PROFILE_DIR" --profile-models xception
wanted depthwise && section "${DEPTHWISE_TORCH_CAP_S:-110}" "torch reference xception ${RES_LARGE} px" \
  "$PY" .bench/torch_reference.py throughput --model xception --modes "$TORCH_MAIN_MODES" \
  --res "$RES_LARGE" "${TORCH_ARGS[@]}"

# 5. The other three backbones at the seed's size: per backbone, JAX's train step in a process of
#    its own, then PyTorch bf16 and bf16 + torch.compile of the same backbone, so that each ratio
#    is measured in one call. DEVICE_CHECK_SECTIONS=others (BENCH_OTHERS picks the backbones).
#    JAX's section has OTHERS_JAX_CAP_S (100 s): TResNet-M's process took 46 s from the start of
#    its experiment to a compiled 448 px step on the H200 (train_compile's wall_s), after
#    the imports and before the timing, and a deeper backbone compiles longer; its one line comes
#    only at the end, so a cap hit leaves nothing. PyTorch's has OTHERS_TORCH_CAP_S (110 s):
#    eager takes seconds and prints first, torch.compile of TResNet-M took 75 s on the H200. The
#    caps add up to 3 x (100 + 110) = 630 s for all three: run them in a call of their own with
#    DEVICE_CHECK_DEADLINE_S=570; the last section (xception's torch.compile) gets what is left.
IFS=, read -r -a OTHER_MODELS <<<"${BENCH_OTHERS:-resnet101,resnext50_32x4d,xception}"
wanted depthwise && OTHER_MODELS=("${OTHER_MODELS[@]/xception/}")  # timed by its own section
for model in "${OTHER_MODELS[@]}"; do
  [[ -n $model ]] || continue
  wanted others && section "${OTHERS_JAX_CAP_S:-100}" "benchmark train $model ${RES_LARGE} px" \
    "$PY" scripts/benchmark.py train "${TRAIN_ARGS[@]}" --models "$model" \
    --res "$RES_LARGE" --steps-per-call 1
  wanted others && section "${OTHERS_TORCH_CAP_S:-110}" "torch reference $model ${RES_LARGE} px" "$PY" \
    .bench/torch_reference.py throughput --model "$model" --modes "$TORCH_MAIN_MODES" \
    --res "$RES_LARGE" "${TORCH_ARGS[@]}"
done

# 6. The heads' cost in train-step time: TResNet-M at 224 px, 10 steps per call, the linear
#    head beside ML-Decoder and CSRA in one process. DEVICE_CHECK_SECTIONS=heads
wanted heads && section 150 "benchmark train heads ${RES_SMALL} px" "$PY" scripts/benchmark.py \
  train "${TRAIN_ARGS[@]}" --res "$RES_SMALL" --steps-per-call "${HEADS_STEPS_PER_CALL:-10}" \
  --heads linear,ml_decoder,csra

# 7. If time is left: PyTorch bf16 for the other backbones (about 20 s each on an H100).
for model in resnet101 resnext50_32x4d xception; do
  wanted torch_others && section 40 "torch reference $model" "$PY" .bench/torch_reference.py throughput \
    --model "$model" --modes bf16 "${TORCH_ARGS[@]}"
done

# 8. The "stream" input pipeline's decoding on the device machine's CPU cores, to set beside the
#    train step's images/s (carry .corel and a .whl with grain: scripts/device_wheels.sh).
#    DEVICE_CHECK_SECTIONS=stream
wanted stream && section 90 "benchmark stream" "$PY" scripts/benchmark.py stream \
  "${STREAM_ARGS[@]}" --res "$RES_LARGE,$RES_SMALL"

# 9. The training loop's checkpoint saves on the device machine's disk and cores: TResNet-M's
#    TrainState packed (as the loop saves it) and an orbax array per leaf (as before), with and
#    without zstd. DEVICE_CHECK_SECTIONS=checkpoint
wanted checkpoint && section 90 "benchmark checkpoint" "$PY" scripts/benchmark.py checkpoint \
  "${CHECKPOINT_ARGS[@]}"

# at most 3 traces (of $OUT's 8 files), each under the 16 MiB a returned file may have
find "$PROFILE_DIR" -name perfetto_trace.json.gz -size -15M 2>/dev/null | head -3 | while read -r trace; do
  name=${trace#"$PROFILE_DIR"/}
  cp "$trace" "$OUT/trace_${name%%/*}.json.gz"
done

note "report"
timeout 30 "$PY" scripts/benchmark.py report "$RESULTS" 2>&1 | grep -v '^{' >"$SUMMARY"
tee -a "$LOG" <"$SUMMARY"
note "done in $((SECONDS - START)) s; files: $(ls "$OUT" | tr '\n' ' ')"
