"""r(x, y, u): decoder with LoRA + user soft prompt + a scalar head read at the last real token."""

from __future__ import annotations

import torch
from torch import nn

from common.backbone import PersonalizedBackbone


class PersonalizedRewardModel(nn.Module):
    def __init__(self, backbone: PersonalizedBackbone):
        super().__init__()
        self.backbone = backbone
        self.score = nn.Linear(backbone.hidden_size, 1, bias=True)
        with torch.no_grad():  # float32 whatever the LLM's dtype: it is trained (common.precision)
            self.score.weight.normal_(0.0, 1.0 / (backbone.hidden_size + 1) ** 0.5)
            self.score.bias.zero_()

    @property
    def user_model(self):
        return self.backbone.user_model

    def forward(self, batch: dict) -> torch.Tensor:
        """Rewards [N] for the N rows of a right-padded batch, each for its own `user_idx`."""
        hidden, inputs = self.backbone.hidden_states(batch)
        # Pool the last *real* position: with right padding the last position is a pad (stack notes).
        last = inputs.attention_mask.long().sum(1) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.score(pooled.to(self.score.weight.dtype)).squeeze(-1).float()
