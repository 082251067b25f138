"""Personalized policy pi_P(y | x, u): causal LM (+LoRA) with the user soft prompt; P-DPO loss; PPO."""

from policy.dpo_loss import personalized_dpo_loss, preference_loss
from policy.model import PersonalizedPolicy

__all__ = ["PersonalizedPolicy", "personalized_dpo_loss", "preference_loss"]
