"""Implicit user models (seed section 4.3): user index -> embedding of shape [T_u, d].

Index 0 is the generic (unknown) user for every kind. Tables are `nn.Embedding`s so a batch only touches the rows
of its users: gradients of every other row are exactly zero (and `sparse=True` makes them sparse tensors).
"""

from __future__ import annotations

import torch
from torch import nn


class ImplicitUserModel(nn.Module):
    kind: str = ""

    def __init__(self, n_users: int, n_tokens: int, dim: int):
        super().__init__()
        if n_tokens <= 0:
            raise ValueError(f"n_tokens (T_u) must be > 0, got {n_tokens}")
        if n_users < 0:
            raise ValueError(f"n_users must be >= 0, got {n_users}")
        self.n_users, self.n_tokens, self.dim = n_users, n_tokens, dim

    def forward(self, user_idx: torch.Tensor) -> torch.Tensor:  # [B] -> [B, T_u, d]
        raise NotImplementedError

    def _check(self, user_idx: torch.Tensor) -> None:
        if user_idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"user indices must be an integer tensor, got {user_idx.dtype}")
        if user_idx.numel() and (int(user_idx.min()) < 0 or int(user_idx.max()) > self.n_users):
            raise IndexError(f"user index out of range [0, {self.n_users}]: {user_idx.tolist()}")

    def add_users(self, n_new: int) -> list[int]:
        """Grow the table by `n_new` users initialised as the generic user; returns their indices."""
        raise NotImplementedError

    def extra_config(self) -> dict:
        return {}

    def user_parameters(self, user_idx: int) -> list[nn.Parameter]:
        """Parameters that hold one user's own embedding (used by per-user adaptation)."""
        raise NotImplementedError

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters every user's embedding depends on (e_0, the centres V, the uniform embedding)."""
        raise NotImplementedError


def _grow_embedding(old: nn.Embedding, n_new: int, init: torch.Tensor) -> nn.Embedding:
    new = nn.Embedding(old.num_embeddings + n_new, old.embedding_dim, padding_idx=old.padding_idx,
                       sparse=old.sparse, dtype=old.weight.dtype, device=old.weight.device)
    with torch.no_grad():
        new.weight[: old.num_embeddings] = old.weight
        new.weight[old.num_embeddings:] = init.to(new.weight)
    return new


class UniformUserModel(ImplicitUserModel):
    """Example 1: every user, seen or not, gets the same embedding. With it the pipeline is vanilla RLHF."""

    kind = "uniform"

    def __init__(self, n_users: int, n_tokens: int, dim: int, init: torch.Tensor | None = None):
        super().__init__(n_users, n_tokens, dim)
        self.shared = nn.Parameter(init.clone() if init is not None else torch.zeros(n_tokens, dim))

    def forward(self, user_idx: torch.Tensor) -> torch.Tensor:
        self._check(user_idx)
        return self.shared.unsqueeze(0).expand(user_idx.shape[0], -1, -1)

    def add_users(self, n_new: int) -> list[int]:
        start = self.n_users + 1
        self.n_users += n_new
        return list(range(start, start + n_new))

    def user_parameters(self, user_idx: int) -> list[nn.Parameter]:
        return []  # nothing is user-specific

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.shared]


class IndividualUserModel(ImplicitUserModel):
    """Example 2: e_i = e_0 + o_i, with o_0 = 0 so that index 0 is the generic embedding e_0."""

    kind = "individual"

    def __init__(self, n_users: int, n_tokens: int, dim: int, init: torch.Tensor | None = None,
                 offset_std: float = 0.0, sparse: bool = False):
        super().__init__(n_users, n_tokens, dim)
        self.generic = nn.Parameter(init.clone() if init is not None else torch.zeros(n_tokens, dim))
        # padding_idx=0 keeps o_0 at zero and never gives it a gradient.
        self.offsets = nn.Embedding(n_users + 1, n_tokens * dim, padding_idx=0, sparse=sparse)
        self.gates: nn.Embedding | None = None  # see gate_directions
        with torch.no_grad():
            self.offsets.weight.normal_(0.0, offset_std) if offset_std > 0 else self.offsets.weight.zero_()
            self.offsets.weight[0].zero_()

    def forward(self, user_idx: torch.Tensor) -> torch.Tensor:
        self._check(user_idx)
        offsets = self.offsets(user_idx)
        if self.gates is not None:
            offsets = offsets + self.gates(user_idx) * self.directions[user_idx]
        return self.generic.unsqueeze(0) + offsets.view(-1, self.n_tokens, self.dim)

    def gate_directions(self, directions: torch.Tensor) -> None:
        """Make each user's offset o_i = g_i * D_i: a fixed direction per user (row i of `directions`, [m + 1,
        T_u * d], e.g. the user's row of a trained reward model) times a learned scalar gate g_i that starts at 0;
        the free offsets are frozen (at their current value, 0 for a fresh model). At g = 0 the model is what it
        was. Learning one number per user from a handful of samples is far less noisy than learning T_u * d of them.
        `fold_gates` writes g_i * D_i into the offsets (a plain individual model again, what is saved)."""
        if self.gates is not None:
            raise RuntimeError("the offsets are gated already")
        if tuple(directions.shape) != tuple(self.offsets.weight.shape):
            raise ValueError(f"directions must be {tuple(self.offsets.weight.shape)}, got {tuple(directions.shape)}")
        self.register_buffer("directions", directions.detach().to(self.offsets.weight).clone(), persistent=False)
        self.gates = nn.Embedding(self.n_users + 1, 1, padding_idx=0, device=self.offsets.weight.device)
        with torch.no_grad():
            self.gates.weight.zero_()
        self.offsets.weight.requires_grad_(False)

    def fold_gates(self) -> None:
        if self.gates is None:
            return
        with torch.no_grad():
            self.offsets.weight += self.gates.weight * self.directions
        self.gates = None
        del self.directions
        self.offsets.weight.requires_grad_(True)

    def add_users(self, n_new: int) -> list[int]:
        if self.gates is not None:
            raise RuntimeError("fold the gates (fold_gates) before adding users")
        start = self.n_users + 1
        init = torch.zeros(n_new, self.n_tokens * self.dim)
        self.offsets = _grow_embedding(self.offsets, n_new, init)
        self.n_users += n_new
        return list(range(start, start + n_new))

    def user_parameters(self, user_idx: int) -> list[nn.Parameter]:
        return [self.offsets.weight] + ([self.gates.weight] if self.gates is not None else [])

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.generic]


