"""Per-pair implicit-reward margins of a policy run on its eval data (minority users): which prompts fail.

Usage: PYTHONPATH=. python experiments/pair_margins.py RUN_DIR
"""
import json, sys
from pathlib import Path
import torch
from common.run import load_backbone_from_run, pick_device
from common.batching import PairEncoder
from preference_data.io import load_records
from policy.model import PersonalizedPolicy
from policy.scoring import pair_logps, implicit_reward_margins
from policy.dpo_objective import route_beta
from common.run import run_route

run = Path(sys.argv[1])
cfg, backbone, tok, vocab, info = load_backbone_from_run(run, torch.device("cpu"), None)
recs = [r for r in load_records(cfg.data.eval_path) if r.group == "minority"]
enc = PairEncoder.from_config(tok, cfg)
pairs = enc.encode_all(recs, vocab, "eval")
pol = PersonalizedPolicy(backbone).eval()
rw, rl = pair_logps(pol, pairs, tok.pad_token_id, 32, torch.device("cpu"), reference=True)
pw, pl = pair_logps(pol, pairs, tok.pad_token_id, 32, torch.device("cpu"))
m = implicit_reward_margins(pw, pl, rw, rl, route_beta(cfg, run_route(info)))  # PPO: beta = ppo.kl_coef
for r, x, a, b, c, d in zip(recs, m.tolist(), pw.tolist(), pl.tolist(), rw.tolist(), rl.tolist()):
    if x <= 0.3:
        print(f"{r.user_id} {x:+.3f} pol w/l {a:.1f}/{b:.1f} ref w/l {c:.1f}/{d:.1f} | {r.prompt[:50]} | {r.chosen[:60]}")
