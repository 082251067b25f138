#!/usr/bin/env bash
# rm_exp.sh NAME DATA LONG [overrides...]: the demo's personalized RM (configs/demo/rm.yaml) and its vanilla baseline
# (uniform user model, alpha 1, 45 steps, as pipelines.demo's rm_vanilla) trained on DATA/train.jsonl with the
# overrides, each scored on DATA/eval.jsonl (held out) and on LONG/eval.jsonl (answers 2-3x longer than training's).
# Writes runs/exp/NAME/{rm,rm_vanilla} and runs/exp/NAME.summary.
set -eo pipefail  # a failed stage inside the `| tee` loop must fail the script
cd "$(dirname "$0")/.."
NAME=$1; DATA=$2; LONG=$3; shift 3
OUT=runs/exp/$NAME
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT
for run in rm rm_vanilla; do
  extra=(); [ $run = rm_vanilla ] && extra=(user_model.kind=uniform loss.alpha=1.0 train.max_steps=45)
  t0=$(date +%s)
  .venv/bin/python -m pipelines.train_rm --config configs/demo/rm.yaml output_dir=$OUT/$run \
    data.train_path=$DATA/train.jsonl data.eval_path=$DATA/eval.jsonl report_to=none "$@" "${extra[@]}" > $OUT/$run.log 2>&1
  .venv/bin/python -m pipelines.evaluate --run $OUT/$run --data $LONG/eval.jsonl --out $OUT/$run/eval_long \
    eval.n_generation_prompts=0 report_to=none >> $OUT/$run.log 2>&1
  echo "$OUT/$run: $(( $(date +%s) - t0 )) s"
  .venv/bin/python - $OUT/$run <<'PY'
import json, sys
run = sys.argv[1]
for name, path in (("held-out", f"{run}/metrics.json"), ("long set", f"{run}/eval_long/metrics.json")):
    m = json.load(open(path))
    print(f"  {name}: " + ", ".join(f"{g} {v['accuracy']:.3f} (margin {v['mean_margin']:.2f})"
                                     for g, v in m["per_group"].items())
          + f", generic {m['generic']['accuracy']:.3f}")
PY
done | tee $OUT.summary
