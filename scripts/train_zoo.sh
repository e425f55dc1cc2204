#!/usr/bin/env bash
# Rebuild the model zoo: train each full-protocol model, then evaluate it with the benchmark attack suite and write
# it into zoo/<name> with its card (robustserve zoo add). One model at a time, resumable (rerun the same command:
# training continues from runs/zoo-train/<name>/last.pt), niced.
#
#   scripts/train_zoo.sh                          # every model, here (CPU)
#   scripts/train_zoo.sh --set device=auto        # on a GPU: extra arguments go to every train and zoo add
#   ZOO_MODELS="smallcnn-pgd-at smallcnn-trades" scripts/train_zoo.sh
#   PGD_AT_EPOCHS=40 ZOO_EVAL_SUBSET=2000 scripts/train_zoo.sh
# Extra arguments must be keys of both `train` and `zoo add` (device, num_threads); ZOO_TRAIN_ARGS holds train-only
# ones (e.g. "--set speed.precision=fp32"), ZOO_ADD_ARGS zoo-add-only ones (e.g. "--set batch_size=2000", a larger
# evaluation batch for a classifier on a GPU: its attacks draw their randomness point by point, so the batch changes
# nothing but floating-point rounding), ZOO_DIR another zoo folder.
#
# The models (one fair protocol for the classifiers, the classifier bench's: 30 epochs per method in all, AGKD-BML's
# 10-epoch teacher included, all 60k training images, L-inf eps 0.1, the methods' own 10-step training attack of
# 0.01, SGD 0.05 with a cosine schedule, batch 128, seed 0; the embedders on robrank's
# rob28 threat model, eps 77/255, 32 steps of 3/255, SPC-2 batches of 112):
#   smallcnn-pgd-at     PGD-AT             configs/classifiers/pgd-at.yaml     PGD_AT_EPOCHS   (default 30)
#   smallcnn-trades     TRADES, beta 6     configs/classifiers/trades.yaml     TRADES_EPOCHS   (default 30)
#   smallcnn-standard   AGKD-BML's teacher configs/classifiers/standard.yaml   TEACHER_EPOCHS  (default 10; trained,
#                       not added to the zoo)
#   smallcnn-agkd-bml   AGKD-BML           configs/classifiers/agkd-bml.yaml   AGKD_EPOCHS     (default 20; with the teacher, 30 in all)
#   c2f2-hm-ics         HM + ICS           configs/embedders/hm-ics.yaml       HM_ICS_EPOCHS   (default 16)
#   c2f2-act            ACT                configs/embedders/act.yaml          ACT_EPOCHS      (default 16)
#
# What it costs (training; fp32 figures measured on this project's 2-core CPU, the fast mode (bf16 autocast +
# channels_last, the default where the CPU has native bf16) about halves them; the H200 figures were measured with
# about 15 other training and evaluation processes sharing the GPU under MPS, one CPU thread each):
#   per epoch of 60k images     2-core CPU, fp32     2-core CPU, fast mode    one H200, shared
#   PGD-AT / TRADES (PGD-10)    ~5 min / ~6 min      ~2.5 / ~3 min            ~26 s / ~28 s
#   AGKD-BML                    ~12 min              ~6 min                   ~36 s
#   standard (teacher)          ~0.5 min             ~0.3 min                 ~5 s
#   HM + ICS, ACT (PGD-32)      ~30 min              ~15 min                  ~115 s, ~90 s
# so the defaults take about 1.5 h (PGD-AT), 1.5 h (TRADES), 2 h (AGKD-BML with its teacher), 4 h each (HM + ICS,
# ACT) on a CPU with AVX-512 BF16 in the fast mode: about 13 hours in all, one model after another (about twice that
# on a CPU without native bf16, where the fast mode is fp32 + channels_last); on the H200 about 15, 15, 13, 25 and
# 30 minutes, about half an hour with the five started side by side (one ZOO_MODELS name per process).
# On a 2-core CPU with AMX (bf16 convolutions on the matrix unit) in the fast mode, measured: PGD-AT 30 epochs in
# 33 min, TRADES 30 in 35 min, the teacher 10 in 81 s and AGKD-BML 20 in 51 min, HM + ICS 16 in 99 min, ACT 16
# in 132 min: about 6 hours for the defaults.
# Evaluation (zoo add) on the full test set adds per classifier ~30-60 min here (APGD-CE-100 and APGD-T-100x9 on
# every still-robust point, a robustness curve over 5 eps and the gradient-masking checks) and per embedder the
# ranking-attack suite on 10,000 queries (about half an hour here for ACT, 198 s per 1,000; minutes on a GPU): set ZOO_EVAL_SUBSET (e.g. 2000) to
# evaluate the first N points of the seeded permutation instead. Each card states the points it was measured on.
set -euo pipefail
cd "$(dirname "$0")/.."

