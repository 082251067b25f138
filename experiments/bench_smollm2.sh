#!/usr/bin/env bash
# Issue 7: the benchmark suite on smollm2-135m, CPU (2 cores), sequential.
set -u
cd "$(dirname "$0")/.."  # the repository root
mkdir -p runs/exp/logs
export PYTHONPATH=. WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE
PY=.venv/bin/python
O=bench/results/smollm2-cpu
L=runs/exp/logs
$PY -m bench.run pdpo_step --model smollm2-135m --device cpu --threads 2 --batch 8 --prompt-len 64 --response-len 28 --steps 5 --warmup 1 --json $O/pdpo_step.json > $L/bench_pdpo.log 2>&1
$PY -m bench.run rm_step --model smollm2-135m --device cpu --threads 2 --batch 8 --prompt-len 64 --response-len 28 --steps 5 --warmup 1 --json $O/rm_step.json > $L/bench_rm.log 2>&1
$PY -m bench.run ppo_rollout --model smollm2-135m --device cpu --threads 2 --batch 16 --max-new-tokens 28 --steps 2 --json $O/ppo_rollout.json > $L/bench_rollout.log 2>&1
echo done > $L/bench_done
