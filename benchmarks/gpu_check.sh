#!/usr/bin/env bash
# The GPU check, in one call (about 8 minutes on one GPU): where the GPU's numbers come from.
#   1. environment: torch, CUDA, the device's name;
#   2. segment speed on the full-resolution CT (benchmarks/segment_speed.py --device cuda, float32 and bfloat16);
#   3. a cohort fine-tune on one few-shot draw (2 labeled BTCV scans + the 5 test scans unlabeled, 2000 steps),
#      then segment and score a test scan against its manual labels;
#   4. the tests that run on CUDA (Testing/test_cuda.py) and the precision tests.
# Every stage writes into OUT (default gpu_check/): its log, its results, and summary.{md,json} with each
# stage's status and seconds. A stage whose data is missing is skipped and says so (a GPU machine may receive the
# repository without the BTCV scans). --tiny runs the same stages on the CPU in a minute or two with the bundled
# sample CT and a few steps (the test suite runs it, so the script cannot rot).
#   bash benchmarks/gpu_check.sh [--tiny] [OUT]
set -uo pipefail
cd "$(dirname "$0")/.."
TINY=0
OUT=gpu_check
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) OUT=$arg ;;
  esac
done
PY=${PY:-.venv/bin/python}
DATA=${DIFFUSIONSEG_DATA:-../shared/data}
mkdir -p "$OUT"
: > "$OUT/stages.tsv"
if [ "$TINY" = 1 ]; then
  DEVICE=cpu CT="$DATA/labeled/totalseg_example_ct_3mm.nii.gz" STEPS=3
  TUNE=(--spacing 8 8 8 --patch 32 32 32 --registration Affine --batch-size 1 --val-volumes 0)
  UNLABELED=("$DATA/btcv/btcv_0004_ct.nii.gz")
else
  DEVICE=cuda CT="$DATA/raw/ircadb1.01_ct_fullres.nii.gz" STEPS=2000
  TUNE=()
  UNLABELED=("$DATA"/btcv/btcv_000{4,8}_ct.nii.gz "$DATA"/btcv/btcv_00{22,26,30}_ct.nii.gz)
fi

stage() {  # stage NAME REQUIRED_FILE... -- COMMAND...: runs COMMAND into OUT/NAME.log, records status and seconds
  local name=$1; shift
  local needs=()
  while [ "$1" != "--" ]; do needs+=("$1"); shift; done
  shift
  for file in "${needs[@]}"; do
    if [ ! -e "$file" ]; then
      printf '%s\tskipped\t0\tmissing %s\n' "$name" "$file" >> "$OUT/stages.tsv"
      echo "$name: skipped (missing $file)"
      return 0
    fi
  done
  local start=$SECONDS
  if "$@" > "$OUT/$name.log" 2>&1; then
    printf '%s\tok\t%d\t\n' "$name" $((SECONDS - start)) >> "$OUT/stages.tsv"
    echo "$name: ok ($((SECONDS - start)) s)"
  else
    printf '%s\tfailed\t%d\tsee %s.log\n' "$name" $((SECONDS - start)) "$name" >> "$OUT/stages.tsv"
    echo "$name: FAILED ($((SECONDS - start)) s), see $OUT/$name.log"
    tail -n 5 "$OUT/$name.log"
  fi
}

stage environment -- "$PY" -c "
import json, platform, torch
cuda = torch.cuda.is_available()
print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'cuda_available': cuda,
                  'device': torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine()}))"

SPEED=(--device "$DEVICE" --volume "$CT" --out "$OUT")
if [ "$TINY" = 1 ]; then
  SPEED+=(--precisions float32 --skip-reference --skip-baseline --skip-cli --no-warmup)
else
  SPEED+=(--repeats 3 --skip-baseline)
fi
stage segment_speed "$CT" -- "$PY" benchmarks/segment_speed.py "${SPEED[@]}"

LABELED=(--case "$DATA/btcv/btcv_0023_ct.nii.gz" "$DATA/btcv/btcv_0023_labels.nii.gz"
         --case "$DATA/btcv/btcv_0025_ct.nii.gz" "$DATA/btcv/btcv_0025_labels.nii.gz")
stage cohort_finetune "$DATA/btcv/btcv_0023_ct.nii.gz" "$DATA/btcv/btcv_0025_labels.nii.gz" "${UNLABELED[@]}" -- \
  "$PY" -m DiffusionSegLib finetune "${LABELED[@]}" --labels-legend examples/legend.json \
  --unlabeled "${UNLABELED[@]}" --minutes 0 --steps "$STEPS" --device "$DEVICE" "${TUNE[@]}" \
  --run-dir "$OUT/cohort_run" -o "$OUT/cohort_model.safetensors"
TEST_CT=${UNLABELED[0]}
stage cohort_segment "$OUT/cohort_model.safetensors" "$TEST_CT" -- \
  "$PY" -m DiffusionSegLib segment "$TEST_CT" --probe "$OUT/cohort_model.safetensors" --device "$DEVICE" \
  --overwrite -o "$OUT/cohort_test_scan.nii.gz"
stage cohort_score "$OUT/cohort_test_scan.nii.gz" "${TEST_CT%_ct.nii.gz}_labels.nii.gz" -- "$PY" -c "
import json, sys, numpy as np, SimpleITK as sitk
from DiffusionSegLib.data.labels import BTCV_LABELS
seg = sitk.GetArrayFromImage(sitk.ReadImage(sys.argv[1])); ref = sitk.GetArrayFromImage(sitk.ReadImage(sys.argv[2]))
dice = {o.name: float(2 * ((seg == o.value) & (ref == o.value)).sum() / max((seg == o.value).sum() + (ref == o.value).sum(), 1))
        for o in BTCV_LABELS if (ref == o.value).any()}
print(json.dumps({'scan': sys.argv[2], 'mean_dice': float(np.mean(list(dice.values()))), 'dice': dice}))
" "$OUT/cohort_test_scan.nii.gz" "${TEST_CT%_ct.nii.gz}_labels.nii.gz"

stage tests -- "$PY" -m pytest -q -p no:cacheprovider Testing/test_cuda.py Testing/test_precision.py

"$PY" - "$OUT" "$TINY" <<'PYTHON'
import json, sys
from pathlib import Path

out, tiny = Path(sys.argv[1]), sys.argv[2] == "1"
stages = [dict(zip(("stage", "status", "seconds", "note"), line.split("\t"))) for line in
          (out / "stages.tsv").read_text().splitlines()]
for stage in stages:
    stage["seconds"] = int(stage["seconds"])
    log = out / f"{stage['stage']}.log"
    lines = log.read_text().strip().splitlines() if log.is_file() else []
    if stage["stage"] in ("environment", "cohort_score") and stage["status"] == "ok":
        stage["result"] = json.loads(lines[-1])
    elif stage["stage"] == "tests" and lines:
        stage["result"] = lines[-1]
summary = {"tiny": tiny, "stages": stages, "failed": [s["stage"] for s in stages if s["status"] == "failed"]}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
rows = [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s.get('note') or ''} |" for s in stages]
extra = [f"* {s['stage']}: `{json.dumps(s['result'])[:300]}`" for s in stages if "result" in s]
(out / "summary.md").write_text("\n".join(["# GPU check" + (" (--tiny, CPU)" if tiny else ""), "",
                                           "| stage | status | seconds | note |", "|---|---|---:|---|", *rows, "",
                                           *extra, ""]))
print((out / "summary.md").read_text())
sys.exit(1 if summary["failed"] else 0)
PYTHON
