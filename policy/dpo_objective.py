"""The policy routes' pairwise objective, written once.

`pdpo_objective` is P-DPO's objective: `PersonalizedDPOTrainer` minimises it over the policy at every step, and
adapting a new user (`common.run_users`) minimises it over that user's row alone. A PPO run has no pairwise
objective of its own; its users are fitted with the same function on the implicit reward of the PPO optimum, whose
beta is the KL coefficient (`route_beta`, `route_loss_config`). The loss formulas are in `policy.dpo_loss`.
"""

from __future__ import annotations

import torch

from common.config import Config, ConfigError, LossConfig
from common.objective import objective_alpha, scored_as, to_device
from policy.dpo_loss import personalized_dpo_loss, stochastic_dpo_loss, stochastic_generic_mask


def route_beta(cfg: Config, route: str) -> float:
    """beta of a policy route's implicit reward r(x, y, u) = beta * log pi(y|x,u) / pi_ref(y|x).

    - `dpo`: `loss.beta`, the temperature the DPO loss was trained with.
    - `ppo`: `ppo.kl_coef`. PPO maximises E[r] - kl_coef * KL(pi || pi_ref), whose optimum is
      pi(y|x,u) = pi_ref(y|x) exp(r(x,y,u) / kl_coef) / Z(x,u), i.e. r = kl_coef * log pi/pi_ref + kl_coef log Z;
      Z cancels in a margin between two answers. (`loss.beta` of a PPO run is only a reporting setting.) With
      `ppo.adaptive_kl` the coefficient moved during training; its configured start is used.
    """
    if route == "dpo":
        return float(cfg.loss.beta)
    if route == "ppo":
        if cfg.ppo.kl_coef <= 0:
            raise ConfigError("ppo.kl_coef is 0: the PPO policy was not tied to pi_ref, so it has no implicit reward "
                              "(beta * log pi/pi_ref) to score or fit users with")
        return float(cfg.ppo.kl_coef)
    raise ValueError(f"route {route!r} has no implicit reward (only the policy routes 'dpo' and 'ppo' do)")


def route_loss_config(cfg: Config, route: str) -> LossConfig:
    """The settings `pdpo_objective` takes for a policy route.

    `dpo`: the run's own `cfg.loss` (alpha, beta, loss_type, estimator, label_smoothing, nll_weight).
    `ppo`: the DPO loss of the PPO optimum's implicit reward, beta = `ppo.kl_coef` (`route_beta`), user term only
    (alpha 1), sigmoid, no label smoothing and no NLL term: PPO trained no pairwise loss, no generic-user term
    and no NLL on chosen answers, so none of `loss.*` describes it; the user term alone is the Bradley-Terry
    likelihood of the user's comparisons under the reward the PPO policy implies, the model the PPO's RM fits.
    """
    if route == "dpo":
        return cfg.loss
    beta = route_beta(cfg, route)
    return LossConfig(alpha=1.0, beta=beta, loss_type="sigmoid", estimator="exact", label_smoothing=0.0,
                      nll_weight=0.0, center_rewards_coef=0.0)


