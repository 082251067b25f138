"""Per-row next-token choice: every row of a batch has its own temperature, top_p, EOS rule and random generator.

The rules are those of `transformers.generate` (the project's reference decoder, `PersonalizedPolicy.generate`):
EOS is ruled out while a row has fewer than `min_tokens` new tokens (`MinNewTokensLengthLogitsProcessor`), the
logits are divided by the temperature, top-p keeps the smallest set of most likely tokens whose probability reaches
`top_p` (`TopPLogitsWarper`, at least one token), and a greedy row takes the argmax. No top-k: the OpenAI API has
none. What differs is the randomness: one `torch.Generator` per row, so a row's sample depends on its own seed
and not on which other requests share its batch.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is decoded (OpenAI's request fields, already validated)."""

    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0  # EOS ruled out for the first tokens (a PPO policy is decoded under its rollouts' rule)

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class RowSampler:
    """The sampling state of one sequence: its parameters and, unless greedy, its own generator."""

    params: SamplingParams
    generator: torch.Generator | None = field(default=None)

    @classmethod
    def create(cls, params: SamplingParams, device: torch.device, choice: int = 0) -> "RowSampler":
        if params.greedy:
            return cls(params, None)
        # choice i of a seeded request uses seed + i: the n choices differ, and each is reproducible on its own
        seed = params.seed + choice if params.seed is not None else secrets.randbits(62)
        return cls(params, torch.Generator(device=device).manual_seed(seed))


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every token outside the nucleus of its row ([R, V] logits, [R] top_p), as TopPLogitsWarper."""
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p).unsqueeze(-1)
    remove[..., -1] = False  # keep at least the most likely token
    remove = remove.scatter(-1, sorted_idx, remove)
    return logits.masked_fill(remove, float("-inf"))


def choose_tokens(logits: torch.Tensor, samplers: list[RowSampler], n_generated: list[int],
                  eos_ids: list[int]) -> torch.Tensor:
    """Next token of every row ([B, V] logits of the last position) -> [B] token ids."""
    logits = logits.float()
    no_eos = [i for i, (s, n) in enumerate(zip(samplers, n_generated)) if n < s.params.min_tokens]
    if no_eos and eos_ids:
        rows = torch.tensor(no_eos, device=logits.device)
        logits[rows.unsqueeze(1), torch.tensor(eos_ids, device=logits.device).unsqueeze(0)] = float("-inf")
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, s in enumerate(samplers) if not s.params.greedy]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        temperature = torch.tensor([samplers[i].params.temperature for i in sampled], device=logits.device)
        top_p = torch.tensor([samplers[i].params.top_p for i in sampled], device=logits.device)
        scores = logits[rows] / temperature.unsqueeze(-1)
        if bool((top_p < 1).any()):
            scores = top_p_filter(scores, top_p)
        probs = scores.softmax(dim=-1)
        for j, i in enumerate(sampled):
            tokens[i] = torch.multinomial(probs[j], 1, generator=samplers[i].generator)[0]
    return tokens
