"""Training of the personalized reward model: batches of pairs -> `reward.objective.rm_objective`, on
`common.trainer`."""

from __future__ import annotations

import torch

from common.batching import EncodedPair, collate_pairs
from common.config import Config
from common.trainer import TrainLoop, batch_indices, drop_to_generic, param_groups
from reward.model import PersonalizedRewardModel
from reward.objective import rm_objective


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

    def loss(self, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        batch, chunk, g = self.batch(step, micro)
        users = drop_to_generic(batch["user_idx"][:len(chunk)], self.cfg.user_model.dropout_to_generic, g)
        return rm_objective(self.rm, batch, users, self.cfg.loss, g)

    def train(self) -> dict:
        return self.loop.run()
