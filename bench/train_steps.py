"""`pdpo_step` and `rm_step`: seconds per optimizer step of our trainers against TRL 1.16's own trainers.

Same model, same synthetic data (random token ids of fixed prompt/response lengths), same batch of pairs, same
precision, the same LoRA adapters (config defaults: r=8, alpha=16 on q_proj/v_proj), gradient clipping 1.0,
constant learning rate, no gradient checkpointing.

- ours: the project's trainer (`PersonalizedDPOTrainer` / `RewardModelTrainer`) run by `common.trainer.TrainLoop`
  itself for warmup + steps steps; a step is timed from the start of its loss function to the start of the next
  step's (the end of `run()` for the last), so it holds collation, forward, backward, clipping, the optimizer step
  and the loop's own bookkeeping. Reference log-probs are computed (and cached) in the trainer's constructor,
  outside the timing.
- TRL: `DPOTrainer` (precompute_ref_log_probs=True, the precompute excluded: it runs in the constructor) and
  `RewardTrainer`, timed by a callback from on_step_begin to on_step_end (forward, backward, clipping, optimizer and
  scheduler step). The synthetic ids are handed over already tokenised (TRL's text tokenisation is skipped).

Every timestamp is taken after `torch.cuda.synchronize()` on a GPU. The first `warmup` steps are not counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from bench.common import (
    BenchArgs,
    bench_config,
    flops_fields,
    free_memory,
    now,
    run_tmpdir,
    synthetic_pairs,
    timed_stats,
)
from common.config import Config


# --------------------------------------------------------------------------------------------- our trainers


def time_train_loop(loop, device, warmup: int) -> list[float]:
    """Run a `common.trainer.TrainLoop` and return the durations of its steps after `warmup`."""
    starts: list[float] = []
    inner: Callable = loop.loss_fn

    def timed_loss(step: int, micro: int):
        if micro == 0:
            starts.append(now(device))
        return inner(step, micro)

    loop.loss_fn = timed_loss
    try:
        loop.run()
        end = now(device)
    finally:
        loop.loss_fn = inner
    bounds = starts + [end]
    durations = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    return durations[warmup:]


def _our_row(impl: str, times: list[float], n_params: int, rows_per_step: int, seq_len: int, a: BenchArgs,
             extra: dict | None = None) -> dict[str, Any]:
    row = {"impl": impl, **timed_stats(times)}
    row.update(flops_fields(n_params, rows_per_step * seq_len, row["step_s"], a.peak_tflops))
    row["rows_per_step"] = rows_per_step
    row["seq_len"] = seq_len
    row.update(extra or {})
    return row


def _build_policy_trainer(cfg: Config, pairs, run_dir: Path, n_users: int):
    from common.run import build_backbone, pick_device, seed_everything
    from policy.dpo_trainer import PersonalizedDPOTrainer
    from policy.model import PersonalizedPolicy

    seed_everything(cfg.seed)
    device = pick_device(cfg)
    backbone, tok = build_backbone(cfg, n_users, device)
    policy = PersonalizedPolicy(backbone).to(device)
    trainer = PersonalizedDPOTrainer(cfg, policy, pairs, tok.pad_token_id, device, run_dir)
    return trainer, backbone, device


DPO_VARIANTS = {
    # impl: (user model kind, alpha, estimator, policy rows per pair)
    "pdpo": ("individual", 0.5, "exact", 4),
    "pdpo_stochastic": ("individual", 0.5, "stochastic", 2),
    "dpo": ("uniform", 1.0, "exact", 2),
}


def ours_dpo(impl: str, a: BenchArgs, pairs, tmp: Path, n_params: int) -> dict[str, Any]:
    kind, alpha, estimator, rows = DPO_VARIANTS[impl]
    cfg = bench_config(a, tmp / impl, {"user_model.kind": kind, "loss.alpha": alpha, "loss.estimator": estimator})
    trainer, backbone, device = _build_policy_trainer(cfg, pairs, tmp / impl, a.n_users)
    times = time_train_loop(trainer.loop, device, a.warmup)
    seq = cfg.user_model.n_tokens + a.prompt_len + a.response_len
    row = _our_row(impl, times, n_params, rows * a.batch, seq, a,
                   {"user_model": kind, "alpha": alpha, "estimator": estimator, "T_u": cfg.user_model.n_tokens})
    del trainer, backbone
    free_memory(device)
    return row


RM_VARIANTS = {
    "prm": ("individual", 0.5, "exact", 4),
    "prm_stochastic": ("individual", 0.5, "stochastic", 2),
    "rm": ("uniform", 1.0, "exact", 2),
}


def ours_rm(impl: str, a: BenchArgs, pairs, tmp: Path, n_params: int) -> dict[str, Any]:
    from common.run import build_backbone, pick_device, seed_everything
    from reward.model import PersonalizedRewardModel
    from reward.trainer import RewardModelTrainer

    kind, alpha, estimator, rows = RM_VARIANTS[impl]
    cfg = bench_config(a, tmp / impl, {"user_model.kind": kind, "loss.alpha": alpha, "loss.estimator": estimator})
    seed_everything(cfg.seed)
    device = pick_device(cfg)
    backbone, tok = build_backbone(cfg, a.n_users, device)
    rm = PersonalizedRewardModel(backbone).to(device)
    trainer = RewardModelTrainer(cfg, rm, pairs, tok.pad_token_id, device, tmp / impl)
    times = time_train_loop(trainer.loop, device, a.warmup)
    seq = cfg.user_model.n_tokens + a.prompt_len + a.response_len
    row = _our_row(impl, times, n_params, rows * a.batch, seq, a,
                   {"user_model": kind, "alpha": alpha, "estimator": estimator, "T_u": cfg.user_model.n_tokens})
    del trainer, rm, backbone
    free_memory(device)
    return row


# --------------------------------------------------------------------------------------------- TRL


def _quiet(trainer):
    """Drop the callback that prints the log dict (disable_tqdm=True swaps the progress bar for it)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def _step_timer(device, times: list[float]):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = now(device)

        def on_step_end(self, args, state, control, **kw):
            times.append(now(device) - self.t0)

    return StepTimer()


