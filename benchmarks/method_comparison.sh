#!/usr/bin/env bash
# The paper's comparison at a CPU budget: pretraining methods (diffusion + BPR, diffusion alone, restorative,
# contrastive, random init) x probes (linear, spatial context), and the timestep ablation (diffusion + BPR with T = 10
# and each T in $ABLATION_T), every backbone trained with the same config and number of steps
# (configs/pretrain_default.toml, $STEPS steps each; only the method, the BPR input or T differ).
# Training is skipped for backbones that exist (an interrupted one resumes); then one `evaluate` run over the
# 20 shared BTCV cases writes benchmarks/results/method_comparison_${STEPS}/report.{md,json} and the ablation plots.
# Each backbone's results are kept in benchmarks/results/method_comparison_${STEPS}/per_backbone (evaluate --reuse): a
# rerun evaluates only backbones (or settings) it has not seen, so adding a T to $ABLATION_T costs one backbone.
# The few-shot regime (phase `fewshot`, part of `all`): the five methods' T = 10 backbones, context probes trained
# on 1, 2 and 5 labeled cases, 3 other cases tested per size -> benchmarks/results/method_comparison_fewshot_${STEPS}.
#   bash benchmarks/method_comparison.sh [PYTHON] [train|evaluate|fewshot|all]
#   STEPS=4000 ABLATION_T="100 1000" bash benchmarks/method_comparison.sh .venv/bin/python
# Results go to benchmarks/results/method_comparison_${STEPS} (and _fewshot_${STEPS}); the folders without a step
# count hold the first run (1000 steps; linear and 1x1x1 non-linear heads, 100 probe steps).
# BPR=FILE pretrains the BPR backbones with that BPR (default: the shipped default); the recorded results were
# made with BPR=Resources/Models/bpr_patch_v1.safetensors, the default until 2026-11-30.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
PHASE=${2:-all}
DATA=${DIFFUSIONSEG_DATA:-../shared/data}
STEPS=${STEPS:-4000}
ABLATION_T=${ABLATION_T:-100 1000}
RUNS=${RUNS:-benchmarks/results/method_comparison_${STEPS}/backbones}  # kept on disk (not tracked): a rerun reuses or resumes them
BPR=${BPR:-}
OUT=benchmarks/results/method_comparison_${STEPS}
FEWSHOT_OUT=benchmarks/results/method_comparison_fewshot_${STEPS}
HEADS=${HEADS:-linear context}

train() {  # train NAME [pretrain overrides...]
    local name=$1; shift
    [ -f "$RUNS/$name/backbone.safetensors" ] && return 0
    echo "training $name ($STEPS steps)"
    "$PY" pretrain.py -- --config configs/pretrain_default.toml --run-dir "$RUNS/$name" \
        --training.steps "$STEPS" --training.progress false ${BPR:+--bpr_weights "$BPR"} "$@"
}

if [ "$PHASE" != evaluate ]; then
    train diffusion_bpr_T10
    train diffusion_T10 --use_bpr false
    train restorative --method restorative --use_bpr false
    train contrastive --method contrastive --use_bpr false
    train random --method random --use_bpr false
    for T in $ABLATION_T; do train "diffusion_bpr_T$T" --diffusion.num_timesteps "$T"; done
fi
[ "$PHASE" = train ] && exit 0

METHODS=(--backbone "diffusion + BPR=$RUNS/diffusion_bpr_T10/backbone.safetensors"
         --backbone "diffusion=$RUNS/diffusion_T10/backbone.safetensors"
         --backbone "restorative=$RUNS/restorative/backbone.safetensors"
         --backbone "contrastive=$RUNS/contrastive/backbone.safetensors"
         --backbone "random init=$RUNS/random/backbone.safetensors")
BACKBONES=("${METHODS[@]}")  # + the ablation's T
for T in $ABLATION_T; do
    BACKBONES+=(--backbone "diffusion + BPR (T $T)=$RUNS/diffusion_bpr_T$T/backbone.safetensors")
done
# CPU-sized probe protocol: 1 test case per fold, 8 patches per training case; heads: the 1x1x1 linear map and
# the spatial-context head (3x3x3 blocks, 32 channels), each stopped when its held-out loss has not improved for
# 8 validations (at most 600 steps). The heads read the frozen pyramid only (no CT or coordinates next to it), so
# the rows compare the features. With a GPU, drop --max-test-cases and --probe.patches_per_volume.
PROBE=(--probe.steps 600 --probe.patience 8 --probe.val_every 25 --probe.patches_per_volume 8
       --probe.hidden_channels 32 --probe.window_vox "[48,128,128]")
if [ "$PHASE" != fewshot ]; then
    "$PY" -m DiffusionSegLib.cli evaluate --data "$DATA/btcv" --regime kfold --folds 5 --max-test-cases 1 \
        --largest-component --heads $HEADS --reuse "${BACKBONES[@]}" "${PROBE[@]}" \
        -o "$OUT"
fi
[ "$PHASE" = evaluate ] && exit 0
"$PY" -m DiffusionSegLib.cli evaluate --data "$DATA/btcv" --regime fewshot --shots 1 2 5 --max-test-cases 3 \
    --largest-component --heads context --reuse "${METHODS[@]}" "${PROBE[@]}" \
    -o "$FEWSHOT_OUT"
