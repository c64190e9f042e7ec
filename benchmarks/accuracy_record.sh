#!/usr/bin/env bash
# Accuracy record of the shipped default backbone on the 20 shared BTCV cases (manual 13-organ labels):
# 5-fold cross-validation (the paper's regime: probes trained on 16 cases), non-linear probe, next to a
# random-init backbone of the same architecture (no pretraining, no BPR); with --fewshot also the few-shot regime
# (1, 2, 5 labeled cases).
# Every case is tested once (4 per fold). Probe settings sized for 2 CPU cores (about 45 min; few-shot, on 3 test
# cases per training-set size, 20 min more): 8 patches per training case, 200 probe steps, 48 x 128 x 128
# inference windows. With a GPU, drop the --probe.* options and add "--heads linear nonlinear".
# Each backbone's results are kept in OUT/per_backbone (--reuse): a rerun computes only what changed.
# Writes benchmarks/results/accuracy_{kfold,fewshot}/report.{md,json}.
#   bash benchmarks/accuracy_record.sh [PYTHON] [--fewshot]
#   bash benchmarks/accuracy_record.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
DATA=${DIFFUSIONSEG_DATA:-../shared/data}
RANDOM_BACKBONE=runs/random_default/backbone.safetensors
[ -f "$RANDOM_BACKBONE" ] || "$PY" pretrain.py -- --config configs/pretrain_default.toml --method random \
    --use_bpr false --run-dir runs/random_default
PROBE=(--probe.steps 200 --probe.patches_per_volume 8 --probe.val_every 50 --probe.window_vox "[48,128,128]")
"$PY" -m DiffusionSegLib.cli evaluate --data "$DATA/btcv" --regime kfold --folds 5 \
    --largest-component --heads nonlinear --reuse \
    --backbone "diffusion+BPR (default)=Resources/Models/backbone_default.safetensors" \
    --backbone "random init=$RANDOM_BACKBONE" "${PROBE[@]}" -o benchmarks/results/accuracy_kfold
[ "${2:-}" = "--fewshot" ] || exit 0
"$PY" -m DiffusionSegLib.cli evaluate --data "$DATA/btcv" --regime fewshot --shots 1 2 5 --max-test-cases 3 \
    --largest-component --heads nonlinear --reuse \
    --backbone "diffusion+BPR (default)=Resources/Models/backbone_default.safetensors" \
    --backbone "random init=$RANDOM_BACKBONE" "${PROBE[@]}" -o benchmarks/results/accuracy_fewshot
