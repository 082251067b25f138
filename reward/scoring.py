"""Batched scoring of held-out pairs with a reward model."""

from __future__ import annotations

import torch

from common.batching import EncodedPair, collate_pairs, unique_pairs


@torch.no_grad()
def reward_margins(rm, pairs: list[EncodedPair], pad_id: int, batch_size: int, device,
                   as_generic: bool = False) -> torch.Tensor:
    """r(x, y_w, u) - r(x, y_l, u) per pair, for each pair's user (or for the generic user 0: then each distinct
    pair is scored once, whatever its annotator)."""
    if as_generic:
        unique, where = unique_pairs(pairs)
        if len(unique) < len(pairs):
            return _margins(rm, unique, pad_id, batch_size, device, True)[torch.tensor(where, dtype=torch.long)]
    return _margins(rm, pairs, pad_id, batch_size, device, as_generic)


def _margins(rm, pairs, pad_id, batch_size, device, as_generic) -> torch.Tensor:
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
        if as_generic:
            batch["user_idx"] = torch.zeros_like(batch["user_idx"])
        r = rm(batch)
        out.append((r[: len(chunk)] - r[len(chunk):]).cpu())
    return torch.cat(out) if out else torch.zeros(0)
