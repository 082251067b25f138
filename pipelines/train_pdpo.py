"""`python -m pipelines.train_pdpo --config configs/<name>.yaml [dotted.key=value ...]`

Personalized DPO (seed section 4.4): trains the personalized policy directly from the preferences with
alpha * DPO(user-specific) + (1 - alpha) * DPO(generic user 0). With `user_model.kind=uniform` and `loss.alpha=1`
it is vanilla DPO. Writes the contract's run folder; with `data.eval_path` also the per-user evaluation.
"""

from __future__ import annotations

import sys
import time

from common import dist
from common.config import Config
from common.run import build_backbone
from common.tracking import Tracker
from pipelines._cli import stage_main
from pipelines._stage import begin_run, encode_pairs, finish_run, save_trained


def run(cfg: Config) -> dict:
    data, run_dir, device = begin_run(cfg)
    t0 = time.time()
    backbone, tokenizer = build_backbone(cfg, len(data.vocab), device)
    from policy.dpo_trainer import PersonalizedDPOTrainer
    from policy.model import PersonalizedPolicy

    policy = PersonalizedPolicy(backbone).to(device)
    train_pairs, eval_pairs = encode_pairs(tokenizer, cfg, data)
    tracker = Tracker(cfg, run_dir, job_type="pdpo")
    eval_ref = {}

    def quick_eval(step: int) -> dict:
        from common.metrics import accuracy_metrics
        from policy.dpo_objective import held_out_loss
        from policy.scoring import implicit_reward_margins, pair_logps

        bs, pad = cfg.train.eval_batch_size, tokenizer.pad_token_id
        if not eval_ref:
            eval_ref["w"], eval_ref["l"] = pair_logps(policy, eval_pairs, pad, bs, device, reference=True)
        w, l = pair_logps(policy, eval_pairs, pad, bs, device)
        m = accuracy_metrics("dpo", data.eval, data.vocab,
                             implicit_reward_margins(w, l, eval_ref["w"], eval_ref["l"], cfg.loss.beta))
        return {"eval/loss": held_out_loss(policy, eval_pairs, eval_ref["w"], eval_ref["l"], pad, cfg.loss, bs),
                "eval/accuracy/overall": m["overall"]["accuracy"],
                **{f"eval/accuracy/group/{g}": v["accuracy"] for g, v in m["per_group"].items()}}

    trainer = PersonalizedDPOTrainer(cfg, policy, train_pairs, tokenizer.pad_token_id, device, run_dir, tracker,
                                     eval_fn=quick_eval if eval_pairs else None)
    result = trainer.train()
    cost = save_trained(run_dir, cfg, "train_pdpo", "dpo", backbone, {}, result, t0, data, trainer.loop.history)
    metrics = {"train": result, "cost": cost}
    if data.eval and dist.is_main():  # plain torch modules, no collectives: the other ranks are done
        from pipelines.evaluate import evaluate_run

        del policy, backbone, trainer
        metrics["eval"] = evaluate_run(run_dir, data.eval, run_dir / "eval", tracker=tracker)
    finish_run(run_dir, metrics, tracker)
    return metrics


def main(argv=None) -> int:
    return stage_main("train_pdpo", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
