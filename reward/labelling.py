"""Preference pairs labelled by a personalized reward model: the RM route's data for a DPO-style policy update.

The seed's second route trains the policy against a personalized RM with PPO. A cheaper use of the same RM
(RAFT / "best-of-n vs worst-of-n" pairs, as in online or iterative DPO): sample n answers per prompt once from
pi_SFT, score every answer for every user, and give each user the pair (its best answer, its worst answer). The
samples are shared by all users; only the ranking is personal, so one batch of generations yields a pair per
(prompt, user), and P-DPO then learns from pairs that differ the way each user's RM says they should.

`best_worst_pairs` is the pure part: which sample is chosen and which rejected for a user, and when there is no
pair (all scores within `min_margin`: the RM does not care, and a coin flip would be noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LabelledPair:
    """Indices into the prompt's samples: `chosen` scored `margin` above `rejected` for the user."""

    chosen: int
    rejected: int
    margin: float


def best_worst_pairs(scores: torch.Tensor, min_margin: float = 0.0,
                     valid: torch.Tensor | None = None) -> list[LabelledPair | None]:
    """For scores [n_users, n_samples] of one prompt's samples: per user, the highest- against the lowest-scored
    sample, or None when fewer than two samples are valid or the gap is not above `min_margin`.

    `valid` [n_samples] (bool) marks the samples that may appear in a pair at all (e.g. answers that ended with EOS:
    a cut answer is not an answer anyone wrote). Ties go to the lower index, so the result is deterministic."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [n_users, n_samples], got shape {tuple(scores.shape)}")
    n_samples = scores.shape[1]
    keep = torch.ones(n_samples, dtype=torch.bool) if valid is None else valid.bool().cpu()
    if keep.shape != (n_samples,):
        raise ValueError(f"valid must have shape ({n_samples},), got {tuple(keep.shape)}")
    idx = keep.nonzero(as_tuple=True)[0]
    out: list[LabelledPair | None] = []
    for row in scores.float().cpu():
        if len(idx) < 2:
            out.append(None)
            continue
        s = row[idx]
        hi, lo = int(idx[int(torch.argmax(s))]), int(idx[int(torch.argmin(s))])
        margin = float(row[hi] - row[lo])
        out.append(LabelledPair(hi, lo, margin) if margin > min_margin else None)
    return out
