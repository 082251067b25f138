"""Resumable checkpoints, written atomically, and without pickle unless DeepSpeed writes them.

A checkpoint is a folder `checkpoints/step-N/` holding `trainable.safetensors` (the parameters that train),
`optimizer.safetensors` + `optimizer.json`, `rng.safetensors`, `state.json` and, written last, `COMPLETE`. It is
assembled in a hidden temp folder and renamed into place, so a kill at any moment leaves either the previous
complete checkpoint or the new one, never a half-written folder that resume could pick.

With several processes (a DeepSpeed engine over ranks) every rank writes its DeepSpeed partition and its own RNG
state (`rng-rank-R.safetensors`, R > 0) into one shared temp folder named after the step; rank 0 writes the rest
and renames it. The run folder must be on a file system all ranks see (one machine, or a shared mount).
DeepSpeed's partitions (`deepspeed/`) are its own torch.save files, read back with torch.load: resume a
DeepSpeed run only from checkpoints you trust. The final weights (`checkpoint/`) are safetensors in every case.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from common import dist

COMPLETE = "COMPLETE"
_STEP = re.compile(r"^step-(\d+)$")


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in module.named_parameters() if p.requires_grad}


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, meta_state = {}, {}
    for pid, st in sd["state"].items():
        meta_state[str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
                meta_state[str(pid)][k] = "__tensor__"
            else:
                meta_state[str(pid)][k] = v
    return tensors, {"state": meta_state, "param_groups": sd["param_groups"]}


def _optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {k: (tensors[f"{pid}.{k}"] if v == "__tensor__" else v) for k, v in st.items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _atomic_folder(final: Path, shared: bool = False):
    """A fresh temp folder beside `final`. One process names it after its pid; ranks that write one checkpoint
    together cannot, so they share the step's name, and rank 0 alone clears and creates it."""
    if not shared:
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    else:
        tmp = final.parent / f".tmp-{final.name}-ranks"
        if not dist.is_main():
            return tmp
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _rng_file(rank: int) -> str:
    return "rng.safetensors" if rank == 0 else f"rng-rank-{rank}.safetensors"


def _fsync_tree(folder: Path) -> None:
    """Flush every file's content to disk: COMPLETE must never outlive, after a power cut, the data it vouches
    for (renames and directory fsyncs order names, not file contents)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        elif path.is_dir():
            _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FloatingPointError(f"refusing to write a checkpoint: {what} '{name}' contains NaN or inf")


def save_checkpoint(ckpt_root: Path, step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    extra: dict | None = None, extra_tensors: dict[str, torch.Tensor] | None = None,
                    keep_last: int = 2, engine=None) -> Path:
    shared = engine is not None and dist.world_size() > 1
    if dist.is_main():
        ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step}"
    tmp = _atomic_folder(final, shared)
    params = trainable_state(module)
    _check_finite(params, "parameter")
    if shared:
        dist.barrier()  # the folder exists before any rank writes into it
    if engine is not None:  # DeepSpeed writes its own (partitioned) states; every rank must call it.
        engine.save_checkpoint(str(tmp / "deepspeed"), tag="state")
    else:
        save_file(params, str(tmp / "trainable.safetensors"))
        if optimizer is not None:
            tensors, meta = _optimizer_to_flat(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(meta))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout masks on a GPU come from its stream
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / _rng_file(dist.rank())))  # ranks sample differently: each resumes its own stream
    if shared:
        dist.barrier()  # every rank's part is on disk before rank 0 declares the checkpoint complete
        if dist.is_main():
            _complete(tmp, final, ckpt_root, step, extra, extra_tensors, keep_last)
        dist.barrier()  # no rank goes on (and may resume from it) before it is in place
        return final
    _complete(tmp, final, ckpt_root, step, extra, extra_tensors, keep_last)
    return final


def _complete(tmp: Path, final: Path, ckpt_root: Path, step: int, extra: dict | None,
              extra_tensors: dict[str, torch.Tensor] | None, keep_last: int) -> None:
    """Write what only one process writes, mark the folder COMPLETE, rename it into place and prune."""
    if extra_tensors:
        save_file({k: v.detach().contiguous().cpu() for k, v in extra_tensors.items()}, str(tmp / "extra.safetensors"))
    state = {"step": step, "python_random": _py_state(), "numpy_random": _np_state(), **(extra or {})}
    (tmp / "state.json").write_text(json.dumps(state))
    _fsync_tree(tmp)
    (tmp / COMPLETE).write_text("ok\n")
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    prune(ckpt_root, keep_last)


def _py_state():
    v, state, gauss = random.getstate()
    return [v, list(state), gauss]


def _np_state():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. Temp folders and folders without COMPLETE are ignored."""
    if not ckpt_root.exists():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = _STEP.match(p.name)
        if m and (p / COMPLETE).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def prune(ckpt_root: Path, keep_last: int) -> None:
    for _, p in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_root.glob(".tmp-*"):  # leftovers of killed writers
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


def read_state(path: Path) -> dict:
    """A checkpoint's state.json (step, RNG states, what its writer added), without touching any weights."""
    return json.loads((Path(path) / "state.json").read_text())


def load_checkpoint(path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    engine=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore parameters, optimizer and RNG; returns (state.json contents, extra tensors)."""
    if engine is not None:
        engine.load_checkpoint(str(path / "deepspeed"), tag="state")
    else:
        params = load_file(str(path / "trainable.safetensors"))
        named = dict(module.named_parameters())
        missing = [n for n in params if n not in named]
        if missing:
            raise ValueError(f"{path}: checkpoint has parameters this model lacks: {missing[:3]}")
        with torch.no_grad():
            for n, t in params.items():
                named[n].copy_(t)
        if optimizer is not None and (path / "optimizer.safetensors").exists():
            _optimizer_from_flat(optimizer, load_file(str(path / "optimizer.safetensors")),
                                 json.loads((path / "optimizer.json").read_text()))
    state = json.loads((path / "state.json").read_text())
    rng_file = path / _rng_file(dist.rank())
    if not rng_file.exists():
        raise FileNotFoundError(f"{path}: no {rng_file.name}: this checkpoint was written by fewer processes "
                                f"than the {dist.world_size()} resuming it; resume with the same number")
    rng = load_file(str(rng_file))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    v, st, gauss = state["python_random"]
    random.setstate((v, tuple(st), gauss))
    name, keys, pos, has_gauss, cached = state["numpy_random"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    extra = load_file(str(path / "extra.safetensors")) if (path / "extra.safetensors").exists() else {}
    return state, extra
