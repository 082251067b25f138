"""Data-parallel processes (torchrun / the deepspeed launcher): who am I, how many are we, wait for the others.

Before DeepSpeed has set up torch.distributed the launcher's RANK / WORLD_SIZE say it; a plain `python -m ...`
has neither and is rank 0 of 1. Every rank trains; only rank 0 writes the run folder.
"""

from __future__ import annotations

import os

import torch


def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if _initialised() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return torch.distributed.get_world_size() if _initialised() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _initialised() and world_size() > 1:
        torch.distributed.barrier()


def _comm_device() -> torch.device:
    # NCCL moves only GPU tensors, gloo only CPU ones
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(items: list, rank: int, world_size: int, group: int = 1, what: str = "items") -> list:
    """Rank `rank`'s contiguous share of `items`, cut only between groups of `group` consecutive items, so that
    every rank gets the same number (the ranks' optimizer steps are collective and must line up)."""
    n_groups, rest = divmod(len(items), group)
    if rest or n_groups % world_size:
        raise ValueError(f"cannot split {len(items)} {what} (groups of {group}) evenly over {world_size} processes")
    per = n_groups // world_size * group
    return items[rank * per:(rank + 1) * per]


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Mean of each value over the ranks (all ranks must call it with the same keys); unchanged in one process."""
    if not values or not _initialised() or world_size() == 1:
        return values
    return {k: v / world_size() for k, v in sum_over_ranks(values).items()}


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Sum of each value over the ranks (all ranks must call it with the same keys); unchanged in one process."""
    if not values or not _initialised() or world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t)
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def gather_equal(t: torch.Tensor) -> torch.Tensor:
    """The ranks' tensors (same shape on every rank), concatenated in rank order along dim 0."""
    if not _initialised() or world_size() == 1:
        return t
    local = t.to(_comm_device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(world_size())]
    torch.distributed.all_gather(parts, local)
    return torch.cat(parts).to(t.device)


def teardown() -> None:
    """After a stage's work on every rank: wait for the others, then destroy the process group. Left to interpreter
    exit, the communication threads of a rank that finishes first can be torn down mid-flight ("terminate called
    without an active exception", SIGABRT, seen once in a two-process train_rm test)."""
    if _initialised() and world_size() > 1:  # one process (ZeRO on CPU, the demo, tests) keeps DeepSpeed's group
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def setup(cfg) -> None:
    """Refuse a multi-process launch that would not train one model, and put each rank on its own GPU."""
    if world_size() == 1:
        return
    from common.config import ConfigError

    if not cfg.train.deepspeed:
        raise ConfigError(f"launched as {world_size()} processes but config key 'train.deepspeed' is not set: "
                          "without a DeepSpeed engine nothing averages the gradients, so every process would train "
                          "a model of its own. Set train.deepspeed=configs/deepspeed/zero2.json")
    if cfg.train.device != "cpu" and torch.cuda.is_available():
        # "cuda" then means this rank's GPU, from the first tensor on (DeepSpeed would only move it there later).
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
