"""`python -m pipelines.train_rm --config configs/<name>.yaml [dotted.key=value ...]`

Trains the personalized Bradley-Terry reward model r(x, y, u) and writes the contract's run folder; when
`data.eval_path` is set it also writes `eval/metrics.json` with per-user accuracy.
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
    from reward.model import HEAD_NAME, PersonalizedRewardModel
    from reward.trainer import RewardModelTrainer

    rm = PersonalizedRewardModel(backbone, cfg.model.reward_pooling).to(device)
    train_pairs, eval_pairs = encode_pairs(tokenizer, cfg, data)
    if cfg.data.degenerate_negatives:
        from reward.degenerate import degenerate_negative_pairs

        train_pairs = train_pairs + degenerate_negative_pairs(train_pairs, cfg.data.degenerate_negatives,
                                                              tokenizer.eos_token_id, cfg.data.max_response_length,
                                                              cfg.seed)
    tracker = Tracker(cfg, run_dir, job_type="rm")

    def quick_eval(step: int) -> dict:
        from common.metrics import accuracy_metrics
        from reward.objective import held_out_loss
        from reward.scoring import reward_margins

        m = accuracy_metrics("rm", data.eval, data.vocab,
                             reward_margins(rm, eval_pairs, tokenizer.pad_token_id, cfg.train.eval_batch_size, device))
        return {"eval/loss": held_out_loss(rm, eval_pairs, tokenizer.pad_token_id, cfg.loss,
                                           cfg.train.eval_batch_size),
                "eval/accuracy/overall": m["overall"]["accuracy"],
                **{f"eval/accuracy/group/{g}": v["accuracy"] for g, v in m["per_group"].items()}}

    trainer = RewardModelTrainer(cfg, rm, train_pairs, tokenizer.pad_token_id, device, run_dir, tracker,
                                 eval_fn=quick_eval if eval_pairs else None)
    result = trainer.train()
    cost = save_trained(run_dir, cfg, "train_rm", "rm", backbone, {HEAD_NAME: rm.score}, result, t0, data,
                        trainer.loop.history)
    metrics = {"train": result, "cost": cost}
    if data.eval and dist.is_main():  # plain torch modules, no collectives: the other ranks are done
        from pipelines.evaluate import evaluate_run

        del rm, backbone
        metrics["eval"] = evaluate_run(run_dir, data.eval, run_dir / "eval", tracker=tracker)
    finish_run(run_dir, metrics, tracker)
    return metrics


def main(argv=None) -> int:
    return stage_main("train_rm", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