RS=${ROBUSTSERVE:-.venv/bin/robustserve}
RUNS=${ZOO_RUNS:-runs/zoo-train}
MODELS=${ZOO_MODELS:-smallcnn-pgd-at smallcnn-trades smallcnn-agkd-bml c2f2-hm-ics c2f2-act}
SUBSET=${ZOO_EVAL_SUBSET:-}
ZOO_DIR=${ZOO_DIR:-zoo}
read -r -a TRAIN_ARGS <<< "${ZOO_TRAIN_ARGS:-}"
read -r -a ADD_ARGS <<< "${ZOO_ADD_ARGS:-}"
NICE=${ZOO_NICE:-nice -n 10}
PGD_AT_EPOCHS=${PGD_AT_EPOCHS:-30}
TRADES_EPOCHS=${TRADES_EPOCHS:-30}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-10}
AGKD_EPOCHS=${AGKD_EPOCHS:-20}
HM_ICS_EPOCHS=${HM_ICS_EPOCHS:-16}
ACT_EPOCHS=${ACT_EPOCHS:-16}
HARDWARE=${ZOO_HARDWARE:-}
if [ -z "$HARDWARE" ]; then
  HARDWARE="$(nproc) CPU cores"
  if command -v nvidia-smi >/dev/null 2>&1; then
    HARDWARE="$HARDWARE, $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
  fi
fi

train() {  # name config epochs [extra --set ...]
  local name=$1 config=$2 epochs=$3
  shift 3
  local cmd=("$RS" train --config "$config" --set "epochs=$epochs" --set "out_dir=$RUNS/$name" "$@" "${TRAIN_ARGS[@]}" "${EXTRA[@]}")
  echo "== train $name: ${cmd[*]}"
  $NICE "${cmd[@]}"
  LAST_COMMAND="robustserve ${cmd[*]:1}"
}

add() {  # name summary [budget note]
  local name=$1 summary=$2 note=${3:-}
  local cmd=("$RS" zoo add "$RUNS/$name" --name "$name" --set overwrite=true --set "zoo_dir=$ZOO_DIR")
  [ -n "$SUBSET" ] && cmd+=(--set "subset=$SUBSET")
  echo "== zoo add $name"
  # Values with spaces or colons go through a config file (--set parses its value as YAML).
  local extra_cfg
  extra_cfg=$(mktemp)
  printf 'command: %s\nsummary: %s\ntrained_on: %s\n' "$(yaml_str "$LAST_COMMAND")" "$(yaml_str "$summary")" \
    "$(yaml_str "$HARDWARE")" > "$extra_cfg"
  [ -n "$note" ] && printf 'budget_note: %s\n' "$(yaml_str "$note")" >> "$extra_cfg"
  $NICE "${cmd[@]}" --config "$extra_cfg" "${ADD_ARGS[@]}" "${EXTRA[@]}"
  rm -f "$extra_cfg"
}

run_seconds() {  # a run's training time: the sum of its metrics.jsonl epochs' seconds
  python3 -c 'import json, sys; print(round(sum(json.loads(l).get("seconds", 0) for l in open(sys.argv[1]))))' "$1/metrics.jsonl"
}

yaml_str() { python3 -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"; }

EXTRA=("$@")
for name in $MODELS; do
  case $name in
    smallcnn-pgd-at)
      train "$name" configs/classifiers/pgd-at.yaml "$PGD_AT_EPOCHS"
      add "$name" "SmallCNN trained with PGD-AT (Madry et al.) at L-inf eps 0.1 on all 60k Fashion-MNIST images." ;;
    smallcnn-trades)
      train "$name" configs/classifiers/trades.yaml "$TRADES_EPOCHS"
      add "$name" "SmallCNN trained with TRADES (beta 6) at L-inf eps 0.1 on all 60k Fashion-MNIST images." ;;
    smallcnn-agkd-bml)
      train smallcnn-standard configs/classifiers/standard.yaml "$TEACHER_EPOCHS"
      LAST_TEACHER_COMMAND=$LAST_COMMAND
      train "$name" configs/classifiers/agkd-bml.yaml "$AGKD_EPOCHS" \
        --set "method.options.teacher=$RUNS/smallcnn-standard/model.pt"
      add "$name" "SmallCNN trained with AGKD-BML (teacher: a standard SmallCNN) at L-inf eps 0.1 on all 60k Fashion-MNIST images." \
        "The teacher is part of the budget: a standard SmallCNN trained $TEACHER_EPOCHS epochs first ($(run_seconds "$RUNS/smallcnn-standard") s, \`$LAST_TEACHER_COMMAND\`), then this student $AGKD_EPOCHS epochs: $((TEACHER_EPOCHS + AGKD_EPOCHS)) epochs in all" ;;
    c2f2-hm-ics)
      train "$name" configs/embedders/hm-ics.yaml "$HM_ICS_EPOCHS"
      add "$name" "C2F2 embedder trained with Hardness Manipulation + ICS on robrank's rob28 threat model (L-inf eps 77/255) on Fashion-MNIST." ;;
    c2f2-act)
      train "$name" configs/embedders/act.yaml "$ACT_EPOCHS"
      add "$name" "C2F2 embedder trained with ACT on robrank's rob28 threat model (L-inf eps 77/255) on Fashion-MNIST." ;;
    *)
      echo "train_zoo.sh: unknown model $name" >&2
      exit 2 ;;
  esac
done
"$RS" zoo list --set "zoo_dir=$ZOO_DIR"
