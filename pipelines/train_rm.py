"""`python -m pipelines.train_rm --config configs/<name>.yaml [dotted.key=value ...]`

Trains the personalized Bradley-Terry reward model r(x, y, u) and writes the contract's run folder; when
`data.eval_path` is set it also writes `eval/metrics.json` with per-user accuracy.
"""

from __future__ import annotations

import json
import sys
import time

from common import plots
from common.batching import PairEncoder
from common.config import Config
from common.run import (build_backbone, load_data, pick_device, prepare_run_dir, save_artifacts, write_run_info)
from common.tracking import Tracker
from pipelines._cli import stage_main


def run(cfg: Config) -> dict:
    data = load_data(cfg)  # validates every record before any model is loaded
    run_dir = prepare_run_dir(cfg)
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
    cost = {"wall_s": time.time() - t0, "train_wall_s": result["wall_s"],
            "trainable_parameters": result["trainable_parameters"],
            "user_model_parameters": backbone.user_model.num_parameters(),
            "llm_parameters": sum(p.numel() for p in backbone.lm.parameters()),
            "tokens_per_s": result["last"].get("train/tokens_per_s")}
    write_run_info(run_dir, cfg, "train_rm", backbone, data.vocab,
                   extra={"route": "rm", "train": result, "cost": cost, "data": data.report})
    if trainer.loop.history:
        plots.training_curve(trainer.loop.history, run_dir / "plots" / "train_loss.png", "train_rm loss")
    metrics = {"train": result, "cost": cost}
    if data.eval:
        from pipelines.evaluate import evaluate_run

        del rm, backbone
        metrics["eval"] = evaluate_run(run_dir, data.eval, run_dir / "eval", tracker=tracker)
    _finish(run_dir, metrics, tracker)
    return metrics


def _finish(run_dir, metrics: dict, tracker: Tracker) -> None:
    """metrics.json of the run = its held-out evaluation (contract schema) plus training cost."""
    import os

    out = dict(metrics.get("eval") or {})
    out["training"] = {"final_loss": metrics["train"]["final_loss"], **metrics["cost"]}
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, run_dir / "metrics.json")
    if (run_dir / "eval" / "plots").exists():
        import shutil

        shutil.copytree(run_dir / "eval" / "plots", run_dir / "plots", dirs_exist_ok=True)
    report = (run_dir / "eval" / "report.md").read_text() if (run_dir / "eval" / "report.md").exists() else ""
    train_line = (f"Training: {metrics['train']['steps']} steps, final loss {metrics['train']['final_loss']:.4f}, "
                  f"{metrics['cost']['train_wall_s']:.0f} s; trainable parameters "
                  f"{metrics['cost']['trainable_parameters']:,} (user model "
                  f"{metrics['cost']['user_model_parameters']:,}, LLM {metrics['cost']['llm_parameters']:,}).\n\n")
    (run_dir / "report.md").write_text(train_line + report + "\n![training loss](plots/train_loss.png)\n")
    tracker.summary({"train/final_loss": metrics["train"]["final_loss"]})
    tracker.finish()


def main(argv=None) -> int:
    return stage_main("train_rm", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
