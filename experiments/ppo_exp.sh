#!/usr/bin/env bash
# ppo_exp.sh NAME BASE [overrides...]: PPO from BASE/sft against BASE/rm, then win rates vs pi_SFT (length judge)
set -e
cd "$(dirname "$0")/.."
NAME=$1; BASE=$2; shift 2
OUT=runs/exp/$NAME
mkdir -p runs/exp
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
.venv/bin/python -m pipelines.train_ppo --config configs/demo/ppo.yaml output_dir=$OUT model.sft_run=$BASE/sft \
  ppo.rm_run=$BASE/rm data.train_path=$BASE/data/train.jsonl data.eval_path=$BASE/data/eval.jsonl report_to=none "$@" > $OUT.log 2>&1
t1=$(date +%s)
.venv/bin/python -m pipelines.winrate --run $OUT --baseline $BASE/sft --prompts $BASE/data/eval.jsonl \
  --judge length:prefer_short=user_4,user_5,user_6 --out $OUT/winrate --max-new-tokens 96 >> $OUT.log 2>&1
t2=$(date +%s)
{ echo "$OUT: ppo $((t1-t0))s winrate $((t2-t1))s"
  .venv/bin/python experiments/winrate_summary.py $OUT/winrate/winrate.json $OUT/ppo_history.json; } | tee $OUT.summary
