"""Grouping users by their learned embeddings: spherical k-means on the directions of per-user rows.

A cluster user model learns both who belongs together (the weights w_i) and what each group wants (the centres). In
PPO the first is the hard part: a user's weights move only through that user's few noisy rollouts, so from random
weights a user can settle in the wrong group for good. A personalized RM has already learned from every comparison
who agrees with whom; its per-user rows, grouped here, can seed the weights (`ppo.init_user_model=rm_clusters`).

Directions, not positions: a row's direction is what the user prefers, its length how much the model trusted it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def spherical_kmeans(points: torch.Tensor, k: int, seed: int = 0, restarts: int = 10,
                     max_iters: int = 100) -> torch.Tensor:
    """Cluster index in [0, k) of each row of `points` ([N, D]) by cosine similarity.

    k-means++ seeding (each next centre drawn with probability proportional to 1 - cosine to its nearest centre),
    then Lloyd steps with unit-length centres until no point changes cluster; the best of `restarts` runs (highest
    summed cosine to the own centre) wins. A cluster that loses every point keeps its old centre. Deterministic for
    a given `seed`. Clusters are numbered by their first point: point 0 is in cluster 0, the first point outside it
    in cluster 1, and so on, so equal groupings give equal labels. A zero row has no direction and joins cluster 0.
    """
    if points.dim() != 2:
        raise ValueError(f"points must be [N, D], got shape {tuple(points.shape)}")
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of points ({n}), got {k}")
    unit = F.normalize(points.detach().double(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    best, best_score = None, -float("inf")
    for _ in range(restarts):
        centres = unit[torch.randint(n, (1,), generator=gen)]
        while centres.shape[0] < k:
            gap = (1 - (unit @ centres.T).max(dim=1).values).clamp_min(0)
            pick = torch.multinomial(gap, 1, generator=gen) if gap.sum() > 0 else torch.randint(n, (1,), generator=gen)
            centres = torch.cat([centres, unit[pick]])
        assign = None
        for _ in range(max_iters):
            new = (unit @ centres.T).argmax(dim=1)
            if assign is not None and torch.equal(new, assign):
                break
            assign = new
            for j in range(k):
                members = unit[assign == j]
                if len(members) and members.sum(0).norm() > 0:
                    centres[j] = F.normalize(members.sum(0), dim=0)
        score = float((unit * centres[assign]).sum())
        if score > best_score + 1e-12:
            best, best_score = assign, score
    return _canonical_labels(best)


def _canonical_labels(assign: torch.Tensor) -> torch.Tensor:
    order = {}
    for a in assign.tolist():
        order.setdefault(a, len(order))
    return torch.tensor([order[a] for a in assign.tolist()], dtype=torch.long)
