"""Batched scoring of pairs with a reward model."""

from __future__ import annotations

import torch

from common.batching import EncodedPair, collate_pairs, unique_pairs


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
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
        if as_generic:
            batch["user_idx"] = torch.zeros_like(batch["user_idx"])
        r = rm(batch)
        chosen.append(r[: len(chunk)].cpu())
        rejected.append(r[len(chunk):].cpu())
    if not chosen:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(chosen), torch.cat(rejected)
