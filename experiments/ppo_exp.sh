#!/usr/bin/env bash
# ppo_exp.sh NAME BASE [overrides...]: PPO from BASE/sft against BASE/rm, then win rates vs pi_SFT (length judge)
set -e
cd "$(dirname "$0")/.."
NAME=$1; BASE=$2; shift 2
OUT=runs/exp/$NAME
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
.venv/bin/python -m pipelines.train_ppo --config configs/demo/ppo.yaml output_dir=$OUT model.sft_run=$BASE/sft \
  ppo.rm_run=$BASE/rm data.train_path=$BASE/data/train.jsonl data.eval_path=$BASE/data/eval.jsonl report_to=none "$@" > $OUT.log 2>&1
t1=$(date +%s)
.venv/bin/python -m pipelines.winrate --run $OUT --baseline $BASE/sft --prompts $BASE/data/eval.jsonl \
  --judge length:prefer_short=user_4,user_5,user_6 --out $OUT/winrate --max-new-tokens 96 >> $OUT.log 2>&1
t2=$(date +%s)
.venv/bin/python - "$OUT" $((t1-t0)) $((t2-t1)) <<'PY' | tee $OUT.summary
import json, sys, collections
out, tppo, twin = sys.argv[1], sys.argv[2], sys.argv[3]
w = json.load(open(f"{out}/winrate/winrate.json"))
h = json.load(open(f"{out}/ppo_history.json"))["iterations"]
words = collections.defaultdict(list); base = collections.defaultdict(list)
for u, v in w["per_user"].items():
    words[v["group"]].append(v["mean_words"]["run"]); base[v["group"]].append(v["mean_words"]["baseline"])
m = {g: sum(x)/len(x) for g, x in words.items()}; b = {g: sum(x)/len(x) for g, x in base.items()}
print(f"{out}: ppo {tppo}s winrate {twin}s")
print("greedy words run", {g: round(v,1) for g,v in m.items()}, "sft", {g: round(v,1) for g,v in b.items()},
      "ratio", round(m.get("minority",0)/max(m.get("majority",1),1e-9),3))
print("win", {g: round(v["win_rate"],3) for g, v in w["per_group"].items()})
for e in h[::max(1,len(h)//6)] + [h[-1]]:
    print(e["iteration"], "R", {g: round(v,2) for g,v in e["reward_group"].items()}, "W",
          {g: round(v,1) for g,v in e["response_words_group"].items()}, "KL", {g: round(v,2) for g,v in e["kl_group"].items()})
PY
