"""Training of the personalized reward model: batches of pairs -> personalized BT loss, on `common.trainer`."""

from __future__ import annotations

import torch

from common.batching import EncodedPair, collate_pairs, concat_batches
from common.config import Config
from common.trainer import TrainLoop, batch_indices, drop_to_generic, param_groups
from policy.dpo_loss import stochastic_generic_mask
from reward.loss import personalized_bt_loss
from reward.model import PersonalizedRewardModel


class RewardModelTrainer:
    def __init__(self, cfg: Config, rm: PersonalizedRewardModel, train_pairs: list[EncodedPair], pad_id: int,
                 device, run_dir, tracker=None, eval_fn=None):
        self.cfg, self.rm, self.pairs, self.pad_id, self.device = cfg, rm, train_pairs, pad_id, device
        self.loop = TrainLoop(cfg, run_dir, rm, param_groups(rm.backbone, cfg, [rm.score]), self.loss,
                              eval_fn=eval_fn, tracker=tracker, desc="train_rm")

    def batch(self, step: int, micro: int) -> tuple[dict, list[EncodedPair], torch.Generator]:
        tr = self.cfg.train
        idx = batch_indices(len(self.pairs), tr.batch_size, self.cfg.seed, step, micro, tr.grad_accum)
        chunk = [self.pairs[i] for i in idx]
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + step * 131 + micro)
        return collate_pairs(chunk, self.pad_id), chunk, g

    def loss(self, step: int, micro: int):
        cfg = self.cfg
        batch, chunk, g = self.batch(step, micro)
        B = len(chunk)
        pair_users = batch["user_idx"][:B]
        pair_users = drop_to_generic(pair_users, cfg.user_model.dropout_to_generic, g)
        alpha = cfg.loss.alpha
        if self.rm.user_model.kind == "uniform":
            alpha = 1.0  # every user is the generic user: both terms are the same loss, compute it once
        if cfg.loss.estimator == "stochastic" and 0 < alpha < 1:
            generic = stochastic_generic_mask(B, alpha, g)
            users = torch.where(generic, torch.zeros_like(pair_users), pair_users)
            batch["user_idx"] = users.repeat(2)
            r = self.rm(_to(batch, self.device))
            # one BT term over the mixed users (the same loss function as the exact path, alpha 1: each row is
            # scored for the user drawn for it), the centring penalty included
            loss, stats = personalized_bt_loss(r[:B], r[B:], None, None, 1.0, cfg.loss.label_smoothing,
                                               cfg.loss.center_rewards_coef)
            stats = {"loss/mixed": stats["loss/user"], "acc/mixed": stats["acc/user"],
                     "margin/mixed": stats["margin/user"]}
        elif alpha >= 1.0 or alpha <= 0.0:
            # One term only: the pair for its user (alpha = 1) or as generic user 0 (alpha = 0).
            users = pair_users if alpha >= 1.0 else torch.zeros_like(pair_users)
            batch["user_idx"] = users.repeat(2)
            r = self.rm(_to(batch, self.device))
            loss, stats = personalized_bt_loss(r[:B], r[B:], None, None, 1.0, cfg.loss.label_smoothing,
                                               cfg.loss.center_rewards_coef)
        else:
            batch["user_idx"] = pair_users.repeat(2)
            generic = {**batch, "user_idx": torch.zeros_like(batch["user_idx"])}
            both = concat_batches(batch, generic, self.pad_id)  # one forward: [user w, user l, gen w, gen l]
            r = self.rm(_to(both, self.device))
            loss, stats = personalized_bt_loss(r[:B], r[B:2 * B], r[2 * B:3 * B], r[3 * B:], alpha,
                                               cfg.loss.label_smoothing, cfg.loss.center_rewards_coef)
        two_terms = 0 < alpha < 1 and cfg.loss.estimator == "exact"  # noqa: E501
        stats["tokens"] = int(batch["attention_mask"].sum()) * (2 if two_terms else 1)
        return loss, stats

    def train(self) -> dict:
        return self.loop.run()


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}
