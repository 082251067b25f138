#!/usr/bin/env bash
# label_exp.sh NAME BASE [pdpo overrides...]: RM-labelled best-vs-worst pairs from pi_SFT samples, P-DPO on them,
# win rates vs pi_SFT (length judge)
set -e
cd "$(dirname "$0")/.."
NAME=$1; BASE=$2; shift 2
OUT=runs/exp/$NAME
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE
mkdir -p $OUT
t0=$(date +%s)
.venv/bin/python -m pipelines.label_pairs --policy $BASE/sft --rm $BASE/rm --prompts $BASE/data/train.jsonl \
  --out $OUT/pairs.jsonl --samples 8 --max-prompts 48 --max-new-tokens 80 --temperature 1.0 > $OUT.log 2>&1
t1=$(date +%s)
.venv/bin/python -m pipelines.train_pdpo --config configs/demo/pdpo.yaml output_dir=$OUT/pdpo model.sft_run=$BASE/sft \
  data.train_path=$OUT/pairs.jsonl data.eval_path=$BASE/data/eval.jsonl report_to=none "$@" >> $OUT.log 2>&1
t2=$(date +%s)
.venv/bin/python -m pipelines.winrate --run $OUT/pdpo --baseline $BASE/sft --prompts $BASE/data/eval.jsonl \
  --judge length:prefer_short=user_4,user_5,user_6 --out $OUT/pdpo/winrate --max-new-tokens 96 >> $OUT.log 2>&1
t3=$(date +%s)
echo "label $((t1-t0))s pdpo $((t2-t1))s winrate $((t3-t2))s" > $OUT.summary
cat $OUT/pairs.jsonl.summary.json | head -40 >> $OUT.summary
.venv/bin/python experiments/winrate_summary.py $OUT/pdpo/winrate/winrate.json >> $OUT.summary
