"""Optimizers that move only the users a batch has seen.

A user table (individual offsets o_i, cluster logits a_i) is one parameter, but each row belongs to one user. With
dense AdamW a user absent from a batch gets a zero gradient and still moves on its stale moments (after one
gradient, about 4 x lr over the next ten steps): rarely-seen users drift, and in PPO such a row walked off the
embedding manifold into strings that hack the reward model. So user tables get their own optimizer:

- `LazyAdamW` (default, `user_model.table_optimizer=lazy_adamw`): Adam where an element whose gradient is exactly
  zero in a step is left alone: its value, its moments and its own step count. Rows of absent users are then
  bit-identical after the step, and a row's k-th update is Adam's k-th update of that row's own gradients. It works
  on any tensor shape, so also on the flattened partitions a DeepSpeed ZeRO optimizer hands it.
- `RowWiseAdagrad` (`user_model.sparse=true`): sparse gradients and one state float per row instead of Adam's two
  copies of the table, for millions of users.

`OptimizerSet` steps several optimizers as one.
"""

from __future__ import annotations

import torch


class LazyAdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter) whose groups marked `lazy=True` skip every element with an exactly-zero gradient.

    Dense groups (`lazy=False`, the default) are plain AdamW with bias correction on the optimizer's step. In a lazy
    group each element keeps its own step count: m, v and t of an element change only when its gradient is
    non-zero, and its update uses its own t for the bias correction, so a user's first update is lr * sign(g)
    whenever it comes. Weight decay (if any) is applied only where the element is updated.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, lazy: bool = False):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "lazy": lazy})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("LazyAdamW takes dense gradients; sparse user tables use RowWiseAdagrad "
                                       "(user_model.sparse=true)")
                g = g.float()
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros_like(p, dtype=torch.float32) if group["lazy"] else torch.zeros(())
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                if group["lazy"]:
                    hit = g != 0
                    if not bool(hit.any()):
                        continue
                    t.add_(hit.float())
                    m.copy_(torch.where(hit, beta1 * m + (1 - beta1) * g, m))
                    v.copy_(torch.where(hit, beta2 * v + (1 - beta2) * g * g, v))
                    tc = t.clamp(min=1)
                    update = (m / (1 - beta1 ** tc)) / ((v / (1 - beta2 ** tc)).sqrt() + eps)
                    if wd:
                        update = update + wd * p.float()
                    p.copy_(torch.where(hit, p.float() - lr * update, p.float()).to(p.dtype))
                else:
                    t.add_(1)
                    m.mul_(beta1).add_(g, alpha=1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    step = float(t)
                    denom = (v / (1 - beta2 ** step)).sqrt_().add_(eps)
                    if wd:
                        p.mul_(1 - lr * wd)
                    p.add_((m / (1 - beta1 ** step) / denom).to(p.dtype), alpha=-lr)
        return None


class RowWiseAdagrad(torch.optim.Optimizer):
    """AdaGrad with one accumulator per row of an embedding table (sparse or dense gradient).

    state["sum"][i] += mean_j g_ij^2;  w_i -= lr * g_i / (sqrt(state["sum"][i]) + eps), for the rows i in the batch.
    """

    def __init__(self, params, lr: float = 1e-2, eps: float = 1e-10):
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    g = g.coalesce()
                    rows, vals = g.indices()[0], g.values()
                else:
                    rows = g.flatten(1).abs().sum(1).nonzero().squeeze(1)
                    vals = g[rows]
                if rows.numel() == 0:
                    continue
                vals = vals.float().flatten(1)
                state = self.state[p]
                if not state:
                    state["sum"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                acc = state["sum"]
                acc.index_add_(0, rows, vals.pow(2).mean(1))
                denom = acc[rows].sqrt_().add_(group["eps"]).unsqueeze(1)
                p.index_add_(0, rows, (-group["lr"] * vals / denom).to(p.dtype).view(-1, *p.shape[1:]))
        return None


class OptimizerSet:
    """Several optimizers that act as one: `param_groups`, `step`, `zero_grad` and a `state_dict` in torch's
    layout (parameter ids numbered across the set), so schedules and checkpoints treat it like any optimizer."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self, closure=None):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            state.update({pid + offset: st for pid, st in sd["state"].items()})
            groups += [{**g, "params": [pid + offset for pid in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        offset, first = 0, 0
        for opt in self.optimizers:
            k = len(opt.param_groups)
            n = sum(len(g["params"]) for g in opt.param_groups)
            groups = [{**g, "params": [pid - offset for pid in g["params"]]} for g in sd["param_groups"][first:first + k]]
            state = {int(pid) - offset: st for pid, st in sd["state"].items() if offset <= int(pid) < offset + n}
            opt.load_state_dict({"state": state, "param_groups": groups})
            offset, first = offset + n, first + k


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> float:
    """`torch.nn.utils.clip_grad_norm_` that also accepts sparse gradients (torch's does not)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sq = [(g.coalesce().values() if g.is_sparse else g).float().pow(2).sum() for g in grads]
    total = float(torch.stack(sq).sum().sqrt())
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in grads:
            g.mul_(scale)
    return total
