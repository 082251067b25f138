"""The one function that puts a user soft prompt in front of token embeddings (seed section 4.4).

Every model of the project (reward model, DPO policy, PPO actor and critic) goes through `prepend_prefix`, so the
layout of prefixed sequences is decided in one place:

- right padding (training, scoring): [prefix, tokens, pads]
- left padding (generation):         [pads, prefix, tokens]

The prefix may carry its own padding (explicit user texts of different lengths); real positions are packed
together so that position ids count only real positions and the last real token is well defined.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefixedInputs:
    inputs_embeds: torch.Tensor  # [B, T + L, d]
    attention_mask: torch.Tensor  # [B, T + L]
    position_ids: torch.Tensor  # [B, T + L]
    labels: torch.Tensor | None  # [B, T + L], -100 on prefix, prompt and padding
    prefix_length: int


def prepend_prefix(prefix: torch.Tensor, prefix_mask: torch.Tensor, token_embeds: torch.Tensor,
                   attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                   padding_side: str = "right") -> PrefixedInputs:
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if prefix.shape[0] != token_embeds.shape[0]:
        raise ValueError(f"prefix batch {prefix.shape[0]} != token batch {token_embeds.shape[0]}")
    T = prefix.shape[1]
    embeds = torch.cat([prefix.to(token_embeds.dtype), token_embeds], dim=1)
    mask = torch.cat([prefix_mask.to(attention_mask.dtype), attention_mask], dim=1)
    if labels is not None:
        labels = torch.cat([labels.new_full(prefix_mask.shape, -100), labels], dim=1)

    needs_packing = not bool(prefix_mask.all()) or (
        padding_side == "left" and not bool(attention_mask.all()))
    if needs_packing:
        # Stable sort: real positions keep their order; padding moves to one side.
        key = (mask == 0).to(torch.int8) if padding_side == "right" else mask.to(torch.int8)
        order = torch.sort(key, dim=1, stable=True).indices
        embeds = torch.gather(embeds, 1, order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
        mask = torch.gather(mask, 1, order)
        if labels is not None:
            labels = torch.gather(labels, 1, order)
    position_ids = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    return PrefixedInputs(embeds, mask, position_ids, labels, T)


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real position of each row of a right-padded (packed) mask."""
    return attention_mask.long().sum(dim=1) - 1
