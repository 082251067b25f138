"""The user model f_P(u) = concat(f_im(u^p), f_ex(u^t)) of seed section 4.3, and its save/load."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from user_models.implicit import ImplicitUserModel, build_implicit_user_model

WEIGHTS_NAME = "user_model.safetensors"
CONFIG_NAME = "user_model.json"


@dataclass
class UserPrefix:
    """A soft prompt per example: `embeds` [B, T, d] and `mask` [B, T] (0 where explicit text is padding)."""

    embeds: torch.Tensor
    mask: torch.Tensor


class ExplicitTextUserModel:
    """f_ex: the LLM's own (frozen) input embeddings of the user's text. Holds no parameters of its own, so the
    user model's weights never duplicate the LLM's embedding table."""

    @staticmethod
    def __call__(text_ids: torch.Tensor, text_mask: torch.Tensor, embed_tokens: Callable) -> UserPrefix:
        with torch.no_grad():
            embeds = embed_tokens(text_ids)
        return UserPrefix(embeds * text_mask.unsqueeze(-1).to(embeds.dtype), text_mask)


class UserModel(nn.Module):
    """One interface for every kind: `(user_idx [B], text_ids?, text_mask?, embed_tokens?) -> UserPrefix`."""

    def __init__(self, implicit: ImplicitUserModel, use_text: bool = False):
        super().__init__()
        self.implicit = implicit
        self.use_text = use_text
        self.explicit = ExplicitTextUserModel() if use_text else None

    @property
    def kind(self) -> str:
        return self.implicit.kind

    @property
    def n_users(self) -> int:
        return self.implicit.n_users

    @property
    def n_tokens(self) -> int:
        return self.implicit.n_tokens

    def forward(self, user_idx: torch.Tensor, text_ids: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, embed_tokens: Callable | None = None) -> UserPrefix:
        implicit = self.implicit(user_idx)
        mask = torch.ones(implicit.shape[:2], dtype=torch.long, device=implicit.device)
        if self.explicit is None or text_ids is None or text_ids.shape[1] == 0:
            return UserPrefix(implicit, mask)
        if embed_tokens is None:
            raise ValueError("the explicit user model needs the LLM's embed_tokens to embed user text")
        ex = self.explicit(text_ids, text_mask, embed_tokens)
        return UserPrefix(torch.cat([implicit, ex.embeds.to(implicit.dtype)], 1), torch.cat([mask, ex.mask.long()], 1))

    def user_tables(self) -> list[nn.Parameter]:
        """The parameters whose row i is user i's own (individual offsets, cluster logits; none for uniform): an
        optimizer should move only the rows of the users it saw."""
        return list(self.implicit.user_parameters(0))

    def sparse_tables(self) -> list[nn.Parameter]:
        """Embedding tables built with sparse gradients (`sparse=True`): one row per user."""
        return [m.weight for m in self.modules() if isinstance(m, nn.Embedding) and m.sparse]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> dict:
        return {"kind": self.kind, "n_users": self.n_users, "n_tokens": self.n_tokens, "dim": self.implicit.dim,
                "use_text": self.use_text, **self.implicit.extra_config(),
                "dtype": str(next(self.parameters()).dtype).replace("torch.", ""),
                "num_parameters": self.num_parameters()}

    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME))
        (folder / CONFIG_NAME).write_text(json.dumps(self.describe(), indent=1))


def build_user_model(kind: str, n_users: int, n_tokens: int, dim: int, n_clusters: int = 4, use_text: bool = False,
                     init: torch.Tensor | None = None, init_std: float = 0.02, sparse: bool = False) -> UserModel:
    implicit = build_implicit_user_model(kind, n_users, n_tokens, dim, n_clusters, init=init, init_std=init_std,
                                         sparse=sparse)
    return UserModel(implicit, use_text=use_text)


def load_user_model(folder: str | os.PathLike) -> UserModel:
    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: no user model here")
    cfg = json.loads(cfg_path.read_text())
    state = load_file(str(folder / WEIGHTS_NAME))
    # The per-user table's rows (index 0 is the generic user) are the count: the weights file is renamed into
    # place before its json (adapt_user), so after a kill between the two the table may hold one more user.
    rows = [t.shape[0] for name, t in state.items() if name.endswith((".offsets.weight", ".logits.weight"))]
    n_users = rows[0] - 1 if rows else cfg["n_users"]
    model = build_user_model(cfg["kind"], n_users, cfg["n_tokens"], cfg["dim"], cfg.get("n_clusters", 4),
                             cfg.get("use_text", False))
    model.load_state_dict(state)
    return model.to(getattr(torch, cfg.get("dtype", "float32")))
