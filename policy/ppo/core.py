"""The arithmetic of PPO for language models, as plain tensor functions (no models, no state but the KL controller).

Conventions: every per-token tensor is [B, T] over the *response* tokens of B samples, right-padded, with `mask`
1 on real response tokens (the EOS included when the response has one) and 0 on padding. Position t of `values`
is V(s_t), the value of the state *before* token t is emitted (prefix, prompt and y_<t), read at the same position
as the logits that predict token t. An episode ends after its last real token: nothing is bootstrapped past it.
"""

from __future__ import annotations

import math

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    x = x * mask
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean over the real positions (token-level mean when dim is None)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           sum_over_ranks=None) -> torch.Tensor:
    """(x - mean) / std over the real positions; padding stays 0. `shift_mean=False` only rescales.

    `sum_over_ranks` ({name: local sum} -> {name: sum over every process}) makes the statistics those of the whole
    batch when each process holds a share of it: whitened per share, the same advantage could get another sign
    on another rank."""
    mask = mask.to(x.dtype)
    if sum_over_ranks is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        s = sum_over_ranks({"n": float(mask.sum()), "sum": float((x * mask).sum()),
                            "squares": float((x * x * mask).sum())})
        n = max(s["n"], 1.0)
        mean = s["sum"] / n
        var = max(s["squares"] / n - mean * mean, 0.0) * (n / (n - 1) if n > 1 else 1.0)
        mean, var = torch.tensor(mean, dtype=x.dtype), torch.tensor(var, dtype=x.dtype)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded response tokens.

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t,   A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1};
    returns R_t = A_t + V_t (the value targets). Both are 0 on padding.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    B, T = rewards.shape
    adv = torch.zeros_like(values)
    last = torch.zeros(B, dtype=values.dtype, device=values.device)
    for t in reversed(range(T)):
        if t + 1 < T:
            next_value, next_mask = values[:, t + 1], mask[:, t + 1]
        else:
            next_value = next_mask = torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        last = delta + gamma * lam * next_mask * last
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def per_token_kl_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                         score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards [B, T], kl [B, T]): r_t = -kl_coef * (log pi(y_t) - log pi_ref(y_t)), plus the sequence score at the
    last real response token of each row (Ziegler et al. 2019; InstructGPT). `kl` is the per-token k1 estimate of
    KL(pi || pi_ref) on the sampled tokens; its row sums are the sequence KL."""
    mask = mask.to(logp.dtype)
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    has_tokens = mask.sum(1) > 0
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards = rewards.clone()
    rewards[rows, last] += score.to(rewards.dtype) * has_tokens.to(rewards.dtype)
    return rewards, kl


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        clip: float, aggregation: str = "token") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-clip surrogate (Schulman et al. 2017) over the real tokens.

    `aggregation`: "token" averages over every real token of the batch (each token weighs the same: a 60-token
    answer weighs six times a 10-token one); "sequence" averages each sample's tokens first, then the samples (as
    the original GRPO): every sample weighs the same, so the few tokens of a short answer, its EOS among them,
    carry as much of the update as a long answer's many.

    Returns (loss, clipfrac, approx_kl): clipfrac is the share of tokens where the clipped term is the active one;
    approx_kl the k3 estimate mean((r - 1) - log r) of KL(pi_old || pi) (non-negative, unbiased).
    """
    mask = mask.to(logp.dtype)
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(unclipped, clipped)
    if aggregation == "sequence":
        has_tokens = mask.sum(1) > 0
        loss = masked_mean(per_token, mask, dim=1)[has_tokens].mean() if bool(has_tokens.any()) else per_token.sum() * 0
    elif aggregation == "token":
        loss = masked_mean(per_token, mask)
    else:
        raise ValueError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}")
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logp.dtype), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, clipfrac, approx_kl


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * mean(max((V - R)^2, (V_clip - R)^2)) with V_clip = V_old + clamp(V - V_old, -clip, clip).

    Returns (loss, clipfrac): the share of tokens where the clipped error is the larger one."""
    mask = mask.to(values.dtype)
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((err_clipped > err).to(values.dtype), mask)
    return loss, clipfrac


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dimension: logsumexp(z) - sum softmax(z) * z."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def repeated_ngram_share(ids: list[int], n: int, eos_id: int | None = None) -> float:
    """Share of a response's n-grams that already occurred earlier in it (0 for a response shorter than n + 1).

    A loop ("they're the only bees that can ..., and they're the only bees that can ...") repeats most of its
    n-grams; real answers of the demo's data repeat about 0.1 % of their 3-grams. An EOS, if given, is not text and
    is dropped first. An n-gram repetition penalty of this kind is the one Yeo et al. (2025) add to an RL reward."""
    if eos_id is not None:
        ids = [t for t in ids if t != eos_id]
    total = len(ids) - n + 1
    if total <= 1:
        return 0.0
    seen, repeated = set(), 0
    for i in range(total):
        gram = tuple(ids[i:i + n])
        repeated += gram in seen
        seen.add(gram)
    return repeated / total


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, coef: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025): what a response of `lengths` tokens pays, 0 up to
    max_len - buffer tokens, then rising linearly to `coef` at max_len.

    A reward model trained on answers up to some length extrapolates past it: a grade that rises with length keeps
    rising, and the policy's longest answers drift into a range no preference ever judged (where a small model's
    text starts to repeat itself). The ramp brakes only that tail: answers inside the data's range pay nothing,
    whoever the user, so a group that wants short answers keeps its pull. buffer 0 or coef 0: off."""
    lengths = lengths.float()
    if buffer <= 0 or coef == 0:
        return torch.zeros_like(lengths)
    return coef * (lengths - (max_len - buffer)).clamp(min=0, max=buffer) / buffer


