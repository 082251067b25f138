"""Sampling a token from the full softmax(logits / T) with one uniform number per row (inverse CDF).

transformers samples with `torch.multinomial(probs, 1)`, which on CPU draws an exponential variate for every
vocabulary entry: 49k random numbers per row and token with SmolLM2, 54 ms of a 40-row decoding step on 2 cores, a
fifth of a PPO rollout's decoding (bench/RESULTS.md). Inverse-CDF sampling draws one uniform u per row and returns
the first token whose cumulative probability reaches u: the same distribution from other random numbers, so a seed
gives other samples than transformers' sampler (and the same ones on every run).
"""

from __future__ import annotations

import torch


def inverse_cdf_sample(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Token index per row [B] of `probs` [B, V] (rows need not sum to 1 exactly) for `uniform` [B] in (0, 1].

    u is scaled to the row's total, so index i is returned exactly when cdf[i-1] < u <= cdf[i]: a token of
    probability 0 (cdf[i] == cdf[i-1]) never is, and u > 0 rules out a zero-probability first token."""
    cdf = probs.float().cumsum(-1)
    target = uniform.float().unsqueeze(-1) * cdf[:, -1:]
    return torch.searchsorted(cdf, target).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def sample_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row [B] drawn from softmax(logits / temperature) (logits [B, V]; -inf entries are never
    drawn). The random numbers come from `generator`, or torch's global generator (seeded by the caller)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    # 1 - U[0, 1) is in (0, 1]
    uniform = 1.0 - torch.rand(logits.shape[0], generator=generator, device=logits.device)
    return inverse_cdf_sample(probs, uniform)
