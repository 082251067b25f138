"""The personalized reward model's objective, written once: `RewardModelTrainer` minimises it over the model at
every step, and adapting a new user (`common.run_users`) minimises it over that user's row alone. The loss
formulas themselves are in `reward.loss`.
"""

from __future__ import annotations

import torch

from common.objective import objective_alpha, scored_as, to_device
from policy.dpo_loss import stochastic_generic_mask
from reward.loss import personalized_bt_loss


def rm_objective(rm, batch: dict[str, torch.Tensor], pair_users: torch.Tensor, loss_cfg,
                 generator: torch.Generator | None = None,
                 generic_rewards: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """alpha * BT(pairs scored for their users) + (1 - alpha) * BT(the same pairs scored as the generic user 0).

    - `batch`: `collate_pairs` of B pairs (2B rows: the chosen answers, then the rejected ones), on any device.
    - `pair_users`: [B], the user each pair is scored for (training has already applied
      `user_model.dropout_to_generic`).
    - `loss_cfg`: the run's `cfg.loss`: alpha, estimator, label_smoothing, center_rewards_coef.
    - `generator`: draws the pairs the stochastic estimator scores as the generic user.
    - `generic_rewards`: (r(x, y_w, 0), r(x, y_l, 0)) [B] when the caller holds them fixed: fitting one user's row
      leaves the generic user, the LLM and the head as they are, so the generic term is a constant there, scored
      once. None: scored here, in the same forward pass as the users' rows. Only the exact two-term loss uses it.

    Returns (loss, stats); stats["tokens"] counts the tokens the forward pass read.
    """
    B = len(pair_users)
    device = rm.score.weight.device
    alpha = objective_alpha(loss_cfg, rm.user_model)
    generic = torch.zeros_like(pair_users)
    bt = dict(label_smoothing=loss_cfg.label_smoothing, center_rewards_coef=loss_cfg.center_rewards_coef)
    tokens = int(batch["attention_mask"].sum())

    if loss_cfg.estimator == "stochastic" and 0 < alpha < 1:
        # One pass: each pair is scored as the generic user with probability 1 - alpha, so the expected loss is the
        # two-term loss. One BT term over the mixed users (alpha 1), the centring penalty on them too.
        if generic_rewards is not None:
            raise ValueError("generic_rewards are for the exact estimator; the stochastic one draws its generic pairs")
        mixed = torch.where(stochastic_generic_mask(B, alpha, generator), generic, pair_users)
        r = rm(to_device(scored_as(batch, mixed), device))
        loss, stats = personalized_bt_loss(r[:B], r[B:], None, None, 1.0, **bt)
        stats = {"loss/mixed": stats["loss/user"], "acc/mixed": stats["acc/user"], "margin/mixed": stats["margin/user"]}
        return loss, {**stats, "tokens": tokens}

    if alpha >= 1.0 or alpha <= 0.0:
        # One term: every pair for its own user (alpha 1), or every pair as the generic user (alpha 0).
        r = rm(to_device(scored_as(batch, pair_users if alpha >= 1.0 else generic), device))
        loss, stats = personalized_bt_loss(r[:B], r[B:], None, None, 1.0, **bt)
        return loss, {**stats, "tokens": tokens}

    if generic_rewards is None:
        # One forward pass over [user w, user l, generic w, generic l].
        r = rm(to_device(scored_as(batch, pair_users, generic), device))
        r_user, r_gen = r[:2 * B], r[2 * B:]
        tokens *= 2
    else:
        r_user = rm(to_device(scored_as(batch, pair_users), device))
        r_gen = torch.cat(generic_rewards).to(r_user)
    loss, stats = personalized_bt_loss(r_user[:B], r_user[B:], r_gen[:B], r_gen[B:], alpha, **bt)
    return loss, {**stats, "tokens": tokens}


@torch.no_grad()
def held_out_loss(rm, pairs, pad_id: int, loss_cfg, batch_size: int) -> float:
    """`rm_objective` over held-out pairs, each for its own user, with the exact two-term estimator (the expectation
    the stochastic one estimates): the number early stopping watches (`train.early_stopping_patience`)."""
    from dataclasses import replace

    from common.batching import collate_pairs

    exact = replace(loss_cfg, estimator="exact")
    total, n = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        batch = collate_pairs(chunk, pad_id)
        loss, _ = rm_objective(rm, batch, batch["user_idx"][:len(chunk)], exact)
        total, n = total + float(loss) * len(chunk), n + len(chunk)
    return total / max(n, 1)
