#!/usr/bin/env bash
# One device call (211 s on the H200 of 2026-11-27, from start to results):
# PyTorch reference's recipe (configs/reference_tresnet_asl_224.py), then its test metrics beside
# the reference's (torch_reference.py train on one H100: per-class F1 0.333, per-image F1 0.494,
# N+ 148 at 0.5; 0.327 / 0.528 / 133 with MCC thresholds; 6.2 s per epoch).
#
#   device:  bash scripts/device_train.sh   (carry .whl and .corel, a copy of the Corel-5k folder)
#   CPU dry run:
#     DEVICE_TRAIN_DRY_RUN=1 COREL5K_DATA=/work/shared/corel5k OUT=/tmp/out \
#       TRAIN_OVERRIDES="--config.model.name=resnet18 --config.data.image_size=32 \
#       --config.train.epochs=1" bash scripts/device_train.sh
#
# With TORCH_TRAIN_EPOCHS=N (carry .bench too) the PyTorch reference first trains N epochs of the
# same recipe in the same call (`torch_reference.py train`; its median epoch is the speed anchor,
# measured on the same card), capped at TORCH_TRAIN_TIMEOUT_S.
# TRAIN_DEADLINE_S (default 570) bounds the whole script from its start: the training's timeout
# is what is left of it (at most TRAIN_TIMEOUT_S) less 20 s for the copies and the summary, so
# a device call's limit never cuts those off. Two runs in one call: give each its own OUT and
# half the call, e.g. `for head in csra linear; do OUT=$OUT/$head TRAIN_DEADLINE_S=285
# TRAIN_OVERRIDES="--config.model.head=$head" bash scripts/device_train.sh; done`.
# The console shows the run without progress bars and orbax's INFO lines; train.log has all.
# $OUT receives two files, so that two runs, or one beside a device_check.sh call, fit the 8
# files a device call returns: measurements.jsonl (the card and versions, the reference's JSON
# line, our run's summary lines) and run.tar.gz (train.log, results.json, results.md,
# metrics.jsonl, summary.md: extract it into docs/measurements/<date>-<card>-train/ beside
# <date>-<card>-train.jsonl). Until the tar is made they lie in $OUT/run/. An OUT that already
# holds a run is refused (the second run would overwrite it).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/device_train}
DATA=${COREL5K_DATA:-.corel}
WORKDIR=${TRAIN_WORKDIR:-/tmp/run}
TIMEOUT_S=${TRAIN_TIMEOUT_S:-540}
DEADLINE_S=${TRAIN_DEADLINE_S:-570}
OVERRIDES=${TRAIN_OVERRIDES:-}
if [[ -e $OUT/measurements.jsonl || -e $OUT/run ]]; then
  echo "ERROR: $OUT already holds a run; give each run an OUT of its own" >&2
  exit 2
fi
RUN_FILES=$OUT/run
mkdir -p "$RUN_FILES"
LOG=$RUN_FILES/train.log
: >"$LOG"
export PYTHONUNBUFFERED=1
START=$SECONDS
note() { echo "=== [$((SECONDS - START)) s] $*" | tee -a "$LOG"; }

if [[ ${DEVICE_TRAIN_DRY_RUN:-0} == 1 ]]; then
  PY=${PYTHON:-.venv/bin/python}
  export PYTHONPATH=$PWD JAX_PLATFORMS=cpu
  note "DRY RUN on the CPU; wheels not installed"
else
  PY=${PYTHON:-python3}
  note "install carried wheels"
  source scripts/device_env.sh
  { nvidia-smi || echo "no nvidia-smi"; } 2>&1 | tee -a "$LOG"
fi
if [[ ! -f $DATA/train.json ]]; then
  note "ERROR: no Corel-5k at $DATA (train.json missing): copy /work/shared/corel5k to .corel/ and carry it, or set COREL5K_DATA"
  exit 2
fi
MEASUREMENTS=$OUT/measurements.jsonl
"$PY" scripts/machine_info.py 2>>"$LOG" | tee -a "$LOG" >"$MEASUREMENTS"
TORCH_EPOCHS=${TORCH_TRAIN_EPOCHS:-0}
if ((TORCH_EPOCHS > 0)); then
  note "PyTorch reference: $TORCH_EPOCHS epochs of the same recipe (timeout ${TORCH_TRAIN_TIMEOUT_S:-90} s)"
  timeout --kill-after=5 "${TORCH_TRAIN_TIMEOUT_S:-90}" "$PY" .bench/torch_reference.py train \
    --data "$DATA" --res "${TORCH_TRAIN_RES:-224}" --epochs "$TORCH_EPOCHS" 2>&1 | tee -a "$LOG" |
    { grep --line-buffered '^{' >>"$MEASUREMENTS" || true; }
  note "PyTorch reference exit ${PIPESTATUS[0]}"
fi

LEFT=$((DEADLINE_S - (SECONDS - START) - 20))  # 20 s for the copies and the summary below
TIMEOUT_S=$((TIMEOUT_S < LEFT ? TIMEOUT_S : LEFT))
if ((TIMEOUT_S < 30)); then
  note "ERROR: only $TIMEOUT_S s left for training before the ${DEADLINE_S} s deadline"
  exit 2
fi
note "train + evaluate: configs/reference_tresnet_asl_224.py $OVERRIDES (timeout $TIMEOUT_S s)"
rm -rf "$WORKDIR"
# shellcheck disable=SC2086  # OVERRIDES is a list of flags
timeout --kill-after=10 "$TIMEOUT_S" "$PY" -m annotate.main \
  --config=configs/reference_tresnet_asl_224.py --workdir="$WORKDIR" \
  --config.data.root="$(cd "$DATA" && pwd)" --config.data.cache_dir=/tmp/annotate_cache \
  $OVERRIDES 2>&1 | tr '\r' '\n' | tee -a "$LOG" |
  awk '(!/^[IWE][0-9][0-9][0-9][0-9] / || / (train|main|evaluate|training_log)\.py:/) && !/%\|/'
note "training exit ${PIPESTATUS[0]} after $((SECONDS - START)) s"

for name in results.json results.md metrics.jsonl; do
  [[ -f $WORKDIR/$name ]] && cp "$WORKDIR/$name" "$RUN_FILES/"
done

"$PY" scripts/results_tables.py --record-run "$WORKDIR" "$MEASUREMENTS" --overrides="$OVERRIDES" 2>&1 |
  tee "$RUN_FILES/summary.md" | tee -a "$LOG"
note "done in $((SECONDS - START)) s; packed: $(ls "$RUN_FILES" | tr '\n' ' ')"
tar -czf "$OUT/run.tar.gz" -C "$RUN_FILES" . && rm -rf "$RUN_FILES"
ls -l "$OUT"
