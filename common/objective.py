"""What the two routes' objectives share (`reward.objective.rm_objective`, `policy.dpo_objective.pdpo_objective`):
the weight of the user-specific term and how one forward pass scores a batch of pairs for several users.

Both objectives are alpha * L(pair scored for its user) + (1 - alpha) * L(same pair scored as the generic user 0);
only L differs (Bradley-Terry on rewards, DPO on log-ratios).
"""

from __future__ import annotations

import torch


def objective_alpha(loss_cfg, user_model) -> float:
    """The weight of the user-specific term: `loss.alpha`, except for the uniform user model, where every user *is*
    the generic user: the two terms are the same loss, computed once (alpha 1)."""
    return 1.0 if user_model.kind == "uniform" else float(loss_cfg.alpha)


def scored_as(batch: dict[str, torch.Tensor], *pair_users: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch's 2B rows (chosen, then rejected) once per entry of `pair_users` ([B] each: one user per pair),
    stacked, so that one forward pass scores every pair for each of those users. The copies have the same width,
    so nothing is padded."""
    n = len(pair_users)
    out = {k: (torch.cat([v] * n) if n > 1 else v) for k, v in batch.items() if k != "user_idx"}
    out["user_idx"] = torch.cat([u.repeat(2) for u in pair_users])
    return out


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
