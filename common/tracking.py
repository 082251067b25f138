"""Metrics: always a JSONL log in the run folder; wandb (offline by default) when `report_to=wandb`.

Every stage of one experiment logs to one wandb project with a shared `group` and `job_type` = stage, so the wandb
UI shows the RM route and the DPO route side by side. With several processes only rank 0 logs; on the other
ranks a Tracker takes every call and does nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from common import dist
from common.config import Config, to_dict


def _scalar(v):
    try:
        return float(v.item()) if hasattr(v, "item") else float(v)
    except (TypeError, ValueError):
        return v


_USER_WANDB_ENV = {var: os.environ.get(var) for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR")}


class Tracker:
    def __init__(self, cfg: Config, run_dir: Path, job_type: str):
        self.run_dir = Path(run_dir)
        self.log_path = self.run_dir / "metrics_log.jsonl"
        self.wandb = None
        self.enabled = dist.is_main()
        if self.enabled and cfg.report_to == "wandb" and cfg.wandb.mode != "disabled":
            wandb_dir = self.run_dir / "wandb"
            wandb_dir.mkdir(parents=True, exist_ok=True)
            for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
                # wandb's caches and staging files go under this run's wandb/ (each run's, not the first run's
                # of the process), unless the user set them
                os.environ[var] = _USER_WANDB_ENV[var] or str(wandb_dir)
            os.environ["WANDB_DIR"] = str(self.run_dir)
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb = wandb.init(project=cfg.wandb.project, group=cfg.wandb.group or Path(cfg.output_dir).parent.name,
                                    job_type=job_type, name=cfg.wandb.name or f"{job_type}:{self.run_dir.name}",
                                    config=to_dict(cfg), dir=str(self.run_dir), mode=cfg.wandb.mode, reinit="finish_previous")

    def log(self, metrics: dict, step: int | None = None) -> None:
        if not self.enabled:
            return
        row = {k: _scalar(v) for k, v in metrics.items()}
        with self.log_path.open("a") as fh:
            fh.write(json.dumps({"step": step, "time": time.time(), **row}) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Table(columns=columns, data=rows)})

    def log_bar(self, key: str, labels: list[str], values: list[float], title: str) -> None:
        if self.wandb is not None:
            import wandb

            table = wandb.Table(data=[[l, v] for l, v in zip(labels, values)], columns=["label", "value"])
            self.wandb.log({key: wandb.plot.bar(table, "label", "value", title=title)})

    def summary(self, metrics: dict) -> None:
        if self.wandb is not None:
            for k, v in metrics.items():
                self.wandb.summary[k] = _scalar(v)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
