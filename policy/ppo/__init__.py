"""PPO for the personalized policy: plain PPO arithmetic (`core`), the four RLHF roles (`roles`: Actor, Critic,
Reference, Reward) and the training loop (`trainer.PPOTrainer`). Entry point: `python -m pipelines.train_ppo`."""

from policy.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    entropy_from_logits,
    make_kl_controller,
    masked_mean,
    per_token_kl_rewards,
    whiten,
)

__all__ = ["AdaptiveKLController", "FixedKLController", "clipped_policy_loss", "clipped_value_loss", "compute_gae",
           "entropy_from_logits", "make_kl_controller", "masked_mean", "per_token_kl_rewards", "whiten"]
