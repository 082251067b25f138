"""Shared pieces of the benchmarks: machine description, synchronised timers, synthetic data, configs, FLOPs."""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.batching import EncodedPair
from common.config import Config, load_config

# --------------------------------------------------------------------------------------------- options


@dataclass
class BenchArgs:
    """Everything a benchmark reads from the command line (see `bench.run --help`)."""

    name: str
    model: str = "tiny-random"
    device: str = "cpu"
    dtype: str = "float32"
    dtypes: tuple[str, ...] | None = None  # several dtypes in one run: every impl in each (rows carry `dtype`)
    steps: int = 5
    warmup: int = 1
    batch: int | None = None  # each benchmark has its own default
    prompt_len: int = 64
    response_len: int = 64
    n_users: int = 10
    n_tokens: int | None = None  # T_u; default: the config's (4) for LLM benchmarks, 10 for user_scale
    lr: float = 1e-4
    peak_tflops: float | None = None
    threads: int = 0
    impls: list[str] | None = None
    rounds: int = 1  # step benchmarks: run every impl this many times, rotating the order, and pool the steps
    # ppo_rollout
    max_new_tokens: int = 32
    sample: bool = False
    ppo_iteration: bool = True
    # user_scale
    users: tuple[int, ...] = (10, 1_000, 100_000, 1_000_000)
    dim: int = 576
    clusters: int = 100
    optims: tuple[str, ...] = ("adamw", "sparse_adam", "rowwise_adagrad")
    max_gb: float | None = None
    bf16_fallback: bool = True
    seed: int = 0
    # serve
    serve_run: str | None = None  # a finished policy run to serve (None: an untrained P-DPO run of --model)
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests: int = 16

    def want(self, impl: str) -> bool:
        return not self.impls or impl in self.impls


# --------------------------------------------------------------------------------------------- machine


def _cpuinfo_field(name: str) -> str | None:
    """The first `name : value` line of /proc/cpuinfo (None where there is no such file or line)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> list[str]:
    return (_cpuinfo_field("flags") or "").split()


def machine_info(device: str) -> str:
    torch_v = f"torch {torch.__version__}"
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), {torch_v}, CUDA {torch.version.cuda}"
    return f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {torch_v}"


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for mod in ("transformers", "trl", "peft"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional library only drops its version
            pass
    return out


# --------------------------------------------------------------------------------------------- timing


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def now(device) -> float:
    """A timestamp after all queued device work has finished."""
    sync(device)
    return time.perf_counter()


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def timed_stats(times: list[float]) -> dict[str, Any]:
    return {"step_s": median(times), "step_s_min": min(times) if times else None,
            "step_s_max": max(times) if times else None, "n_timed": len(times), "times": list(times)}


def free_memory(device) -> None:
    gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def available_memory_bytes(device) -> int:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


# --------------------------------------------------------------------------------------------- FLOPs


def flops_fields(n_params: int, tokens: int, step_s: float | None, peak_tflops: float | None) -> dict[str, Any]:
    """6 * N * tokens per training step (forward 2N + backward 4N per token; with LoRA the weight gradients of
    frozen matrices are skipped, so this overstates the work by up to a third), and MFU against a given peak."""
    flops = 6.0 * n_params * tokens
    out: dict[str, Any] = {"tokens": tokens, "flops": flops}
    if step_s:
        out["tflops_per_s"] = flops / step_s / 1e12
        if peak_tflops:
            out["mfu"] = out["tflops_per_s"] / peak_tflops
    return out


# --------------------------------------------------------------------------------------------- configs and data


def bench_config(a: BenchArgs, run_dir: str | Path, extra: dict[str, Any] | None = None) -> Config:
    """A validated project config for one benchmark implementation (built with the project's own loader)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = {
        "model.name": a.model, "model.dtype": "auto", "train.dtype": a.dtype, "train.device": a.device,
        "output_dir": str(run_dir),
        "report_to": "none", "seed": a.seed, "train.batch_size": a.batch, "train.grad_accum": 1,
        "train.max_steps": a.warmup + a.steps, "train.lr": a.lr, "train.log_every": 10**6, "train.save_every": 0,
        "train.resume": "never", "train.eval_batch_size": a.batch,
        "data.max_prompt_length": a.prompt_len, "data.max_response_length": a.response_len + 1,
    }
    if a.n_tokens is not None:
        values["user_model.n_tokens"] = a.n_tokens
    values.update(extra or {})
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in values.items()])


def token_pool(tokenizer) -> torch.Tensor:
    """Ids synthetic sequences draw from: the whole vocabulary but the special tokens (no pad/EOS inside)."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)


def synthetic_pairs(tokenizer, n_pairs: int, prompt_len: int, response_len: int, n_users: int,
                    seed: int = 0) -> list[EncodedPair]:
    """Random token sequences of fixed lengths: every batch costs exactly the same, for every implementation."""
    g = torch.Generator().manual_seed(seed)
    pool = token_pool(tokenizer)

    def draw(n):
        return pool[torch.randint(len(pool), (n,), generator=g)].tolist()

    users = torch.randint(1, n_users + 1, (n_pairs,), generator=g).tolist() if n_users else [0] * n_pairs
    return [EncodedPair(draw(prompt_len), draw(response_len), draw(response_len), u) for u in users]


def run_tmpdir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=f"prlhf-bench-{prefix}-")


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------- output


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1e5 or abs(v) < 1e-3:
            return f"{v:.3g}"
        return f"{v:.4g}"
    return str(v)


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A markdown table of the rows (the columns given, or every key in order of first appearance)."""
    if columns is None:
        columns = []
        for r in rows:
            for k in r:
                if k not in columns:
                    columns.append(k)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)
