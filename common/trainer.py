"""The training loop shared by `train_rm` and `train_pdpo` (PPO has its own, see `policy/ppo`).

A stage hands over its trainable module, its parameter groups and a `loss_fn(step, micro)`; the loop does the
rest, the same way for both: gradient accumulation, LR schedule, clipping, a DeepSpeed engine when configured,
progress bar, logging every N steps, eval every N steps, atomic checkpoints every N steps and exact resume.
Data order is a pure function of (seed, step), so a resumed run sees the same batches as an uninterrupted one.
Launched as several processes (torchrun, DeepSpeed engine), each rank trains on its own slice of every global
batch and only rank 0 logs and writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from common import checkpoint as ckpt
from common import dist
from common.config import Config, ConfigError, get_key, iter_keys
from common.optim import clip_grad_norm
from common.tracking import Tracker

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    pass


def batch_indices(n: int, batch_size: int, seed: int, step: int, micro: int, grad_accum: int,
                  rank: int | None = None, world_size: int | None = None) -> list[int]:
    """Indices of this rank's micro-batch `micro` of optimizer step `step`: epochs are seeded permutations of
    range(n). `batch_size` is per rank: the ranks' slices of one global batch of batch_size * world_size indices
    are disjoint (as long as n holds that many), and with one process the global batch is the rank's batch."""
    rank = dist.rank() if rank is None else rank
    world_size = dist.world_size() if world_size is None else world_size
    chunk = _global_batch(n, batch_size * world_size, seed, step, micro, grad_accum)
    return dist.shard(chunk, rank, world_size, what="batch indices")


