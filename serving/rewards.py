"""A reward-model run served for best-of-n reranking: r(prompt, response_i, user) for every response.

Scoring goes through the PPO stage's frozen `Reward` role (`policy.ppo.roles.load_reward_role`), the same code
that scores PPO rollouts and `evaluate`'s samples: the RM's own tokenizer, chat template and user table. One
request is scored at a time on a worker thread (a request is already a batch of responses); at most `max_queue`
wait, more are refused (429).
"""

from __future__ import annotations

import threading

import torch

from serving.engine import QueueFull
from serving.policy import ResolvedUser


class RewardScorer:
    def __init__(self, reward, max_queue: int = 64):
        self.reward = reward
        self.max_queue = max_queue
        self._lock = threading.Lock()  # one scoring (or user-table swap) at a time
        self._count_lock = threading.Lock()
        self._waiting = 0

    @property
    def tokenizer(self):
        return self.reward.tokenizer

    @property
    def encoder(self):
        return self.reward.encoder

    @property
    def vocab(self):
        return self.reward.vocab

    @property
    def user_model(self):
        return self.reward.model.backbone.user_model

    def resolve(self, user_id: str | None, user_text: str | None) -> ResolvedUser:
        um = self.user_model
        known = user_id is not None and user_id in self.reward.vocab
        personalized = (known and um.kind != "uniform") or (um.use_text and bool(user_text))
        return ResolvedUser(user_id, self.reward.vocab.index(user_id), personalized)

    def reload_users(self, vocab, user_model) -> None:
        """Swap in a new user table between two scorings."""
        with self._lock:
            self.reward.model.backbone.user_model = user_model.to(self.reward.device).eval()
            self.reward.vocab = vocab

    def reserve(self) -> None:
        with self._count_lock:
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} reward requests are already waiting")
            self._waiting += 1

    def score(self, prompt: str, responses: list[str], user_id: str | None,
              user_text: str | None) -> tuple[list[float], ResolvedUser]:
        """Blocking; call after `reserve()` (from a worker thread)."""
        try:
            with self._lock, torch.inference_mode():
                resolved = self.resolve(user_id, user_text)
                n = len(responses)
                rewards = self.reward.score([prompt] * n, responses, [user_id] * n, user_texts=[user_text] * n)
            return [float(r) for r in rewards], resolved
        finally:
            with self._count_lock:
                self._waiting -= 1
