"""`user_scale`: memory and step time of the implicit user models as the number of users grows.

For the individual model (e_i = e_0 + o_i: a table of (n + 1) x T_u*d offsets) and the cluster model (K centres
[K, T_u, d] + a table of (n + 1) x K mixture logits), at each user count and with each optimizer:

- adamw: the project's optimizer (`common.trainer.make_optimizer`: dense AdamW) on every parameter. The table gets a
  dense gradient and two dense state tensors, so parameters + state are 3x the table and a step touches all of it.
- sparse_adam: `nn.Embedding(sparse=True)` (`build_user_model(..., sparse=True)`) + `torch.optim.SparseAdam` on the
  table, AdamW on the small dense parameters. A step touches only the batch's rows, but SparseAdam's two state
  tensors are still dense: memory stays 3x the table.
- rowwise_adagrad: sparse gradients + `common.optim.RowWiseAdagrad` (one accumulator value per row, as FBGEMM/TorchRec's
  row-wise AdaGrad for embedding tables): state is n + 1 floats, so memory is ~1x the table.

One step: a batch of --batch user indices (1..n), prefix = user_model(idx), loss = <prefix, w> for a fixed random w,
backward, optimizer step(s), zero_grad. `changed_rows` counts table rows whose values changed in the last timed step
(a random projection of each row, compared before and after); `batch_rows` is the number of distinct users of that
step. Dense AdamW keeps moving rows of users seen in *earlier* steps (their momentum is non-zero), the row-sparse
optimizers move only the batch's rows.

Configurations whose estimated peak memory (parameters + gradient + optimizer state + AdamW's temporary) exceeds
--max-gb are not allocated: a row says `skipped: would need X GB`. A float32 table that does not fit is retried as
bfloat16 (parameters and optimizer state in bf16) unless --no-bf16-fallback.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.common import BenchArgs, available_memory_bytes, free_memory, now, timed_stats
from common.optim import RowWiseAdagrad

GB = 1e9


def _sizes(kind: str, n: int, T: int, d: int, K: int) -> tuple[int, int]:
    """(table elements, dense elements) of a user model."""
    if kind == "individual":
        return (n + 1) * T * d, T * d
    return (n + 1) * K, K * T * d


def estimate(kind: str, optim: str, n: int, T: int, d: int, K: int, elem: int) -> dict[str, float]:
    """Bytes of parameters + optimizer state after a step, and the estimated peak during a step."""
    table, dense = _sizes(kind, n, T, d, K)
    params = (table + dense) * elem
    dense_state = 2 * dense * elem
    if optim == "adamw":
        state = 2 * table * elem + dense_state
        transient = 2 * table * elem + 2 * dense * elem  # dense gradient + AdamW's denominator temporary
    elif optim == "sparse_adam":
        state = 2 * table * elem + dense_state
        transient = 2 * dense * elem
    else:  # rowwise_adagrad
        state = (n + 1) * 4 + dense_state
        transient = 2 * dense * elem
    return {"param_bytes": params, "state_bytes": state, "bytes": params + state,
            "peak_bytes": params + state + transient}


def _table(um) -> torch.nn.Embedding:
    imp = um.implicit
    return imp.offsets if imp.kind == "individual" else imp.logits


def _row_hash(weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """A random projection of every row (chunked: at most ~256 MB of float32 at a time)."""
    rows = max(1, (1 << 26) // max(weight.shape[1], 1))
    out = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for s in range(0, weight.shape[0], rows):
        out[s:s + rows] = weight[s:s + rows].float() @ r
    return out


def _state_bytes(optimizers) -> int:
    total = 0
    for opt in optimizers:
        for st in opt.state.values():
            for v in st.values():
                if torch.is_tensor(v):
                    total += v.numel() * v.element_size()
    return total


def measure(a: BenchArgs, kind: str, optim: str, n: int, dtype: torch.dtype) -> dict[str, Any]:
    from common.config import Config
    from common.trainer import make_optimizer
    from user_models import build_user_model

    device = torch.device(a.device)
    T, d, K = a.n_tokens, a.dim, a.clusters
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the table directly in its dtype: no float32 copy on the way
    try:
        with torch.device(device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(a.seed)
            um = build_user_model(kind, n, T, d, K, sparse=optim != "adamw", init_std=0.02)
    finally:
        torch.set_default_dtype(old_dtype)
    table = _table(um).weight
    dense = [p for p in um.parameters() if p is not table]
    if optim == "adamw":
        opts = [make_optimizer([{"params": list(um.parameters()), "lr": a.lr, "weight_decay": 0.0}], Config())]
    else:
        sparse_opt = (torch.optim.SparseAdam([table], lr=a.lr) if optim == "sparse_adam"
                      else RowWiseAdagrad([table], lr=a.lr))
        opts = [sparse_opt, make_optimizer([{"params": dense, "lr": a.lr, "weight_decay": 0.0}], Config())]

    g = torch.Generator().manual_seed(a.seed + 1)
    w = torch.randn(T, d, generator=g).to(device)
    r = torch.randn(table.shape[1], generator=g).to(device)
    times: list[float] = []
    seen: set[int] = set()
    batch_rows = changed = touched_before = None
    total = a.warmup + a.steps
    for step in range(total):
        idx_cpu = torch.randint(1, n + 1, (a.batch,), generator=g)
        idx = idx_cpu.to(device)
        last = step == total - 1
        if last:
            before = _row_hash(table.detach(), r)
        t0 = now(device)
        prefix = um(idx).embeds
        loss = (prefix.float() * w).sum()
        loss.backward()
        for o in opts:
            o.step()
        for o in opts:
            o.zero_grad(set_to_none=True)
        dt = now(device) - t0
        if step >= a.warmup:
            times.append(dt)
        batch = set(idx_cpu.tolist())
        if last:
            changed = int((_row_hash(table.detach(), r) != before).sum())
            batch_rows = len(batch)
            touched_before = len(seen)
        seen |= batch
    param_bytes = sum(p.numel() * p.element_size() for p in um.parameters())
    state_bytes = _state_bytes(opts)
    row = {"bytes": param_bytes + state_bytes, "gb": (param_bytes + state_bytes) / GB, "param_bytes": param_bytes,
           "state_bytes": state_bytes, **timed_stats(times), "batch_rows": batch_rows, "changed_rows": changed,
           "rows_touched_before": touched_before}
    if on_gpu:
        row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    del um, opts, table, dense
    free_memory(device)
    return row


def run_user_scale(a: BenchArgs) -> list[dict]:
    a.batch = a.batch or 16
    a.n_tokens = a.n_tokens or 10
    budget = a.max_gb * GB if a.max_gb else (0.8 if a.device.startswith("cuda") else 0.4) * available_memory_bytes(
        a.device)
    base = torch.bfloat16 if a.dtype == "bfloat16" else torch.float32
    rows = []
    for n in a.users:
        for kind in ("individual", "cluster"):
            for optim in a.optims:
                if optim not in ("adamw", "sparse_adam", "rowwise_adagrad"):
                    raise SystemExit(f"unknown optimizer {optim!r}: adamw | sparse_adam | rowwise_adagrad")
                impl = f"{kind}/{optim}"
                if not a.want(impl) and not a.want(kind):
                    continue
                head = {"impl": impl, "users": n, "kind": kind, "optim": optim, "T_u": a.n_tokens, "d": a.dim,
                        **({"K": a.clusters} if kind == "cluster" else {})}
                tries = [base] + ([torch.bfloat16] if a.bf16_fallback and base == torch.float32 else [])
                done = False
                for dt in tries:
                    est = estimate(kind, optim, n, a.n_tokens, a.dim, a.clusters, torch.finfo(dt).bits // 8)
                    if est["peak_bytes"] > budget:
                        continue
                    row = {**head, "dtype": str(dt).replace("torch.", ""), "est_bytes": est["bytes"],
                           "peak_gb_est": est["peak_bytes"] / GB}
                    row.update(measure(a, kind, optim, n, dt))
                    rows.append(row)
                    done = True
                    break
                if not done:
                    ests = {str(dt).replace("torch.", ""): estimate(kind, optim, n, a.n_tokens, a.dim, a.clusters,
                                                                    torch.finfo(dt).bits // 8) for dt in tries}
                    first = ests[str(base).replace("torch.", "")]
                    why = "; ".join(f"{k}: {v['peak_bytes'] / GB:.1f} GB peak ({v['bytes'] / GB:.1f} GB params+state)"
                                    for k, v in ests.items())
                    rows.append({**head, "dtype": str(base).replace("torch.", ""), "bytes": first["bytes"],
                                 "gb": first["bytes"] / GB, "step_s": None, "estimated": True,
                                 "skipped": f"would need {why}; budget {budget / GB:.1f} GB"})
    return rows
