#!/usr/bin/env bash
# The README's main command: set up .venv, build the SYNTHETIC LIDC demo data, train the
# LIDC bundle with demo.json, evaluate it, and say where everything is. 5-9 min on 2 idle CPU cores (CPU-dependent).
set -euo pipefail

# "--resume True" when the run folder holds a resume checkpoint (a finished demo run then
# completes at once, an interrupted one continues); nothing for a fresh run, which therefore
# logs resume=False. Sourcing this file defines the function without running the demo.
resume_args() {
    local f
    for f in "$1"/checkpoints/resume_checkpoint_*.pt; do
        if [ -f "$f" ]; then
            echo "--resume True"
            return
        fi
    done
}

# What step 1 does with the demo data folder $1 for item size $2: "reuse" (a demo data set of
# that size), "rebuild <size>" (one of another size, from an earlier version), "build" (none;
# preprocessing.demo itself refuses a folder holding anything else). Needs $PY.
data_action() {
    local have
    have="$($PY -c 'import json, sys; print(json.load(open(sys.argv[1])).get("image_size", ""))' "$1/datalist.json" 2>/dev/null || true)"
    if [ "$have" = "$2" ]; then
        echo "reuse"
    elif [ -n "$have" ]; then
        echo "rebuild $have"
    else
        echo "build"
    fi
}

main() {
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python
export PYTHONWARNINGS="ignore"

data_dir="$($PY -c 'import monai_hsrdiff.bundle as b; print(b.default_dataset_dir("lidc", demo=True))')"
run_dir="$($PY -c 'import monai_hsrdiff.bundle as b; print(b.default_run_dir("lidc", "demo"))')"
train="['bundles/lidc/train.json','bundles/lidc/demo.json']"
evaluate="['bundles/lidc/train.json','bundles/lidc/evaluate.json','bundles/lidc/demo.json']"

# the item size demo.json trains at; a demo data set of another size (an earlier version's) is
# rebuilt: preprocessing.demo --overwrite replaces only a folder it recognises as its own output
size="$($PY -c 'import json; print(json.load(open("bundles/lidc/demo.json"))["image_size"])')"
echo "== 1/4 building the demo data set (SYNTHETIC CT-like images around real LIDC reader contours, ${size}x${size}) in $data_dir"
read -r action have <<<"$(data_action "$data_dir" "$size")"
case "$action" in
    reuse) echo "   already there; reusing it" ;;
    rebuild)
        echo "   there at ${have}x${have}, but demo.json trains at ${size}x${size}: rebuilding it"
        $PY -m preprocessing.demo --task lidc --out "$data_dir" --size "$size" --overwrite ;;
    *) $PY -m preprocessing.demo --task lidc --out "$data_dir" --size "$size" ;;
esac

echo "== 2/4 training (bundles/lidc/train.json + demo.json) -> $run_dir"
# shellcheck disable=SC2046  # resume_args prints nothing or two words
$PY -m monai.bundle run training --config_file "$train" $(resume_args "$run_dir")

echo "== 3/4 evaluating the best checkpoint on the demo test split"
$PY -m monai.bundle run evaluating --config_file "$evaluate"

echo "== 4/4 exporting one demo case for 3D Slicer (a SYNTHETIC source volume made from a test item)"
$PY -m monai_hsrdiff.export.demo_case --task lidc

ui="$($PY -c 'import sys, monai_hsrdiff.tracking as t; print(t.ui_command(sys.argv[1]))' "$run_dir")"
url="$($PY -c 'import sys, monai_hsrdiff.tracking as t; print(t.local_runs_url(sys.argv[1], "hsrdiff_lidc") or "http://127.0.0.1:5000")' "$run_dir")"
cat <<MSG

Done. Everything below is from SYNTHETIC demo images: the numbers say the pipeline works,
not how HSRDiff does on real CT (see bundles/lidc/docs/README.md for the real-data recipe).
  checkpoints : $run_dir/checkpoints/ (model.pt = best GED16 on validation)
  metrics     : $run_dir/eval/metrics.json
  3D Slicer   : drag the files of the folder printed in step 4 into Slicer (docs/slicer.md)
  MLflow UI   : $ui
                (works in any shell: it names this venv's mlflow), then open the runs of
                experiment hsrdiff_lidc: $url   (docs/tracking.md)
MSG
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
