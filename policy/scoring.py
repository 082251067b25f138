"""Batched log-probs of held-out pairs under the personalized policy and the reference."""

from __future__ import annotations

import torch

from common.batching import EncodedPair, pair_sequence_batches, unique_pairs
from policy.dpo_loss import dpo_margins


@torch.no_grad()
def pair_logps(policy, pairs: list[EncodedPair], pad_id: int, batch_size: int, device, reference: bool = False,
               as_generic: bool = False, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(y_w|x,u), log pi(y_l|x,u)) per pair; `reference=True` gives log pi_SFT(y|x) (no prefix).

    Reference and generic-user scores do not depend on the pair's user, so each distinct pair is scored once.
    """
    if reference or as_generic:
        unique, where = unique_pairs(pairs, with_text=not reference)
        if len(unique) < len(pairs):
            if progress is not None:
                progress.total = len(unique)
            w, l = _pair_logps(policy, unique, pad_id, batch_size, device, reference, as_generic, progress)
            idx = torch.tensor(where, dtype=torch.long)
            return w[idx], l[idx]
    return _pair_logps(policy, pairs, pad_id, batch_size, device, reference, as_generic, progress)


def _pair_logps(policy, pairs: list[EncodedPair], pad_id: int, batch_size: int, device, reference: bool = False,
               as_generic: bool = False, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(pairs)
    out = torch.zeros(2 * n)
    for rows, batch in pair_sequence_batches(pairs, pad_id, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        if as_generic:
            batch["user_idx"] = torch.zeros_like(batch["user_idx"])
        lp = policy.reference_logps(batch) if reference else policy.sequence_logps(batch)
        out[rows] = lp.float().cpu()
        if progress is not None:
            progress.update(len(rows) / 2)
    return out[:n], out[n:]


def implicit_reward_margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> torch.Tensor:
    """beta * [log pi/pi_ref (y_w) - log pi/pi_ref (y_l)]: a policy route's reward margin (beta: `route_beta`)."""
    return beta * dpo_margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
