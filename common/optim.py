"""Optimizers for user tables that may hold millions of users.

With `user_model.sparse=true` the table (individual offsets, cluster logits) gets sparse gradients and a row-wise
AdaGrad: a step reads and writes only the rows of the users in the batch, and its state is one float per row
instead of AdamW's two copies of the table. Everything else keeps AdamW; `OptimizerSet` steps both as one.
"""

from __future__ import annotations

import torch


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