class ClusterUserModel(ImplicitUserModel):
    """Example 3: e_i = V . w_i with K centres V [K, T_u, d] and w_i = softmax(a_i) on the simplex.

    Keeping w_i on the simplex makes every user a mixture of the centres (interpretable, and new users can be fitted
    with K numbers). The generic user 0 has its own weights, trained by the user-agnostic loss term.
    """

    kind = "cluster"

    def __init__(self, n_users: int, n_tokens: int, dim: int, n_clusters: int, init: torch.Tensor | None = None,
                 centre_std: float = 0.02, logit_std: float = 1.0, sparse: bool = False):
        super().__init__(n_users, n_tokens, dim)
        if n_clusters <= 0:
            raise ValueError(f"n_clusters (K) must be > 0, got {n_clusters}")
        self.n_clusters = n_clusters
        base = init if init is not None else torch.zeros(n_tokens, dim)
        if base.dim() == 2:  # one start for all centres: break the symmetry with noise
            base = base.unsqueeze(0).expand(n_clusters, -1, -1)
        if base.shape != (n_clusters, n_tokens, dim):
            raise ValueError(f"cluster init must be [T_u, d] or [K, T_u, d], got {tuple(base.shape)}")
        self.centres = nn.Parameter(base + centre_std * torch.randn(n_clusters, n_tokens, dim))
        self.logits = nn.Embedding(n_users + 1, n_clusters, sparse=sparse)
        with torch.no_grad():
            self.logits.weight.normal_(0.0, logit_std)

    def weights(self, user_idx: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(user_idx), dim=-1)

    def forward(self, user_idx: torch.Tensor) -> torch.Tensor:
        self._check(user_idx)
        # sum_k w_k V_k written as V_0 + sum_k>0 w_k (V_k - V_0) (the weights sum to 1): equal centres, as a stage
        # that starts at pi_SFT has them, give exactly V_0 whatever the weights, not V_0 up to rounding
        w, c = self.weights(user_idx), self.centres
        return c[0] + torch.einsum("bk,ktd->btd", w[:, 1:], c[1:] - c[0])

    def add_users(self, n_new: int) -> list[int]:
        start = self.n_users + 1
        init = self.logits.weight[0].detach().expand(n_new, -1)  # start from the generic mixture
        self.logits = _grow_embedding(self.logits, n_new, init)
        self.n_users += n_new
        return list(range(start, start + n_new))

    def extra_config(self) -> dict:
        return {"n_clusters": self.n_clusters}

    def user_parameters(self, user_idx: int) -> list[nn.Parameter]:
        return [self.logits.weight]

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.centres]


def build_implicit_user_model(kind: str, n_users: int, n_tokens: int, dim: int, n_clusters: int = 4,
                              init: torch.Tensor | None = None, init_std: float = 0.02,
                              sparse: bool = False) -> ImplicitUserModel:
    """`init` ([T_u, d]) is where every user starts, e.g. embeddings of real tokens of the LLM; the cluster model
    also takes [K, T_u, d], one start per centre."""
    if kind == "uniform":
        return UniformUserModel(n_users, n_tokens, dim, init=init)
    if kind == "individual":
        return IndividualUserModel(n_users, n_tokens, dim, init=init, sparse=sparse)
    if kind == "cluster":
        return ClusterUserModel(n_users, n_tokens, dim, n_clusters, init=init, centre_std=init_std, sparse=sparse)
    raise ValueError(f"unknown user model kind {kind!r}; expected one of 'uniform', 'individual', 'cluster'")
