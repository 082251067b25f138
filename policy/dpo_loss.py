"""P-DPO (seed section 4.4): alpha * L(user-specific) + (1 - alpha) * L(generic user 0), L a *PO loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def preference_loss(logits: torch.Tensor, beta: float, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair loss of h = log(pi_w/ref_w) - log(pi_l/ref_l) (the log-ratio margin, before beta).

    sigmoid: DPO, -log sigmoid(beta h); ipo: (h - 1/(2 beta))^2; hinge: relu(1 - beta h).
    """
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected 'sigmoid', 'ipo' or 'hinge'")


def dpo_margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def chosen_nll(chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Mean per-token negative log-likelihood of the chosen responses (sum log-probs / response tokens)."""
    return -(chosen / chosen_tokens.clamp(min=1).to(chosen.dtype)).mean()


def personalized_dpo_loss(user_chosen: torch.Tensor, user_rejected: torch.Tensor,
                          generic_chosen: torch.Tensor | None, generic_rejected: torch.Tensor | None,
                          ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, alpha: float, beta: float,
                          loss_type: str = "sigmoid", label_smoothing: float = 0.0, nll_weight: float = 0.0,
                          chosen_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The exact two-term P-DPO loss over a batch. Log-probs are sums over response tokens; `ref_*` are
    log pi_SFT(y|x) without any user prefix. With alpha = 1 the generic terms may be None (vanilla DPO when the
    user model is uniform).

    `nll_weight` > 0 adds `nll_weight * chosen_nll` to each term, with that term's user (RPO, Pang et al. 2024;
    TRL's `rpo_alpha`). DPO alone only needs the chosen answer to gain on the rejected one, and a user prefix can
    win that by making both unlikely: the minority's greedy answers then turn into runs of one token. The NLL term
    keeps the user's own chosen answers likely. Needs `chosen_tokens`, the response length of each pair's chosen
    answer."""
    if nll_weight and chosen_tokens is None:
        raise ValueError("nll_weight > 0 needs chosen_tokens")
    m_user = dpo_margins(user_chosen, user_rejected, ref_chosen, ref_rejected)
    l_user = preference_loss(m_user, beta, loss_type, label_smoothing).mean()
    if nll_weight:
        nll_user = chosen_nll(user_chosen, chosen_tokens)
        l_user = l_user + nll_weight * nll_user
    stats = {"loss/user": l_user.detach(), "acc/user": (m_user > 0).float().mean(),
             "reward/margin_user": beta * m_user.mean().detach(),
             "reward/chosen": beta * (user_chosen - ref_chosen).mean().detach(),
             "reward/rejected": beta * (user_rejected - ref_rejected).mean().detach()}
    if nll_weight:
        stats["nll/user"] = nll_user.detach()
    if alpha >= 1.0:
        return l_user, stats
    m_gen = dpo_margins(generic_chosen, generic_rejected, ref_chosen, ref_rejected)
    l_gen = preference_loss(m_gen, beta, loss_type, label_smoothing).mean()
    if nll_weight:
        l_gen = l_gen + nll_weight * chosen_nll(generic_chosen, chosen_tokens)
    stats.update({"loss/generic": l_gen.detach(), "acc/generic": (m_gen > 0).float().mean()})
    if alpha <= 0.0:
        return l_gen, stats
    return alpha * l_user + (1 - alpha) * l_gen, stats


def stochastic_generic_mask(n_pairs: int, alpha: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The cheaper unbiased estimator: each pair is scored as the generic user with probability 1 - alpha, so one
    policy pass per pair has the same expected loss as the exact two-term loss."""
    return torch.rand(n_pairs, generator=generator) >= alpha


def stochastic_dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
                        ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
                        label_smoothing: float = 0.0, nll_weight: float = 0.0,
                        chosen_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Mean *PO loss (plus the chosen NLL, see personalized_dpo_loss) where each pair was already scored with its
    drawn user (its own or generic)."""
    if nll_weight and chosen_tokens is None:
        raise ValueError("nll_weight > 0 needs chosen_tokens")
    m = dpo_margins(chosen, rejected, ref_chosen, ref_rejected)
    loss = preference_loss(m, beta, loss_type, label_smoothing).mean()
    stats = {"loss/mixed": loss.detach(), "acc/mixed": (m > 0).float().mean()}
    if nll_weight:
        nll = chosen_nll(chosen, chosen_tokens)
        loss = loss + nll_weight * nll
        stats["nll/mixed"] = nll.detach()
    return loss, stats