def _lora_config(cfg: Config, task_type: str | None = None):
    from peft import LoraConfig

    m = cfg.model
    kw = {"task_type": task_type} if task_type else {}
    return LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                      target_modules=list(m.lora_target_modules), bias="none", **kw)


def _trl_common(cfg: Config, a: BenchArgs, out_dir: Path) -> dict[str, Any]:
    on_gpu = a.device.startswith("cuda")
    return dict(output_dir=str(out_dir), per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
                max_steps=a.warmup + a.steps, learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0,
                weight_decay=0.0, max_grad_norm=cfg.train.max_grad_norm, seed=a.seed, report_to="none",
                logging_steps=10**6, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                gradient_checkpointing=False, bf16=on_gpu and a.dtype == "bfloat16",
                use_cpu=not on_gpu, max_length=None, remove_unused_columns=True)


def trl_dpo(a: BenchArgs, pairs, tmp: Path, n_params: int) -> dict[str, Any]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from common.models import load_causal_lm

    class PreTokenizedDPOTrainer(DPOTrainer):
        """The dataset already holds prompt_ids / chosen_ids / rejected_ids: skip TRL's text tokenisation."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    cfg = bench_config(a, tmp / "trl_dpo")
    lm, tok = load_causal_lm(a.model, a.dtype)
    device = torch.device(a.device)
    ds = Dataset.from_dict({"prompt_ids": [p.prompt_ids for p in pairs], "chosen_ids": [p.chosen_ids for p in pairs],
                            "rejected_ids": [p.rejected_ids for p in pairs]})
    args = DPOConfig(**_trl_common(cfg, a, tmp / "trl_dpo"), beta=cfg.loss.beta, loss_type=["sigmoid"],
                     precompute_ref_log_probs=True, precompute_ref_batch_size=a.batch)
    times: list[float] = []
    trainer = PreTokenizedDPOTrainer(model=lm, args=args, train_dataset=ds, processing_class=tok,
                                     peft_config=_lora_config(cfg), callbacks=[_step_timer(device, times)])
    _quiet(trainer).train()
    row = {"impl": "trl_dpo", **timed_stats(times[a.warmup:])}
    row.update(flops_fields(n_params, 2 * a.batch * (a.prompt_len + a.response_len), row["step_s"], a.peak_tflops))
    row.update({"rows_per_step": 2 * a.batch, "seq_len": a.prompt_len + a.response_len, "optim": args.optim})
    del trainer, lm
    free_memory(device)
    return row


def _seq_cls_from_causal(name: str, dtype: str):
    """A `*ForSequenceClassification` (num_labels=1) carrying the decoder weights of `load_causal_lm(name)`."""
    import copy

    from transformers import AutoModelForSequenceClassification

    from common.models import _dtype, load_causal_lm

    lm, tok = load_causal_lm(name, dtype)
    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    config.pad_token_id = tok.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        seq = AutoModelForSequenceClassification.from_config(config, dtype=_dtype(dtype))
    getattr(seq, seq.base_model_prefix).load_state_dict(getattr(lm, lm.base_model_prefix).state_dict())
    return seq, tok


def trl_rm(a: BenchArgs, pairs, tmp: Path, n_params: int) -> dict[str, Any]:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    cfg = bench_config(a, tmp / "trl_rm")
    model, tok = _seq_cls_from_causal(a.model, a.dtype)
    device = torch.device(a.device)
    ds = Dataset.from_dict({"chosen_ids": [p.prompt_ids + p.chosen_ids for p in pairs],
                            "rejected_ids": [p.prompt_ids + p.rejected_ids for p in pairs]})
    args = RewardConfig(**_trl_common(cfg, a, tmp / "trl_rm"), center_rewards_coefficient=None)
    times: list[float] = []
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                            peft_config=_lora_config(cfg, "SEQ_CLS"), callbacks=[_step_timer(device, times)])
    _quiet(trainer).train()
    row = {"impl": "trl_rm", **timed_stats(times[a.warmup:])}
    row.update(flops_fields(n_params, 2 * a.batch * (a.prompt_len + a.response_len), row["step_s"], a.peak_tflops))
    row.update({"rows_per_step": 2 * a.batch, "seq_len": a.prompt_len + a.response_len, "optim": args.optim})
    del trainer, model
    free_memory(device)
    return row


# --------------------------------------------------------------------------------------------- entry points


def _add_ratios(rows: list[dict], baseline: str) -> None:
    """`vs_<baseline>`: each row's step time over the baseline's in the same dtype."""
    for r in rows:
        base = next((b["step_s"] for b in rows if b["impl"] == baseline and b.get("step_s")
                     and b.get("dtype") == r.get("dtype")), None)
        if base and r.get("step_s"):
            r[f"vs_{baseline}"] = r["step_s"] / base


def _n_pairs(a: BenchArgs) -> int:
    return a.batch * max(a.warmup + a.steps, 2)


def _run_step_bench(a: BenchArgs, tag: str, baseline: str, trl_fn, ours_fn, ours_impls: tuple[str, ...]) -> list[dict]:
    """TRL's trainer and ours on the same synthetic pairs, one row per requested impl (and dtype, with
    `a.dtypes`), ratios to TRL in the same dtype.

    With `a.rounds` > 1 every (impl, dtype) runs once per round and round r starts at pair r of the list, so each
    takes each place in the order; a row then pools the timed steps of all its rounds (`round_step_s`: each
    round's median). On a small CPU the place in the order moves a step by ~10 % (allocator and cache state left
    behind by the previous, heavier impl), as much as the differences being measured."""
    from dataclasses import replace

    a.batch = a.batch or 8
    tok, n_params = model_meta(a.model)
    pairs = synthetic_pairs(tok, _n_pairs(a), a.prompt_len, a.response_len, a.n_users, a.seed)
    impls = [i for i in (baseline, *ours_impls) if a.want(i)]
    if not impls:
        return []
    dtypes = list(a.dtypes or [a.dtype])
    keys = [(i, d) for d in dtypes for i in impls]
    runs: dict[tuple[str, str], list[dict]] = {k: [] for k in keys}
    with run_tmpdir(tag) as tmp:
        for r in range(a.rounds):
            shift = r % len(keys)
            for impl, dtype in keys[shift:] + keys[:shift]:
                ad = replace(a, dtype=dtype)
                out = Path(tmp) / f"round{r}-{dtype}"
                row = (trl_fn(ad, pairs, out, n_params) if impl == baseline
                       else ours_fn(impl, ad, pairs, out, n_params))
                runs[(impl, dtype)].append({**row, "dtype": dtype})
    rows = [_pool_rounds(runs[k], n_params, a) for k in keys]
    _add_ratios(rows, baseline)
    return rows


def _pool_rounds(rounds: list[dict], n_params: int, a: BenchArgs) -> dict:
    """One row from an impl's rounds: the first round's fields, timings and FLOPs rate over all their steps."""
    if len(rounds) == 1:
        return rounds[0]
    row = dict(rounds[0])
    row.update(timed_stats([t for r in rounds for t in r["times"]]))
    row.update(flops_fields(n_params, row["tokens"], row["step_s"], a.peak_tflops))
    row["round_step_s"] = [r["step_s"] for r in rounds]
    return row


def run_pdpo_step(a: BenchArgs) -> list[dict]:
    return _run_step_bench(a, "pdpo", "trl_dpo", trl_dpo, ours_dpo, ("dpo", "pdpo", "pdpo_stochastic"))


def run_rm_step(a: BenchArgs) -> list[dict]:
    return _run_step_bench(a, "rm", "trl_rm", trl_rm, ours_rm, ("rm", "prm", "prm_stochastic"))


def model_meta(name: str, dtype: str = "float32"):
    """(tokenizer, N): N counts the parameters of the causal LM as loaded (embeddings, body, LM head; tied weights
    once). Every row of a benchmark uses this one N for its FLOPs estimate 6 * N * tokens."""
    from common.models import load_causal_lm

    lm, tok = load_causal_lm(name, dtype)
    n = sum(p.numel() for p in lm.parameters())
    del lm
    return tok, n
