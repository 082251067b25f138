"""Sampled answers of a PPO run's final policy for some users, each with its sequence KL to pi_SFT, computed as the
PPO trainer computes it (tempered log-probs, summed over the response's tokens), and the worst samples shown with
their largest per-token terms: where a user's KL spikes, whether the samples are still text.

    python experiments/ppo_sample_kl.py RUN USERS [N_PROMPTS] [PROMPTS_JSONL]
    python experiments/ppo_sample_kl.py runs/exp/rep5 user_5,user_4 10 runs/demo/data/train.jsonl

Each user answers the first N_PROMPTS distinct prompts 4 times, at the run's `ppo.temperature`, with the run's
`ppo.max_new_tokens`; sampling is seeded (0).
"""

from __future__ import annotations

import json
import sys

import torch

from common.batching import collate_sequences
from policy.loading import load_policy_run
from policy.ppo.roles import Actor, Reference


def main(argv: list[str]) -> int:
    run_dir, users = argv[0], argv[1].split(",")
    n_prompts = int(argv[2]) if len(argv) > 2 else 10
    prompts_path = argv[3] if len(argv) > 3 else "runs/demo/data/train.jsonl"
    run = load_policy_run(run_dir, "cpu")
    tok, eos, pad = run.tokenizer, run.tokenizer.eos_token_id, run.tokenizer.pad_token_id
    temperature, max_new = run.cfg.ppo.temperature, run.cfg.ppo.max_new_tokens
    prompts = list(dict.fromkeys(json.loads(line)["prompt"] for line in open(prompts_path)))[:n_prompts]
    actor = Actor(run.policy, temperature, eos, run.cfg.ppo.min_new_tokens)
    reference = Reference(run.policy.backbone, temperature, eos, run.cfg.ppo.min_new_tokens)
    torch.manual_seed(0)
    for user in users:
        idx = run.user_index(user)
        ids = [run.encoder.prompt_ids(p) for p in prompts] * 4
        with torch.no_grad():
            out = run.policy.generate(ids, torch.full((len(ids),), idx), None, pad_id=pad, do_sample=True,
                                      temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new,
                                      min_new_tokens=run.cfg.ppo.min_new_tokens, eos_token_id=eos, use_cache=True)
            batch = collate_sequences(ids, out, [idx] * len(ids), [[] for _ in ids], pad)
            width = max(len(o) for o in out)
            hidden, inputs = actor.hidden(batch)
            logps, mask, _ = actor.token_logps(hidden, inputs, width)
            ref_logps = reference.token_logps(batch, width)
        terms = (logps - ref_logps) * mask
        kl = terms.sum(1)
        words = sum(len(tok.decode(o, skip_special_tokens=True).split()) for o in out) / len(out)
        ended = sum(bool(o) and o[-1] == eos for o in out)
        print(f"== {user}: sequence KL mean {kl.mean():.1f}, median {kl.median():.1f}, max {kl.max():.1f}; "
              f"words {words:.1f}; ended {ended}/{len(out)}")
        for i in kl.argsort(descending=True)[:3].tolist():
            top = sorted(terms[i, :len(out[i])].argsort(descending=True)[:5].tolist())
            print(f"  KL {kl[i]:.1f} ({len(out[i])} tokens): {tok.decode(out[i])[:300]!r}")
            print("    largest terms:", [(tok.decode([out[i][t]]), round(float(terms[i, t]), 1)) for t in top])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]) if len(sys.argv) > 2 else print(__doc__) or 2)
