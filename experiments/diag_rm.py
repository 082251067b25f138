"""Diagnostic: RM score vs response length per user on pi_SFT rollouts (no training).

Usage: PYTHONPATH=. python experiments/diag_rm.py N_BATCHES OUT.json --config configs/demo/ppo.yaml [overrides]
"""
import sys, json, torch
from common.config import load_config
from pipelines import train_ppo
from policy.ppo import trainer as T

N, OUT = int(sys.argv[1]), sys.argv[2]
out = []
def fake_train(self):
    for it in range(N):
        ro = self.rollout(it)
        for u, r, e, s in zip(ro.user_ids, ro.response_ids, ro.ended.tolist(), ro.raw_scores.tolist()):
            out.append({"it": it, "user": u, "len": len(r), "ended": e, "raw": s})
    json.dump(out, open(OUT, "w"))
    raise SystemExit(0)
T.PPOTrainer.train = fake_train
from pipelines._cli import stage_main
sys.argv = [sys.argv[0]] + sys.argv[3:]
stage_main("train_ppo", "diag", train_ppo.run, sys.argv[1:])
