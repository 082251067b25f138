"""Batched scoring of pairs with a reward model."""

from __future__ import annotations

import torch

from common.batching import EncodedPair, pair_sequence_batches, unique_pairs


@torch.no_grad()
def pair_rewards(rm, pairs: list[EncodedPair], pad_id: int, batch_size: int, device,
                 as_generic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(r(x, y_w, u), r(x, y_l, u)) per pair, for each pair's user (or for the generic user 0: then each distinct
    pair is scored once, whatever its annotator)."""
    if as_generic:
        unique, where = unique_pairs(pairs)
        if len(unique) < len(pairs):
            w, l = _pair_rewards(rm, unique, pad_id, batch_size, device, True)
            idx = torch.tensor(where, dtype=torch.long)
            return w[idx], l[idx]
    return _pair_rewards(rm, pairs, pad_id, batch_size, device, as_generic)


def reward_margins(rm, pairs: list[EncodedPair], pad_id: int, batch_size: int, device,
                   as_generic: bool = False) -> torch.Tensor:
    """r(x, y_w, u) - r(x, y_l, u) per pair, for each pair's user (or for the generic user 0)."""
    chosen, rejected = pair_rewards(rm, pairs, pad_id, batch_size, device, as_generic)
    return chosen - rejected


def _pair_rewards(rm, pairs, pad_id, batch_size, device, as_generic) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(pairs)
    out = torch.zeros(2 * n)
    for rows, batch in pair_sequence_batches(pairs, pad_id, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        if as_generic:
            batch["user_idx"] = torch.zeros_like(batch["user_idx"])
        out[rows] = rm(batch).float().cpu()
    return out[:n], out[n:]
