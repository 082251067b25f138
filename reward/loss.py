"""The personalized Bradley-Terry loss of the reward model."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair -log sigmoid(r_w - r_l) (with optional label smoothing)."""
    margin = r_chosen - r_rejected
    return -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)


def personalized_bt_loss(r_user_chosen: torch.Tensor, r_user_rejected: torch.Tensor,
                         r_generic_chosen: torch.Tensor | None, r_generic_rejected: torch.Tensor | None,
                         alpha: float, label_smoothing: float = 0.0, center_rewards_coef: float = 0.0,
                         ) -> tuple[torch.Tensor, dict]:
    """alpha * BT(pair scored for its user) + (1 - alpha) * BT(same pair scored as generic user 0).

    With alpha = 1 the generic term is skipped (its rewards may be None); that and the uniform user model is the
    vanilla reward model.
    """
    user = bt_loss(r_user_chosen, r_user_rejected, label_smoothing).mean()
    loss = alpha * user if alpha < 1.0 else user
    stats = {"loss/user": user.detach(), "acc/user": (r_user_chosen > r_user_rejected).float().mean()}
    if alpha < 1.0:
        generic = bt_loss(r_generic_chosen, r_generic_rejected, label_smoothing).mean()
        loss = loss + (1 - alpha) * generic
        stats["loss/generic"] = generic.detach()
        stats["acc/generic"] = (r_generic_chosen > r_generic_rejected).float().mean()
    if center_rewards_coef > 0:
        loss = loss + center_rewards_coef * ((r_user_chosen + r_user_rejected) ** 2).mean()
    stats["margin/user"] = (r_user_chosen - r_user_rejected).mean().detach()
    return loss, stats