def _global_batch(n: int, batch_size: int, seed: int, step: int, micro: int, grad_accum: int) -> list[int]:
    per_epoch = max(n // batch_size, 1)
    k = step * grad_accum + micro  # global micro-batch number
    epoch, pos = divmod(k, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    chunk = perm[pos * batch_size:(pos + 1) * batch_size]
    if len(chunk) < batch_size:  # fewer records than a batch: wrap around
        chunk = (perm * math.ceil(batch_size / max(n, 1)))[:batch_size]
    return chunk


def test_step_delay() -> None:
    """Test aid: `PRLHF_STEP_SLEEP=seconds` slows every step so that kill-and-resume tests can land mid-run."""
    delay = float(os.environ.get("PRLHF_STEP_SLEEP", "0") or 0)
    if delay:
        time.sleep(delay)


def dump_rank_weights(module: torch.nn.Module) -> None:
    """Test aid: `PRLHF_DUMP_RANK_WEIGHTS=folder` makes every rank write its trainable parameters after training to
    folder/rank-R.safetensors, so that a multi-process test can check that the ranks ended with the same model
    (ZeRO stages 0-2, whose ranks hold full parameters)."""
    folder = os.environ.get("PRLHF_DUMP_RANK_WEIGHTS")
    if folder:
        from safetensors.torch import save_file

        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file(ckpt.trainable_state(module), str(Path(folder) / f"rank-{dist.rank()}.safetensors"))


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(total - warmup, 1)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def user_model_lr(cfg: Config) -> float:
    """The user model's learning rate: `user_model.lr`, by default 10 x `train.lr`."""
    return cfg.user_model.lr if cfg.user_model.lr is not None else 10 * cfg.train.lr


def user_model_groups(user_models: list[torch.nn.Module], cfg: Config) -> list[dict]:
    """Optimizer groups of the user model(s): the per-user tables at `user_model.lr` in a group of their own that
    moves only the rows of the batch's users (`lazy`: `common.optim.LazyAdamW`; `row_wise`: sparse gradients and
    `RowWiseAdagrad`, `user_model.sparse`), parts shared by every user at `user_model.shared_lr` (default the same);
    no weight decay."""
    user_lr = user_model_lr(cfg)
    shared_lr = cfg.user_model.shared_lr if cfg.user_model.shared_lr is not None else user_lr
    shared = [p for m in user_models for p in m.implicit.shared_parameters() if p.requires_grad]
    tables = [p for m in user_models for p in m.user_tables() if p.requires_grad]
    special = {id(p) for p in shared + tables}
    rest = [p for m in user_models for p in m.parameters() if p.requires_grad and id(p) not in special]
    groups = [{"params": shared + rest, "lr": shared_lr, "weight_decay": 0.0, "name": "user_model_shared"}]
    table = {"params": tables, "lr": user_lr, "weight_decay": 0.0, "name": "user_table"}
    if cfg.user_model.sparse:
        table["row_wise"] = True
    else:
        table["lazy"] = cfg.user_model.table_optimizer == "lazy_adamw"
    return groups + [table]


def param_groups(backbone, cfg: Config, heads: list[torch.nn.Module]) -> list[dict]:
    """LLM adapters and heads at train.lr; the user model at its own rates and without weight decay."""
    head_params = [p for h in heads for p in h.parameters()]
    return [
        {"params": backbone.llm_trainable_parameters(), "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay,
         "name": "llm"},
        {"params": head_params, "lr": cfg.train.lr, "weight_decay": 0.0, "name": "heads"},
        *user_model_groups([backbone.user_model], cfg),
    ]


def drop_to_generic(user_idx: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each user by the generic user 0 with probability p (`user_model.dropout_to_generic`)."""
    if p <= 0:
        return user_idx
    return torch.where(torch.rand(user_idx.shape, generator=generator) < p, torch.zeros_like(user_idx), user_idx)


def make_optimizer(param_groups: list[dict], cfg: Config):
    """`train.optimizer`: AdamW (`common.optim.LazyAdamW`, whose `lazy` groups, the user tables, move only the rows
    of the batch's users) or plain SGD for every group. Groups marked `row_wise` (sparse user tables) get
    `RowWiseAdagrad`, and the optimizers act as one."""
    from common.optim import LazyAdamW, OptimizerSet, RowWiseAdagrad

    groups = [g for g in param_groups if g["params"]]
    for g in groups:
        g["initial_lr"] = g["lr"]
    if cfg.train.optimizer == "sgd":  # no state: a row with a zero gradient does not move either
        return torch.optim.SGD([{k: v for k, v in g.items() if k not in ("row_wise", "lazy")} for g in groups],
                               lr=cfg.train.lr, momentum=0.0)
    dense = [g for g in groups if not g.get("row_wise")]
    row_wise = [{k: v for k, v in g.items() if k != "row_wise"} for g in groups if g.get("row_wise")]
    adamw = LazyAdamW(dense, betas=(0.9, 0.999), eps=1e-8) if dense else None
    if not row_wise:
        return adamw
    tables = RowWiseAdagrad(row_wise)
    return OptimizerSet(adamw, tables) if adamw is not None else OptimizerSet(tables)


def deepspeed_engine(module: torch.nn.Module, optimizer, cfg: Config):
    """Wrap module + optimizer in a DeepSpeed engine (on CPU over gloo too). Under a launcher the ranks come from
    its environment; a plain single process gets the defaults below."""
    import json
    import os

    for var, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                         ("MASTER_PORT", "29531")):
        os.environ.setdefault(var, default)
    import deepspeed

    ds_cfg = json.loads(Path(cfg.train.deepspeed).read_text())
    ds_cfg["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    ds_cfg["gradient_accumulation_steps"] = 1  # the loop accumulates itself and steps the engine once per step
    ds_cfg.pop("train_batch_size", None)
    ds_cfg["gradient_clipping"] = cfg.train.max_grad_norm
    engine, optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_cfg)
    return engine, optimizer


# Keys a resumed run may change: where and how often it reports, how long it runs, what it evaluates on.
RESUMABLE_CHANGES = ("output_dir", "report_to", "wandb.", "eval.", "train.resume", "train.max_steps",
                     "train.save_every", "train.keep_last", "train.log_every", "train.eval_every",
                     "train.eval_batch_size", "train.num_threads", "train.device", "data.eval_path",
                     "data.max_eval_records")


def run_settings(cfg: Config) -> dict:
    """What a checkpoint records about the run that wrote it: every config key a resumed run must keep, and a
    digest of the training data's content (the same path can hold other data)."""
    settings = {k: get_key(cfg, k) for k, *_ in iter_keys() if not k.startswith(RESUMABLE_CHANGES)}
    train = Path(cfg.data.train_path) if cfg.data.train_path else None
    if train is not None and train.is_file():
        settings["<training data sha256>"] = hashlib.sha256(train.read_bytes()).hexdigest()[:16]
    return json.loads(json.dumps(settings))  # as state.json will give it back (tuples as lists)


def check_resumable(checkpoint: Path, settings: dict, max_steps: int) -> None:
    """Refuse, before any weight is loaded, a checkpoint this run cannot continue: one written with other settings
    (its weights and optimizer belong to another experiment) or one already at or past train.max_steps."""
    state = ckpt.read_state(checkpoint)
    saved = state.get("settings")
    if saved is None:
        raise ConfigError(f"{checkpoint} does not record the settings it was written with (an older version wrote "
                          "it), so it cannot be checked against this run. Set train.resume=never to start over, "
                          "or use another output_dir")
    defaults = {k: json.loads(json.dumps(default)) for k, _, default, _ in iter_keys()}
    # A key the checkpoint does not record was added to the code after it was written. At its default it does what
    # the older code did (new options ship switched off), so a run killed before an upgrade still resumes after it.
    added_at_default = {k for k in set(settings) - set(saved) if k in defaults and settings[k] == defaults[k]}
    diff = sorted(k for k in set(saved) | set(settings)
                  if saved.get(k) != settings.get(k) and k not in added_at_default)
    if diff:
        shown = "; ".join(f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now" for k in diff[:4])
        more = f" (and {len(diff) - 4} more)" if len(diff) > 4 else ""
        raise ConfigError(f"{checkpoint} was written by a run with other settings ({shown}{more}). Resume with "
                          "those settings, set train.resume=never to start over, or use another output_dir")
    step = int(state.get("iteration", state["step"]))
    if step >= max_steps:
        raise ConfigError(f"{checkpoint} is at step {step}, train.max_steps is {max_steps}: nothing to resume. "
                          "Raise train.max_steps, set train.resume=never to start over, or use another output_dir")


class EarlyStopping:
    """Stop when the held-out loss (`eval/loss` of the loop's eval_fn) has not improved by `min_delta` for `patience`
    evaluations in a row, and keep the trainable weights of the best evaluation (restored at the end).

    The best weights live in `folder/best-step-N.safetensors` (written atomically), and the counters in every
    resumable checkpoint, so that a resumed run stops where an uninterrupted one would, with the same best."""

    def __init__(self, patience: int, min_delta: float, folder: Path):
        self.patience, self.min_delta, self.folder = patience, min_delta, folder
        self.best, self.best_step, self.bad = math.inf, 0, 0

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    def _file(self, step: int) -> Path:
        return self.folder / f"best-step-{step}.safetensors"

    def update(self, step: int, loss: float, module: torch.nn.Module) -> bool:
        """Record an evaluation; True when training should stop."""
        from safetensors.torch import save_file

        if loss < self.best - self.min_delta:
            self.best, self.best_step, self.bad = loss, step, 0
            if dist.is_main():
                self.folder.mkdir(parents=True, exist_ok=True)
                tmp = self.folder / f".tmp-best-{step}.safetensors"
                save_file(ckpt.trainable_state(module), str(tmp))
                os.replace(tmp, self._file(step))
                for old in self.folder.glob("best-step-*.safetensors"):
                    if old != self._file(step):
                        old.unlink(missing_ok=True)
        else:
            self.bad += 1
        return self.bad >= self.patience

    def restore_best(self, module: torch.nn.Module) -> bool:
        """Load the best evaluation's trainable weights into `module` (False if there is none on disk)."""
        from safetensors.torch import load_file

        path = self._file(self.best_step)
        if not self.best_step or not path.exists():
            return False
        state = load_file(str(path))
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value.to(params[name]))
        return True

    def state_dict(self) -> dict:
        return {"best": self.best if math.isfinite(self.best) else None, "best_step": self.best_step, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"] if state.get("best") is not None else math.inf
        self.best_step, self.bad = int(state.get("best_step", 0)), int(state.get("bad", 0))


@dataclass
class TrainLoop:
    cfg: Config
    run_dir: Path
    module: torch.nn.Module  # owns every trainable parameter
    param_groups: list[dict]
    loss_fn: Callable[[int, int], tuple[torch.Tensor, dict]]  # (step, micro) -> (loss, stats)
    eval_fn: Callable[[int], dict] | None = None
    tracker: Tracker | None = None
    desc: str = "train"
    history: list[dict] = field(default_factory=list)

    def run(self) -> dict:
        cfg, tr = self.cfg, self.cfg.train
        dist.setup(cfg)
        optimizer = make_optimizer(self.param_groups, cfg)
        engine = None
        if tr.deepspeed:
            engine, optimizer = deepspeed_engine(self.module, optimizer, cfg)
        ckpt_root = self.run_dir / "checkpoints"
        stopper = EarlyStopping(tr.early_stopping_patience, tr.early_stopping_min_delta, ckpt_root)
        stopped_at = None
        start = 0
        settings = run_settings(cfg)
        if tr.resume == "auto" and (latest := ckpt.latest_checkpoint(ckpt_root)) is not None:
            check_resumable(latest, settings, tr.max_steps)
            state, _ = ckpt.load_checkpoint(latest, self.module, optimizer, engine)
            start = state["step"]
            self.history = state.get("history", [])
            if state.get("early_stopping"):
                stopper.load_state_dict(state["early_stopping"])
            log.info("resumed from %s (step %d)", latest, start)
        self.module.train()
        n_params = sum(p.numel() for g in self.param_groups for p in g["params"])
        bar = tqdm(range(start, tr.max_steps), desc=self.desc, initial=start, total=tr.max_steps, dynamic_ncols=True,
                   disable=not dist.is_main())
        t_start, tokens = time.time(), 0
        last = {}
        for step in bar:
            test_step_delay()
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] * lr_factor(step, tr.warmup_steps, tr.max_steps, tr.lr_scheduler)
            stats_sum: dict[str, float] = {}
            loss_sum = 0.0
            for micro in range(tr.grad_accum):
                loss, stats = self.loss_fn(step, micro)
                if not torch.isfinite(loss):
                    raise TrainingError(f"loss is {loss.item()} at step {step + 1} (micro-batch {micro}); stopping "
                                        "without writing a checkpoint. Lower train.lr or check the data.")
                scaled = loss / tr.grad_accum
                if engine is not None:
                    # The engine is configured for one micro-batch per step, so by itself it would reduce and
                    # overwrite the gradients at every backward; only the last micro-batch ends the accumulation.
                    engine.set_gradient_accumulation_boundary(micro == tr.grad_accum - 1)
                    engine.backward(scaled)
                else:
                    scaled.backward()
                loss_sum += loss.item() / tr.grad_accum
                for k, v in stats.items():
                    stats_sum[k] = stats_sum.get(k, 0.0) + float(v) / tr.grad_accum
                tokens += int(stats.get("tokens", 0))
            if engine is not None:
                engine.step()
            else:
                params = [p for g in optimizer.param_groups for p in g["params"]]
                if tr.max_grad_norm > 0:
                    norm = clip_grad_norm(params, tr.max_grad_norm)
                    stats_sum["grad_norm"] = float(norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            done = step + 1
            # what is logged is the global batch's: the mean over the ranks' slices
            stats_sum = dist.mean_over_ranks({**stats_sum, "loss": loss_sum})
            loss_sum = stats_sum.pop("loss")
            last = {"train/loss": loss_sum, **{f"train/{k}": v for k, v in stats_sum.items()},
                    "train/lr": optimizer.param_groups[0]["lr"]}
            bar.set_postfix(loss=f"{loss_sum:.4f}")
            if done % tr.log_every == 0 or done == tr.max_steps:
                elapsed = time.time() - t_start
                last["train/tokens_per_s"] = tokens / max(elapsed, 1e-9)
                self.history.append({"step": done, "loss": loss_sum})
                if self.tracker:
                    self.tracker.log(last, step=done)
            stop = False
            if self.eval_fn and tr.eval_every and done % tr.eval_every == 0 and done < tr.max_steps:
                self.module.eval()
                metrics = self.eval_fn(done)
                self.module.train()
                if stopper.enabled:
                    if "eval/loss" not in metrics:
                        raise TrainingError("train.early_stopping_patience needs a held-out loss (eval/loss): set "
                                            "data.eval_path")
                    stop = stopper.update(done, float(metrics["eval/loss"]), self.module)
                    metrics = {**metrics, "eval/best_loss": stopper.best}
                self.history.append({"step": done, **{k: v for k, v in metrics.items()
                                                      if isinstance(v, (int, float))}})
                if self.tracker:
                    self.tracker.log(metrics, step=done)
            if tr.save_every and done % tr.save_every == 0 and done < tr.max_steps and not stop:
                try:
                    ckpt.save_checkpoint(ckpt_root, done, self.module, optimizer,
                                         extra={"history": self.history, "settings": settings,
                                                "early_stopping": stopper.state_dict()},
                                         keep_last=tr.keep_last, engine=engine)
                except FloatingPointError as exc:
                    raise TrainingError(f"parameters are not finite at step {done}: {exc}. Lower train.lr or "
                                        "check the data.") from None
            if stop:
                stopped_at = done
                log.info("early stopping at step %d: eval/loss has not improved on %.4f (step %d) for %d "
                         "evaluations", done, stopper.best, stopper.best_step, stopper.bad)
                break
        bar.close()
        restored = stopper.enabled and stopper.restore_best(self.module)
        self.module.eval()
        dump_rank_weights(self.module)
        wall = time.time() - t_start
        out = {"final_loss": last.get("train/loss"), "wall_s": wall, "steps": stopped_at or tr.max_steps,
               "resumed_from": start, "trainable_parameters": n_params, "last": last}
        if stopper.enabled:
            out["early_stopping"] = {**stopper.state_dict(), "stopped_at": stopped_at, "restored_best": restored}
        return out
