"""`python -m pipelines.train_rm --config configs/<name>.yaml [dotted.key=value ...]`

Trains the personalized Bradley-Terry reward model r(x, y, u) and writes the contract's run folder; when
`data.eval_path` is set it also writes `eval/metrics.json` with per-user accuracy.
"""

from __future__ import annotations

import sys
import time

from common import dist, plots
from common.batching import PairEncoder
from common.config import Config
from common.run import (build_backbone, load_data, pick_device, prepare_run_dir, save_artifacts, write_run_info)
from common.tracking import Tracker
from pipelines._cli import stage_main
from pipelines._stage import finish_run, training_cost


def run(cfg: Config) -> dict:
    dist.setup(cfg)
    data = load_data(cfg)  # validates every record before any model is loaded
    run_dir = prepare_run_dir(cfg)
    if dist.is_main():
        data.vocab.save(run_dir / "users.json")
    device = pick_device(cfg)
    t0 = time.time()
    backbone, tokenizer = build_backbone(cfg, len(data.vocab), device)
    from reward.model import PersonalizedRewardModel
    from reward.trainer import RewardModelTrainer

    rm = PersonalizedRewardModel(backbone).to(device)
    encoder = PairEncoder.from_config(tokenizer, cfg)
    train_pairs = encoder.encode_all(data.train, data.vocab, cfg.data.train_path)
    eval_pairs = encoder.encode_all(data.eval, data.vocab, cfg.data.eval_path or "") if data.eval else []
    tracker = Tracker(cfg, run_dir, job_type="rm")

    def quick_eval(step: int) -> dict:
        from common.metrics import accuracy_metrics
        from reward.scoring import reward_margins

        m = accuracy_metrics("rm", data.eval, data.vocab,
                             reward_margins(rm, eval_pairs, tokenizer.pad_token_id, cfg.train.eval_batch_size, device))
        return {"eval/accuracy/overall": m["overall"]["accuracy"],
                **{f"eval/accuracy/group/{g}": v["accuracy"] for g, v in m["per_group"].items()}}

    trainer = RewardModelTrainer(cfg, rm, train_pairs, tokenizer.pad_token_id, device, run_dir, tracker,
                                 eval_fn=quick_eval if eval_pairs else None)
    result = trainer.train()
    save_artifacts(run_dir, backbone, {"score": rm.score})
    cost = training_cost(t0, result, backbone)
    write_run_info(run_dir, cfg, "train_rm", backbone, data.vocab,
                   extra={"route": "rm", "train": result, "cost": cost, "data": data.report})
    if trainer.loop.history and dist.is_main():
        plots.training_curve(trainer.loop.history, run_dir / "plots" / "train_loss.png", "train_rm loss")
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
