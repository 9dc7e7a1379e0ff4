#!/usr/bin/env bash
# One report per method, each tiny preset as committed, on the quality benchmark's photo patches (4x8x8 latents
# of the committed tiny VAE, 8 classes), so the sample panel is decoded. Writes
# benchmarks/results/report-<preset>-patches-<tag>.png; the runs go to $RUNS (default /tmp/report-examples).
#   bash benchmarks/report_examples.sh cpu2xeon-20261204
# The patch data set is built by benchmarks/bench_quality.py (its cache folder is found below).
set -euo pipefail
tag=${1:?usage: report_examples.sh <machine-date tag>}
runs=${RUNS:-/tmp/report-examples}
data=$(ls -d "${LCT_FAST_CACHE:-$HOME/.cache/lct_fast}"/quality/shards-*-9ad7b759987b 2>/dev/null |
       while read -r d; do python -c "import json,sys; s=json.load(open('$d/stats.json')); sys.exit(s['count']!=32768)" && echo "$d" || true; done | head -1)
[ -n "$data" ] || { echo "report_examples: run benchmarks/bench_quality.py once first (it builds the patch data set)" >&2; exit 2; }
common=(--set "data.path=$data" --set model.num_classes=8)
for preset in tiny tiny_sct tiny_trigflow; do
  python launch/train.py --config "configs/$preset.json" "${common[@]}" --out "$runs/$preset"
done
python launch/export.py --run "$runs/tiny_trigflow"
python launch/train.py --config configs/tiny_scd.json "${common[@]}" \
  --set "method.scd.teacher=$runs/tiny_trigflow/export/ema_0.99.safetensors" --out "$runs/tiny_scd"
for preset in tiny tiny_sct tiny_trigflow tiny_scd; do
  cp "$runs/$preset/report.png" "benchmarks/results/report-$preset-patches-$tag.png"
done
