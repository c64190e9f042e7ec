#!/usr/bin/env bash
# The paper's comparison at a CPU budget: pretraining methods (diffusion + BPR, diffusion alone, restorative,
# contrastive, random init) x probes (linear, non-linear), and the timestep ablation (diffusion + BPR with
# T = 10, 100, 1000), every backbone trained with the same config and number of steps
# (configs/pretrain_default.toml, STEPS steps each; only the method, BPR input or T differ).
# Training is skipped for backbones that exist (an interrupted one resumes); then one `evaluate` run over the
# 20 shared BTCV cases writes benchmarks/results/method_comparison/report.{md,json} and the ablation plots.
#   bash benchmarks/method_comparison.sh [PYTHON] [train|evaluate|all]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
PHASE=${2:-all}
DATA=${DIFFUSIONSEG_DATA:-../shared/data}
STEPS=${STEPS:-1000}
RUNS=runs/comparison_${STEPS}

train() {  # train NAME [pretrain overrides...]
    local name=$1; shift
    [ -f "$RUNS/$name/backbone.safetensors" ] && return 0
    echo "training $name ($STEPS steps)"
    "$PY" pretrain.py -- --config configs/pretrain_default.toml --output_dir "$RUNS/$name" \
        --training.steps "$STEPS" --training.progress false "$@"
}

if [ "$PHASE" != evaluate ]; then
    train diffusion_bpr_T10
    train diffusion_T10 --use_bpr false
    train restorative --method restorative --use_bpr false
    train contrastive --method contrastive --use_bpr false
    train random --method random --use_bpr false
    train diffusion_bpr_T100 --diffusion.num_timesteps 100
    train diffusion_bpr_T1000 --diffusion.num_timesteps 1000
fi
[ "$PHASE" = train ] && exit 0
