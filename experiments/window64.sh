#!/usr/bin/env bash
# Issue 5: RM and PPO with a 64-token response window (the demo's 28 tokens cut every long answer, so the RM can only
# say "no EOS in 28 tokens" and PPO never trains an EOS decision past token 28). demo_v5's pi_SFT and data.
set -u
cd "$(dirname "$0")/.."  # the repository root
mkdir -p runs/exp/logs
export PYTHONPATH=. WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE
D=runs/demo_v5
/usr/bin/time -v .venv/bin/python -m pipelines.train_rm --config configs/demo/rm.yaml output_dir=runs/exp/rm64 report_to=none \
  data.train_path=$D/data/train.jsonl data.eval_path=$D/data/eval.jsonl data.max_response_length=64 \
  > runs/exp/logs/rm64.log 2>&1
echo "exit $?" >> runs/exp/logs/rm64.log
/usr/bin/time -v .venv/bin/python -m pipelines.train_ppo --config configs/demo/ppo.yaml output_dir=runs/exp/ppo64 report_to=none \
  ppo.rm_run=runs/exp/rm64 model.sft_run=$D/sft data.train_path=$D/data/train.jsonl data.eval_path=$D/data/eval.jsonl \
  data.max_response_length=64 ppo.max_new_tokens=64 train.max_steps=16 "$@" > runs/exp/logs/ppo64.log 2>&1
echo "exit $?" >> runs/exp/logs/ppo64.log
