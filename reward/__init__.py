"""Personalized Bradley-Terry reward model r(x, y, u) (seed sections 3 and 4)."""

from reward.loss import personalized_bt_loss
from reward.model import PersonalizedRewardModel

__all__ = ["PersonalizedRewardModel", "personalized_bt_loss"]
