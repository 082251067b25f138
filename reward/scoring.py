"""Batched scoring of pairs with a reward model."""

from __future__ import annotations

import torch

from common.batching import EncodedPair, score_pairs


def pair_rewards(rm, pairs: list[EncodedPair], pad_id: int, batch_size: int, device,
                 as_generic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(r(x, y_w, u), r(x, y_l, u)) per pair, for each pair's user (or for the generic user 0: then each distinct
    pair is scored once, whatever its annotator)."""
    return score_pairs(rm, pairs, pad_id, batch_size, device, as_generic, once_per_pair=as_generic)


def reward_margins(rm, pairs: list[EncodedPair], pad_id: int, batch_size: int, device,
                   as_generic: bool = False) -> torch.Tensor:
    """r(x, y_w, u) - r(x, y_l, u) per pair, for each pair's user (or for the generic user 0)."""
    chosen, rejected = pair_rewards(rm, pairs, pad_id, batch_size, device, as_generic)
    return chosen - rejected

