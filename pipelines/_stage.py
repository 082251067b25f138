"""What every training stage does after its loop: training cost, the run's metrics.json and report.md."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from common import dist
from common.tracking import Tracker


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
