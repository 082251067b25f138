"""`python -m pipelines.train_pdpo --config configs/<name>.yaml [dotted.key=value ...]`

Personalized DPO (seed section 4.4): trains the personalized policy directly from the preferences with
alpha * DPO(user-specific) + (1 - alpha) * DPO(generic user 0). With `user_model.kind=uniform` and `loss.alpha=1`
it is vanilla DPO. Writes the contract's run folder; with `data.eval_path` also the per-user evaluation.
"""

from __future__ import annotations

import sys
import time

from common import dist, plots
from common.batching import PairEncoder
from common.config import Config
from common.run import build_backbone, load_data, pick_device, prepare_run_dir, save_artifacts, write_run_info
from common.tracking import Tracker
from pipelines._cli import stage_main
from pipelines._stage import finish_run, training_cost


def run(cfg: Config) -> dict:
    dist.setup(cfg)
    data = load_data(cfg)
    run_dir = prepare_run_dir(cfg)
    if dist.is_main():
        data.vocab.save(run_dir / "users.json")
    device = pick_device(cfg)
    t0 = time.time()
    backbone, tokenizer = build_backbone(cfg, len(data.vocab), device)
    from policy.dpo_trainer import PersonalizedDPOTrainer
    from policy.model import PersonalizedPolicy

    policy = PersonalizedPolicy(backbone).to(device)
    encoder = PairEncoder.from_config(tokenizer, cfg)
    train_pairs = encoder.encode_all(data.train, data.vocab, cfg.data.train_path)
    eval_pairs = encoder.encode_all(data.eval, data.vocab, cfg.data.eval_path or "") if data.eval else []
    tracker = Tracker(cfg, run_dir, job_type="pdpo")
    eval_ref = {}

    def quick_eval(step: int) -> dict:
        from common.metrics import accuracy_metrics
        from policy.scoring import implicit_reward_margins, pair_logps

        bs, pad = cfg.train.eval_batch_size, tokenizer.pad_token_id
        if not eval_ref:
            eval_ref["w"], eval_ref["l"] = pair_logps(policy, eval_pairs, pad, bs, device, reference=True)
        w, l = pair_logps(policy, eval_pairs, pad, bs, device)
        m = accuracy_metrics("dpo", data.eval, data.vocab,
                             implicit_reward_margins(w, l, eval_ref["w"], eval_ref["l"], cfg.loss.beta))
        return {"eval/accuracy/overall": m["overall"]["accuracy"],
                **{f"eval/accuracy/group/{g}": v["accuracy"] for g, v in m["per_group"].items()}}

    trainer = PersonalizedDPOTrainer(cfg, policy, train_pairs, tokenizer.pad_token_id, device, run_dir, tracker,
                                     eval_fn=quick_eval if eval_pairs else None)
    result = trainer.train()
    save_artifacts(run_dir, backbone, {})
    cost = training_cost(t0, result, backbone)
    write_run_info(run_dir, cfg, "train_pdpo", backbone, data.vocab,
                   extra={"route": "dpo", "train": result, "cost": cost, "data": data.report})
    if trainer.loop.history and dist.is_main():
        plots.training_curve(trainer.loop.history, run_dir / "plots" / "train_loss.png", "train_pdpo loss")
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
