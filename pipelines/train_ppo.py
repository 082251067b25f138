"""`python -m pipelines.train_ppo --config configs/<name>.yaml [dotted.key=value ...]`

RLHF with PPO against a frozen personalized reward model (`ppo.rm_run`, a finished train_rm run). The actor is
the personalized policy pi_P(y | x, u) (user soft prompt + LoRA) whose users are the RM's users (same
users.json); each rollout sample is generated for one user (or the generic user 0) and scored by the RM for that
user. Prompts are the distinct prompts of `data.train_path`. `train.max_steps` counts PPO iterations.

Writes the contract's run folder plus `ppo_history.json` (per iteration: mean RM reward and response words per
user); with `data.eval_path` also the per-user evaluation (eval/metrics.json, metrics.json).
"""

from __future__ import annotations

import logging
import sys
import time

from common import dist, plots
from common.config import Config
from common.run import load_data, pick_device, prepare_run_dir, save_artifacts, write_run_info
from common.tracking import Tracker
from pipelines._cli import stage_main
from preference_data.vocab import UserVocab

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    from policy.ppo.roles import (VALUE_HEAD, build_roles, check_rm_run, gate_user_model_on_rm,
                                  init_user_model_from_rm, load_reward_role,
                                  seed_clusters_from_rm)
    from policy.ppo.trainer import PPOTrainer

    dist.setup(cfg)
    rm_run = check_rm_run(cfg.ppo.rm_run)  # a clear error naming ppo.rm_run before any model is loaded
    data = load_data(cfg)
    vocab = UserVocab.load(rm_run / "users.json")  # the actor's users are the RM's users
    prompts = list(dict.fromkeys(r.prompt for r in data.train))
    user_texts: dict[str, str] = {}
    user_groups: dict[str, str] = {}
    for r in data.train:
        if r.user_id is not None and r.user_text and r.user_id not in user_texts:
            user_texts[r.user_id] = r.user_text
        if r.user_id is not None and r.group and r.user_id not in user_groups:
            user_groups[r.user_id] = r.group
    unknown = sorted({r.user_id for r in data.train if r.user_id is not None and r.user_id not in vocab})
    if unknown:
        log.warning("%d user(s) of data.train_path are not users of the RM run (their prompts are still used): %s",
                    len(unknown), unknown[:10])
    log.info("PPO on %d distinct prompts, %d RM users + the generic user", len(prompts), len(vocab))

    run_dir = prepare_run_dir(cfg)
    if dist.is_main():
        vocab.save(run_dir / "users.json")
    device = pick_device(cfg)
    t0 = time.time()
    reward = load_reward_role(rm_run, device)
    modules, actor, critic, reference, tokenizer = build_roles(cfg, len(vocab), device)
    for backbone in (modules.actor, modules.critic):
        if backbone is not None and cfg.ppo.init_user_model == "rm":
            init_user_model_from_rm(backbone.user_model, reward, cfg.ppo.init_user_model_scale)
        elif backbone is not None and cfg.ppo.init_user_model == "rm_gated":
            gate_user_model_on_rm(backbone.user_model, reward)
        elif backbone is not None and cfg.ppo.init_user_model == "rm_clusters":
            groups = seed_clusters_from_rm(backbone.user_model, reward, cfg.ppo.init_cluster_logit, cfg.seed)
            log.info("cluster of each user, from the RM's rows: %s",
                     {u: groups[vocab.index(u) - 1] for u in vocab.ids})
    tracker = Tracker(cfg, run_dir, job_type="ppo")
    trainer = PPOTrainer(cfg, run_dir, modules, actor, critic, reference, reward, tokenizer, vocab, prompts,
                         user_texts=user_texts, tracker=tracker, device=device, user_groups=user_groups)
    result = trainer.train()

    with trainer.gathered_parameters():  # a collective under ZeRO-3: every rank enters, rank 0 writes
        for backbone in (modules.actor, modules.critic):  # gated RM rows -> plain offsets: a plain run folder
            if backbone is not None and hasattr(backbone.user_model.implicit, "fold_gates"):
                backbone.user_model.implicit.fold_gates()
        save_artifacts(run_dir, modules.actor, {VALUE_HEAD: modules.value_head})
        if modules.critic is not None and dist.is_main():  # separate critic: own user model and adapter
            critic_dir = run_dir / "checkpoint" / "critic"
            modules.critic.user_model.save(critic_dir)
            modules.critic.save_llm(critic_dir)
    n_trainable = sum(p.numel() for p in modules.parameters() if p.requires_grad)
    last = result["last"]
    train = {"final_loss": last.get("loss/total"), "steps": result["iterations"], "wall_s": result["wall_s"],
             "resumed_from": result["resumed_from"], "final_reward": last.get("reward/mean"),
             "final_kl": last.get("kl/seq"), "kl_coef": result["kl_coef"], "reward_stats": result["reward_stats"]}
    cost = {"wall_s": time.time() - t0, "train_wall_s": result["wall_s"], "trainable_parameters": n_trainable,
            "user_model_parameters": modules.actor.user_model.num_parameters(),
            "llm_parameters": sum(p.numel() for p in modules.actor.lm.parameters()),
            "tokens_per_s": last.get("perf/train_tokens_per_s"),
            "rollout_tokens_per_s": last.get("perf/rollout_tokens_per_s")}
    write_run_info(run_dir, cfg, "train_ppo", modules.actor, vocab,
                   extra={"route": "ppo", "rm_run": str(rm_run.resolve()), "critic": cfg.ppo.critic,
                          "train": train, "cost": cost, "data": data.report})
    if dist.is_main():
        _plots(run_dir, trainer.history)
    metrics = {"train": train, "cost": cost}
    del trainer, modules, actor, critic, reference, reward
    if not dist.is_main():  # evaluation uses plain torch modules, no collectives: the other ranks are done
        return metrics
    if data.eval:
        from pipelines.evaluate import evaluate_run

        metrics["eval"] = evaluate_run(run_dir, data.eval, run_dir / "eval", tracker=tracker)
    from pipelines._stage import finish_run

    finish_run(run_dir, metrics, tracker)
    with (run_dir / "report.md").open("a") as fh:
        fh.write("\n![mean RM reward per user](plots/ppo_reward.png)\n"
                 "![response words per user](plots/ppo_words.png)\n"
                 "![mean RM reward per group](plots/ppo_reward_group.png)\n"
                 "![response words per group](plots/ppo_words_group.png)\n"
                 "![sequence KL per group](plots/ppo_kl_group.png)\n")
    return metrics


def _plots(run_dir, history: list[dict]) -> None:
    if not history:
        return
    plots.training_curve([{"step": h["iteration"], "loss": h.get("loss", 0.0)} for h in history],
                         run_dir / "plots" / "train_loss.png", "train_ppo loss (policy + vf_coef * value)")
    for key, name, ylabel in (("reward", "ppo_reward.png", "mean RM reward"),
                              ("response_words", "ppo_words.png", "response words"),
                              ("reward_group", "ppo_reward_group.png", "mean RM reward per group"),
                              ("response_words_group", "ppo_words_group.png", "response words per group"),
                              ("kl_group", "ppo_kl_group.png", "sequence KL per group")):
        series = {}
        for h in history:
            for user, value in (h.get(key) or {}).items():
                series.setdefault(user, []).append((h["iteration"], value))
        plots.per_user_lines(series, run_dir / "plots" / name, f"train_ppo: {ylabel} per user", "PPO iteration",
                             ylabel)


def main(argv=None) -> int:
    return stage_main("train_ppo", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
