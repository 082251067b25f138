"""What every training stage that learns from comparisons does around its loop: before it, read the data and set
up the run folder; after it, save the artifacts, run.json, training cost, metrics.json and report.md."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from common import dist, plots
from common.batching import PairEncoder
from common.run import Data, load_data, pick_device, prepare_run_dir, save_artifacts, write_run_info
from common.tracking import Tracker


def begin_run(cfg):
    """(data, run_dir, device): refuse a bad launch, validate every record before any model is loaded, set up the
    run folder (rank 0 writes its user vocabulary)."""
    dist.setup(cfg)
    data = load_data(cfg)
    run_dir = prepare_run_dir(cfg)
    if dist.is_main():
        data.vocab.save(run_dir / "users.json")
    return data, run_dir, pick_device(cfg)


def encode_pairs(tokenizer, cfg, data: Data) -> tuple[list, list]:
    """(training pairs, held-out pairs) tokenised per the data config (held-out: empty without data.eval_path)."""
    encoder = PairEncoder.from_config(tokenizer, cfg)
    train = encoder.encode_all(data.train, data.vocab, cfg.data.train_path)
    held = encoder.encode_all(data.eval, data.vocab, cfg.data.eval_path or "") if data.eval else []
    return train, held


def save_trained(run_dir: Path, cfg, stage: str, route: str, backbone, heads: dict, result: dict, t0: float,
                 data: Data, history: list[dict], loss_name: str = "loss", extra: dict | None = None) -> dict:
    """Final artifacts, run.json and the loss curve of a finished training loop; returns its training cost."""
    save_artifacts(run_dir, backbone, heads)
    cost = training_cost(t0, result, backbone)
    write_run_info(run_dir, cfg, stage, backbone, data.vocab,
                   extra={"route": route, "train": result, "cost": cost, "data": data.report, **(extra or {})})
    if history and dist.is_main():
        plots.training_curve(history, run_dir / "plots" / "train_loss.png", f"{stage} {loss_name}")
    return cost


def training_cost(t0: float, result: dict, backbone) -> dict:
    """Wall time, throughput and trainable parameters (LLM vs user model) of a finished training loop."""
    return {"wall_s": time.time() - t0, "train_wall_s": result["wall_s"],
            "trainable_parameters": result["trainable_parameters"],
            "user_model_parameters": backbone.user_model.num_parameters(),
            "llm_parameters": sum(p.numel() for p in backbone.lm.parameters()),
            "tokens_per_s": result["last"].get("train/tokens_per_s")}


def finish_run(run_dir, metrics: dict, tracker: Tracker) -> None:
    """metrics.json of the run = its held-out evaluation (contract schema) plus training cost (rank 0 writes)."""
    if not dist.is_main():
        return
    out = dict(metrics.get("eval") or {})
    out["training"] = {"final_loss": metrics["train"]["final_loss"], **metrics["cost"]}
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, run_dir / "metrics.json")
    if (run_dir / "eval" / "plots").exists():
        shutil.copytree(run_dir / "eval" / "plots", run_dir / "plots", dirs_exist_ok=True)
    report = (run_dir / "eval" / "report.md").read_text() if (run_dir / "eval" / "report.md").exists() else ""
    train_line = (f"Training: {metrics['train']['steps']} steps, final loss {metrics['train']['final_loss']:.4f}, "
                  f"{metrics['cost']['train_wall_s']:.0f} s; trainable parameters "
                  f"{metrics['cost']['trainable_parameters']:,} (user model "
                  f"{metrics['cost']['user_model_parameters']:,}, LLM {metrics['cost']['llm_parameters']:,}).\n\n")
    (run_dir / "report.md").write_text(train_line + report + "\n![training loss](plots/train_loss.png)\n")
    tracker.summary({"train/final_loss": metrics["train"]["final_loss"]})
    tracker.finish()
