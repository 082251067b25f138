"""Diagnostic: the RM's score of every prefix of pi_SFT's rollouts, per user group (RM-as-critic idea).

Usage: PYTHONPATH=. python experiments/diag_prefix.py N_BATCHES OUT.json --config configs/demo/ppo.yaml [overrides]
"""
import sys, json, torch
from pipelines import train_ppo
from policy.ppo import trainer as T
from common.batching import collate_sequences

N, OUT = int(sys.argv[1]), sys.argv[2]
out = []
def fake_train(self):
    R = self.reward
    for it in range(N):
        ro = self.rollout(it)
        for j in range(len(ro)):
            u = ro.user_ids[j]
            p = R._prompt(self.prompts[ro.prompt_index[j]])
            r = R._response(ro.responses[j], bool(ro.ended[j]))
            b = collate_sequences([p], [r], [R.user_index(u)], [R.encoder.text_ids(None)], R.tokenizer.pad_token_id)
            with torch.no_grad():
                h, inputs = R.model.backbone.hidden_states(b)
                s = R.model.score(h[0]).squeeze(-1).float()
            n = int(inputs.attention_mask.sum()); L = len(r)
            phi = s[n - L - 1: n].tolist()  # score after prompt, then after each response token
            out.append({"it": it, "user": u, "ended": bool(ro.ended[j]), "len": L, "phi": phi,
                        "raw": float(ro.raw_scores[j])})
    json.dump(out, open(OUT, "w"))
    raise SystemExit(0)
T.PPOTrainer.train = fake_train
from pipelines._cli import stage_main
stage_main("train_ppo", "diag", train_ppo.run, sys.argv[3:])
