#!/usr/bin/env bash
# Issue 7: pdpo_step / rm_step on smollm2-135m with rotated impl order (--rounds), CPU (2 cores), alone on the cores.
set -u
cd "$(dirname "$0")/.."  # the repository root
mkdir -p runs/exp/logs
export PYTHONPATH=. WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE
PY=.venv/bin/python
O=bench/results/smollm2-cpu
L=runs/exp/logs
C="--model smollm2-135m --device cpu --threads 2 --batch 8 --prompt-len 64 --response-len 28 --steps 4 --warmup 1"
$PY -m bench.run pdpo_step $C --impls dpo,pdpo_stochastic --rounds 4 --json $O/pdpo_step_rounds.json > $L/bench_pdpo_rounds.log 2>&1
$PY -m bench.run rm_step $C --impls trl_rm,rm,prm_stochastic --rounds 3 --json $O/rm_step_rounds.json > $L/bench_rm_rounds.log 2>&1
echo done >> $L/bench_rm_rounds.log