class FixedKLController:
    """kl_coef stays where the config put it."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"kind": "fixed", "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019): move kl_coef towards `target` sequence KL.

    e = clip(KL / target - 1, -0.2, 0.2);  kl_coef <- kl_coef * (1 + e * n_steps / horizon).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError("the adaptive KL controller needs target > 0 and horizon > 0")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"kind": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = int(state.get("horizon", self.horizon))


def make_kl_controller(ppo_cfg) -> FixedKLController | AdaptiveKLController:
    if ppo_cfg.adaptive_kl:
        return AdaptiveKLController(ppo_cfg.kl_coef, ppo_cfg.target_kl, ppo_cfg.kl_horizon)
    return FixedKLController(ppo_cfg.kl_coef)


def leave_one_out_centre(raw: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """raw_i minus the mean of the *other* samples of i's group (RLOO). A group is one (prompt, user) pair sampled
    several times, so the baseline is specific to both the prompt and the user; a lone sample gets 0."""
    raw = raw.float()
    g = torch.tensor(groups)
    out = torch.zeros_like(raw)
    for k in g.unique().tolist():
        ix = (g == k).nonzero().squeeze(1)
        n = ix.numel()
        if n > 1:
            out[ix] = raw[ix] - (raw[ix].sum() - raw[ix]) / (n - 1)
    return out


def preference_reward(score: torch.Tensor, reference_score: torch.Tensor) -> torch.Tensor:
    """sigmoid(r(x, y, u) - r(x, y_ref, u)): the Bradley-Terry probability, under the RM, that user u prefers the
    sample y to a reference answer y_ref to the same prompt (preference as reward, Fu et al. 2025).

    Bounded in (0, 1) and centred on the reference: it rises fastest where the sample and the reference are close
    and flattens once the sample is clearly preferred, so a grade that keeps rising with every added sentence (a
    length-loving RM's) stops paying for padding, and no user's reward scale outweighs another's."""
    return torch.sigmoid(score.float() - reference_score.float())


def rloo_advantages(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                    groups: list[int]) -> torch.Tensor:
    """Critic-free advantages [B, T] (RLOO, Ahmadian et al. 2024): each sample's sequence reward
    R_i = score_i - kl_coef * sum_t kl_it, minus the mean R of the other samples of its group, on every real token.
    The KL term is inside R, so a sample that strays further from the reference than its siblings is held back."""
    seq = score.float() - kl_coef * (kl.float() * mask).sum(1)
    return leave_one_out_centre(seq, groups).unsqueeze(1) * mask.to(torch.float)


_ALL = "\0all users"  # the all-user statistics' key (no source user id contains a NUL)


class PerUserRewardNormalizer:
    """Centre each user's RM scores on that user's running mean, and scale them by that user's running std.

    A Bradley-Terry reward is defined only up to a shift per user (r(x, y, u) + c_u ranks every pair the same), so
    a baseline shared by all users is arbitrary: with one, a user whose scores happen to sit high gets a positive
    advantage for *every* response, and that user's preference (short vs long) is a small ripple on top. The
    per-user scale makes every user's preference move the policy at the same pace, however sure the RM is of it
    (the minority's margins are often the smaller ones: the RM saw fewer of their comparisons).
    """

    def __init__(self, momentum: float = 0.2, min_std_share: float = 0.25):
        self.momentum, self.min_std_share = momentum, min_std_share
        self.mean: dict[str, float] = {}
        self.var: dict[str, float] = {}  # per user, and _ALL for the scores of every user

    def _ema(self, table: dict[str, float], key: str, value: float) -> None:
        old = table.get(key)
        table[key] = value if old is None else old + self.momentum * (value - old)

    def __call__(self, raw: torch.Tensor, users: list[str]) -> torch.Tensor:
        raw = raw.float()
        for u in dict.fromkeys(users):  # update with this batch first: a user's first scores centre on themselves
            self._ema(self.mean, u, float(raw[[i for i, v in enumerate(users) if v == u]].mean()))
        return self.scale(raw - torch.tensor([self.mean[u] for u in users]), users)

    def scale(self, centred: torch.Tensor, users: list[str]) -> torch.Tensor:
        """Divide already-centred scores by their user's running std (updated with these scores). The std is kept
        above `min_std_share` of the all-user std: a user the RM is indifferent for must not have float noise
        blown up to unit-size advantages."""
        self._ema(self.var, _ALL, float(centred.pow(2).mean()))
        for u in dict.fromkeys(users):
            v = float(centred[[i for i, x in enumerate(users) if x == u]].pow(2).mean())
            if v > 0 or u in self.var:  # a lone first sample (centred to 0) says nothing about the scale
                self._ema(self.var, u, v)
        floor = self.min_std_share * self.var[_ALL] ** 0.5
        std = torch.tensor([max(self.var.get(u, self.var[_ALL]) ** 0.5, floor, 1e-6) for u in users])
        return centred / std

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "min_std_share": self.min_std_share, "mean": dict(self.mean),
                "var": dict(self.var)}

    def load_state_dict(self, state: dict) -> None:
        self.momentum, self.min_std_share = state["momentum"], state["min_std_share"]
        self.mean, self.var = dict(state["mean"]), dict(state["var"])
