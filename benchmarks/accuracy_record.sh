#!/usr/bin/env bash
# Accuracy record of the shipped default backbone on the 20 shared BTCV cases (manual 13-organ labels):
# 5-fold cross-validation (the paper's regime) and few-shot (1, 2, 5 labeled cases), linear and non-linear
# probes, next to a random-init backbone of the same architecture (no pretraining, no BPR).
# Writes benchmarks/results/accuracy_{kfold,fewshot}/report.{md,json}. About 1 h on 2 CPU cores.
#   bash benchmarks/accuracy_record.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
DATA=${DIFFUSIONSEG_DATA:-../shared/data}
RANDOM_BACKBONE=runs/random_default/backbone.safetensors
[ -f "$RANDOM_BACKBONE" ] || "$PY" pretrain.py -- --config configs/pretrain_default.toml --method random \
    --use_bpr false --output_dir runs/random_default
PROBE=(--probe.steps 300 --probe.patches_per_volume 16 --probe.val_every 50)
"$PY" -m DiffusionSegLib.cli evaluate --data "$DATA/btcv" --regime kfold --folds 5 --largest-component \
    --backbone "diffusion+BPR (default)=Resources/Models/backbone_default.safetensors" \
    --backbone "random init=$RANDOM_BACKBONE" "${PROBE[@]}" -o benchmarks/results/accuracy_kfold
"$PY" -m DiffusionSegLib.cli evaluate --data "$DATA/btcv" --regime fewshot --shots 1 2 5 --max-test-cases 5 \
    --largest-component --heads nonlinear \
    --backbone "diffusion+BPR (default)=Resources/Models/backbone_default.safetensors" \
    --backbone "random init=$RANDOM_BACKBONE" "${PROBE[@]}" -o benchmarks/results/accuracy_fewshot
