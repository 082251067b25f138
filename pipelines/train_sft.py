"""`python -m pipelines.train_sft --config configs/<name>.yaml [dotted.key=value ...]`

Supervised fine-tuning on the preference data's chosen responses (`data.sft_responses=both`: both responses), all
as the generic user 0: the pi_SFT of the seed's RLHF pipeline, a LoRA and the generic user's soft prompt. Later
stages start from it with `model.sft_run=<this run>`: its LoRA is merged into the weights, its soft prompt becomes
their reference prefix and the start of their generic embedding e_0, they train their own adapters on top, and
their reference policy (adapters off, that prefix) is pi_SFT, which is also where they start. PPO needs it to
explore: a policy that never writes a short answer cannot learn that some users prefer one. Writes the contract's run folder; with `data.eval_path`
the held-out NLL of the chosen responses and greedy samples (metrics.json `sft`).
"""

from __future__ import annotations

import sys
import time

import torch

from common.batching import PairEncoder
from common.config import Config
from common.run import build_backbone
from common.tracking import Tracker
from pipelines._cli import stage_main
from pipelines._stage import begin_run, encode_pairs, finish_run, save_trained


def run(cfg: Config) -> dict:
    data, run_dir, device = begin_run(cfg)
    t0 = time.time()
    backbone, tokenizer = build_backbone(cfg, len(data.vocab), device)
    from policy.model import PersonalizedPolicy
    from policy.sft_trainer import SFTTrainer, collate_sft, sft_examples, sft_loss

    policy = PersonalizedPolicy(backbone).to(device)
    train_pairs, eval_pairs = encode_pairs(tokenizer, cfg, data)
    examples = sft_examples(train_pairs, cfg.data.sft_responses)
    eval_examples = sft_examples(eval_pairs)
    tracker = Tracker(cfg, run_dir, job_type="sft")

    @torch.no_grad()
    def eval_nll(step: int = 0) -> dict:
        total, n = 0.0, 0
        bs = cfg.train.eval_batch_size
        for i in range(0, len(eval_examples), bs):
            batch = collate_sft(eval_examples[i:i + bs], tokenizer.pad_token_id)
            loss, k = sft_loss(policy, {key: v.to(device) for key, v in batch.items()})
            total, n = total + loss.item() * k, n + k
        return {"eval/sft_nll": total / max(n, 1)}

    before = eval_nll() if eval_examples else {}
    trainer = SFTTrainer(cfg, policy, examples, tokenizer.pad_token_id, device, run_dir, tracker,
                         eval_fn=eval_nll if eval_examples else None)
    result = trainer.train()
    # "reference_prefix": later stages take this run's generic-user soft prompt as part of pi_SFT
    cost = save_trained(run_dir, cfg, "train_sft", "sft", backbone, {}, result, t0, data, trainer.loop.history,
                        loss_name="loss (NLL)", extra={"n_examples": len(examples), "reference_prefix": True})
    metrics = {"train": result, "cost": cost}
    if eval_examples:  # every rank: under ZeRO-3 each forward gathers parameters from all of them
        after = eval_nll()
        metrics["eval"] = {"route": "sft", "sft": {"eval_nll_before": before["eval/sft_nll"],
                                                   "eval_nll_after": after["eval/sft_nll"],
                                                   "n_eval_examples": len(eval_examples)},
                           "generation": _generation(cfg, policy, tokenizer, data.eval)}
        tracker.log({"eval/sft_nll": after["eval/sft_nll"]}, step=cfg.train.max_steps)
    finish_run(run_dir, metrics, tracker)
    return metrics


def _generation(cfg: Config, policy, tokenizer, records) -> dict:
    """Greedy answers of pi_SFT on held-out prompts: its response length is what PPO starts exploring from."""
    encoder = PairEncoder.from_config(tokenizer, cfg)
    prompts = list(dict.fromkeys(r.prompt for r in records))[: cfg.eval.n_generation_prompts]
    if not prompts:
        return {}
    ids = [encoder.prompt_ids(p) for p in prompts]
    out = policy.generate(ids, torch.zeros(len(ids), dtype=torch.long), pad_id=tokenizer.pad_token_id,
                          max_new_tokens=cfg.eval.max_new_tokens, do_sample=False,
                          eos_token_id=tokenizer.eos_token_id)
    texts = [tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]
    words = [len(t.split()) for t in texts]
    # Sampled lengths (temperature 1, as PPO samples): the spread PPO has to choose from per user.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        sampled = policy.generate(ids * 4, torch.zeros(4 * len(ids), dtype=torch.long), pad_id=tokenizer.pad_token_id,
                                  max_new_tokens=cfg.eval.max_new_tokens, do_sample=True,
                                  temperature=1.0, top_k=0, top_p=1.0, eos_token_id=tokenizer.eos_token_id)
    sampled_words = sorted(len(tokenizer.decode(o, skip_special_tokens=True).split()) for o in sampled)
    return {"mean_response_words": {"<sft>": sum(words) / len(words)},
            "sampled_response_words": sampled_words,
            "examples": [{"prompt": p, "response": t} for p, t in zip(prompts[:3], texts[:3])]}


def main(argv=None) -> int:
    return stage_main("train_sft", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
