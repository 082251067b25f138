"""Few-shot adaptation of one user's implicit embedding, with everything else frozen (issue 8).

`fit_user_embedding` fits the *single row* of the user table that belongs to one user:

- individual user model (e_i = e_0 + o_i): the offset row o_i;
- cluster user model (e_i = V . softmax(a_i)): the weight logits a_i, so w_i stays on the simplex.

The uniform user model has nothing user-specific to fit and is refused.

The optimiser never sees the table. It owns a separate leaf tensor holding the row; each step writes that tensor
into the table (no grad), runs the caller's loss closure, copies the table gradient of *that row* into the leaf and
steps Adam on the leaf alone. Other rows, e_0 / the centres, and every module passed in `freeze` are therefore
never written: their values stay bit-identical, whatever Adam's momentum does (and this is checked at the end).

Nothing here knows about files, runs, routes or losses: the caller brings the loss as a closure
(`common.run_users` builds one from a run's own training objective; `pipelines.adapt_user` is the CLI).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from user_models.implicit import ClusterUserModel, ImplicitUserModel, IndividualUserModel, UniformUserModel

log = logging.getLogger(__name__)

LossClosure = Callable[[], "torch.Tensor | Iterable[torch.Tensor]"]


class AdaptationError(ValueError):
    """The user model cannot be adapted this way (uniform model, generic user 0, index out of range, ...)."""


@dataclass
class FitResult:
    user_idx: int
    kind: str
    steps: int
    lr: float
    losses: list[float] = field(default_factory=list)  # loss of the row *before* each step's update
    final_loss: float = math.nan  # loss of the row that was kept
    best_step: int = 0  # number of updates applied to the kept row (0 = the init)
    wall_s: float = 0.0
    n_parameters: int = 0

    def to_dict(self) -> dict:
        return {"user_idx": self.user_idx, "kind": self.kind, "steps": self.steps, "lr": self.lr,
                "initial_loss": self.losses[0] if self.losses else None,
                "final_loss": None if math.isnan(self.final_loss) else self.final_loss,
                "best_step": self.best_step, "wall_s": self.wall_s, "n_parameters": self.n_parameters}


def _implicit(user_model: nn.Module) -> ImplicitUserModel:
    implicit = getattr(user_model, "implicit", user_model)
    if not isinstance(implicit, ImplicitUserModel):
        raise TypeError(f"expected a UserModel or an ImplicitUserModel, got {type(user_model).__name__}")
    return implicit


def user_table(user_model: nn.Module) -> nn.Parameter:
    """The [m + 1, ...] parameter whose row i is user i's own embedding (offsets or cluster logits)."""
    implicit = _implicit(user_model)
    if isinstance(implicit, UniformUserModel):
        raise AdaptationError("the uniform user model gives every user the same embedding: there is nothing "
                              "user-specific to fit (train the run with user_model.kind=individual or cluster)")
    if isinstance(implicit, IndividualUserModel):
        return implicit.offsets.weight
    if isinstance(implicit, ClusterUserModel):
        return implicit.logits.weight
    params = implicit.user_parameters(1) if implicit.n_users else []
    if len(params) != 1:
        raise AdaptationError(f"don't know which row of user model kind {implicit.kind!r} to adapt")
    return params[0]


def generic_row(user_model: nn.Module) -> torch.Tensor:
    """Where a new user starts, as `add_users` initialises it: offset 0 (individual) or the generic user's
    logits a_0 (cluster). Either way the new user's embedding equals the generic user's."""
    implicit = _implicit(user_model)
    table = user_table(implicit)
    if isinstance(implicit, ClusterUserModel):
        return table[0].detach().clone()
    return torch.zeros_like(table[0]).detach()


def _check_index(implicit: ImplicitUserModel, user_idx: int) -> None:
    if user_idx == 0:
        raise AdaptationError("user index 0 is the generic user, trained by the user-agnostic loss term; "
                              "adapt a real user (index 1..m)")
    if not 1 <= user_idx <= implicit.n_users:
        raise AdaptationError(f"user index {user_idx} out of range 1..{implicit.n_users}")


def reset_user(user_model: nn.Module, user_idx: int) -> None:
    """Set one user's row back to the generic init (as if just added by `add_users`)."""
    implicit = _implicit(user_model)
    _check_index(implicit, user_idx)
    table = user_table(implicit)
    with torch.no_grad():
        table[user_idx] = generic_row(implicit).to(table)


@contextlib.contextmanager
def only_trainable(params: list[nn.Parameter], modules: Iterable[nn.Module]):
    """Inside: every parameter of `modules` has requires_grad False except `params`. Flags restored on exit."""
    keep = {id(p) for p in params}
    saved = []
    seen = set()
    for module in modules:
        for p in module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            saved.append((p, p.requires_grad))
            p.requires_grad_(id(p) in keep)
    for p in params:
        if id(p) not in seen:
            saved.append((p, p.requires_grad))
            p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
            p.grad = None