def pdpo_objective(policy, batch: dict[str, torch.Tensor], pair_users: torch.Tensor, ref_chosen: torch.Tensor,
                   ref_rejected: torch.Tensor, loss_cfg, generator: torch.Generator | None = None,
                   generic_logps: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """alpha * DPO(pairs scored for their users) + (1 - alpha) * DPO(the same pairs scored as the generic user 0),
    each term plus `nll_weight` x the chosen answers' per-token NLL with that term's user (RPO).

    - `batch`: `collate_pairs` of B pairs (2B rows: the chosen answers, then the rejected ones), on any device.
    - `pair_users`: [B], the user each pair is scored for (training has already applied
      `user_model.dropout_to_generic`).
    - `ref_chosen`, `ref_rejected`: [B] log pi_ref(y|x), from `policy.scoring.pair_logps(..., reference=True)`.
    - `loss_cfg`: `cfg.loss` of a P-DPO run, or `route_loss_config(cfg, route)` for any policy route.
    - `generator`: draws the pairs the stochastic estimator scores as the generic user.
    - `generic_logps`: (log pi(y_w|x,0), log pi(y_l|x,0)) [B] when the caller holds them fixed: fitting one user's
      row leaves the generic user and the LLM as they are, so the generic term is a constant there, scored once.
      None: scored here, in the same forward pass as the users' rows. Only the exact two-term loss uses it.

    Returns (loss, stats); stats["tokens"] counts the tokens the forward pass read.
    """
    B = len(pair_users)
    device = next(policy.parameters()).device
    alpha = objective_alpha(loss_cfg, policy.user_model)
    generic = torch.zeros_like(pair_users)
    ref_w, ref_l = ref_chosen.to(device), ref_rejected.to(device)
    chosen_tokens = (batch["labels"][:B] != -100).sum(1).to(device)  # the NLL is per token of the chosen answer
    dpo = dict(beta=loss_cfg.beta, loss_type=loss_cfg.loss_type, label_smoothing=loss_cfg.label_smoothing,
               nll_weight=loss_cfg.nll_weight, chosen_tokens=chosen_tokens)
    tokens = int(batch["attention_mask"].sum())

    if loss_cfg.estimator == "stochastic" and 0 < alpha < 1:
        # One pass: each pair is scored as the generic user with probability 1 - alpha, so the expected loss is the
        # two-term loss.
        if generic_logps is not None:
            raise ValueError("generic_logps are for the exact estimator; the stochastic one draws its generic pairs")
        mixed = torch.where(stochastic_generic_mask(B, alpha, generator), generic, pair_users)
        lp = policy.sequence_logps(to_device(scored_as(batch, mixed), device))
        loss, stats = stochastic_dpo_loss(lp[:B], lp[B:], ref_w, ref_l, **dpo)
        return loss, {**stats, "tokens": tokens}

    if alpha >= 1.0 or alpha <= 0.0:
        # One term: every pair for its own user (alpha 1), or every pair as the generic user (alpha 0).
        lp = policy.sequence_logps(to_device(scored_as(batch, pair_users if alpha >= 1.0 else generic), device))
        loss, stats = personalized_dpo_loss(lp[:B], lp[B:], None, None, ref_w, ref_l, 1.0, **dpo)
        return loss, {**stats, "tokens": tokens}

    if generic_logps is None:
        # One forward pass over [user w, user l, generic w, generic l].
        lp = policy.sequence_logps(to_device(scored_as(batch, pair_users, generic), device))
        lp_user, lp_gen = lp[:2 * B], lp[2 * B:]
        tokens *= 2
    else:
        lp_user = policy.sequence_logps(to_device(scored_as(batch, pair_users), device))
        lp_gen = torch.cat(generic_logps).to(lp_user)
    loss, stats = personalized_dpo_loss(lp_user[:B], lp_user[B:], lp_gen[:B], lp_gen[B:], ref_w, ref_l, alpha, **dpo)
    return loss, {**stats, "tokens": tokens}


@torch.no_grad()
def held_out_loss(policy, pairs, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, pad_id: int, loss_cfg,
                  batch_size: int) -> float:
    """`pdpo_objective` over held-out pairs, each for its own user, with the exact two-term estimator: the number
    early stopping watches (`train.early_stopping_patience`). `ref_*`: the pairs' reference log-probs."""
    from dataclasses import replace

    from common.batching import collate_pairs

    exact = replace(loss_cfg, estimator="exact")
    total, n = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        batch = collate_pairs(chunk, pad_id)
        loss, _ = pdpo_objective(policy, batch, batch["user_idx"][:len(chunk)], ref_chosen[i:i + len(chunk)],
                                 ref_rejected[i:i + len(chunk)], exact)
        total, n = total + float(loss) * len(chunk), n + len(chunk)
    return total / max(n, 1)
