"""Batched log-probs of held-out pairs under the personalized policy and the reference."""

from __future__ import annotations

import torch

from common.batching import EncodedPair, score_pairs
from policy.dpo_loss import dpo_margins


@torch.no_grad()
def pair_logps(policy, pairs: list[EncodedPair], pad_id: int, batch_size: int, device, reference: bool = False,
               as_generic: bool = False, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(y_w|x,u), log pi(y_l|x,u)) per pair; `reference=True` gives log pi_SFT(y|x) (no prefix).

    Reference and generic-user scores do not depend on the pair's user, so each distinct pair is scored once.
    """
    def score(batch):
        return policy.reference_logps(batch) if reference else policy.sequence_logps(batch)

    return score_pairs(score, pairs, pad_id, batch_size, device, as_generic, once_per_pair=reference or as_generic,
                       with_text=not reference, progress=progress)


def implicit_reward_margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> torch.Tensor:
    """beta * [log pi/pi_ref (y_w) - log pi/pi_ref (y_l)]: a policy route's reward margin (beta: `route_beta`)."""
    return beta * dpo_margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