def _run_closure(loss_fn: LossClosure, backward: bool) -> float:
    """Call the closure; it returns a scalar loss or an iterable of partial losses (chunks of the data, each
    already weighted so that they sum to the full loss). Each part is backpropagated as soon as it is produced,
    so memory holds one chunk's graph at a time."""
    out = loss_fn()
    parts = [out] if torch.is_tensor(out) else out
    total = 0.0
    for part in parts:
        if backward:
            part.backward()
        total += float(part.detach())
    return total


def fit_user_embedding(user_model: nn.Module, user_idx: int, loss_fn: LossClosure, *, steps: int = 50,
                       lr: float = 0.05, init: str = "generic", freeze: Iterable[nn.Module] = (),
                       l2: float = 0.0, max_grad_norm: float = 0.0, keep_best: bool = True,
                       log_every: int = 0) -> FitResult:
    """Fit user `user_idx`'s own row of `user_model` to minimise `loss_fn()`; everything else stays fixed.

    - `loss_fn`: closure with no arguments that runs the (frozen) model with the user model as it is and returns
      the loss (scalar tensor) or an iterable of partial losses that sum to it. It must only use rows
      `user_idx` (and optionally others: their gradients are ignored).
    - `init`: "generic" starts from the generic init (as `add_users` does); "current" from the row as it is.
    - `freeze`: modules (LLM, heads, ...) whose parameters get requires_grad False during the fit, so that the
      backward pass computes only what the row needs. Their values are never written either way.
    - `l2`: optional penalty l2 * ||row - init||^2, a Gaussian prior around the generic user for tiny k.
    - `keep_best`: keep the row with the lowest training loss seen (the loss is deterministic: full batch),
      which costs one extra forward pass for the last row; else the last row.

    Adam runs on a separate leaf tensor, so the other rows' values are exactly untouched.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if init not in ("generic", "current"):
        raise ValueError(f"init must be 'generic' or 'current', got {init!r}")
    implicit = _implicit(user_model)
    table = user_table(implicit)
    _check_index(implicit, user_idx)
    t0 = time.time()

    with torch.no_grad():
        if init == "generic":
            table[user_idx] = generic_row(implicit).to(table)
        start = table[user_idx].detach().float().clone()
        snapshot = {n: p.detach().clone() for n, p in implicit.named_parameters() if p is not table}
        others = torch.cat([table[:user_idx], table[user_idx + 1:]]).detach().clone()

    row = start.clone().requires_grad_(True)  # the only tensor the optimiser knows
    opt = torch.optim.Adam([row], lr=lr)
    result = FitResult(user_idx, implicit.kind, steps, lr, n_parameters=row.numel())
    best_loss, best_row, best_step = math.inf, start.clone(), 0

    def write_row(value: torch.Tensor) -> None:
        with torch.no_grad():
            table[user_idx] = value.to(table)

    with only_trainable([table], [user_model, *freeze]):
        for step in range(steps):
            write_row(row.detach())
            table.grad = None
            opt.zero_grad(set_to_none=True)
            loss = _run_closure(loss_fn, backward=True)
            if not math.isfinite(loss):
                raise FloatingPointError(f"adaptation loss is {loss} at step {step}")
            if l2 > 0:
                penalty = l2 * (row - start).pow(2).sum()
                penalty.backward()
                loss += float(penalty.detach())
            grad = table.grad
            if grad is None:
                raise AdaptationError("the loss does not depend on the user's row (does the closure score the "
                                      f"pairs as user {user_idx}?)")
            grad = grad.to_dense() if grad.is_sparse else grad
            row_grad = grad[user_idx].float()
            row.grad = row_grad if row.grad is None else row.grad + row_grad
            result.losses.append(loss)
            if loss < best_loss:
                best_loss, best_row, best_step = loss, row.detach().clone(), step
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([row], max_grad_norm)
            opt.step()
            if log_every and (step + 1) % log_every == 0:
                log.info("adapt user %d: step %d/%d loss %.4f", user_idx, step + 1, steps, loss)
        table.grad = None

    # The row after the last update has not been scored yet.
    write_row(row.detach())
    with torch.no_grad():
        last = _run_closure(loss_fn, backward=False) if (keep_best and steps) else math.nan
        if l2 > 0 and steps:
            last += float(l2 * (row.detach() - start).pow(2).sum())
    if keep_best and steps and not last <= best_loss:
        write_row(best_row)
        result.final_loss, result.best_step = best_loss, best_step
    else:
        result.final_loss = last if steps else math.nan
        result.best_step = steps

    # Nothing else may have moved: other rows and every other user-model parameter are bit-identical.
    with torch.no_grad():
        if not torch.equal(torch.cat([table[:user_idx], table[user_idx + 1:]]), others):
            raise RuntimeError("adaptation changed other users' rows")
        for n, p in implicit.named_parameters():
            if p is not table and not torch.equal(p, snapshot[n]):
                raise RuntimeError(f"adaptation changed the shared user-model parameter {n}")
    result.wall_s = time.time() - t0
    return result
