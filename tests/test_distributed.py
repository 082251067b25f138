"""Data-parallel training over several processes: each rank's share of the data, and real 2-process runs
(`torchrun --nproc_per_node 2`, DeepSpeed ZeRO-2 over gloo on CPU) of train_rm and train_ppo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from common import dist
from common.config import ConfigError, load_config
from common.trainer import batch_indices
from tests.conftest import toy_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
ZERO2 = ROOT / "configs" / "deepspeed" / "zero2.json"


# ------------------------------------------------------------------------------------------------ shares


@pytest.mark.parametrize("n", [16, 7])
def test_batch_indices_split_one_global_batch_over_ranks(n):
    for step, micro in ((0, 0), (3, 1), (11, 0)):
        args = (n, 3, 5, step, micro, 2)
        r0 = batch_indices(*args, rank=0, world_size=2)
        r1 = batch_indices(*args, rank=1, world_size=2)
        whole = batch_indices(n, 6, 5, step, micro, 2, rank=0, world_size=1)
        assert len(r0) == len(r1) == 3
        assert r0 + r1 == whole  # the global batch of 2 x 3, drawn as one process would draw a batch of 6
        if n >= 6:
            assert not set(r0) & set(r1)


def test_batch_indices_one_process_unchanged():
    """The indices of one process are those every earlier run and checkpoint was made with."""
    import math

    def before(n, batch_size, seed, step, micro, grad_accum):  # the function as it was before ranks
        per_epoch = max(n // batch_size, 1)
        epoch, pos = divmod(step * grad_accum + micro, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        chunk = perm[pos * batch_size:(pos + 1) * batch_size]
        return chunk if len(chunk) == batch_size else (perm * math.ceil(batch_size / max(n, 1)))[:batch_size]

    for args in ((16, 4, 0, 0, 0, 1), (16, 4, 0, 7, 1, 2), (5, 8, 3, 2, 0, 1), (30, 7, 1, 9, 0, 1)):
        assert batch_indices(*args) == before(*args) == batch_indices(*args, rank=0, world_size=1)


def _fake_ppo(rollout=12, k=2, minibatch=4):
    from policy.ppo.trainer import PPOTrainer

    cfg = load_config(None, [f"ppo.rollout_batch_size={rollout}", f"ppo.samples_per_prompt={k}",
                             f"ppo.minibatch_size={minibatch}"])
    fake = SimpleNamespace(ppo=cfg.ppo, cfg=cfg, prompts=[f"p{i}" for i in range(20)], users=["a", "b", "c"])
    fake._seed = lambda it, stream: PPOTrainer._seed(fake, it, stream)
    return fake, PPOTrainer


@pytest.mark.parametrize("world", [2, 3])
def test_ppo_pairs_split_over_ranks_in_whole_groups(world):
    fake, PPOTrainer = _fake_ppo(rollout=12, k=2)
    whole = PPOTrainer.sample_pairs(fake, 4, rank=0, world_size=1)
    assert whole == PPOTrainer.sample_pairs(fake, 4)  # one process: the whole batch
    shares = [PPOTrainer.sample_pairs(fake, 4, rank=r, world_size=world) for r in range(world)]
    assert sum(shares, []) == whole  # disjoint slices of one global batch, in rank order
    assert {len(s) for s in shares} == {12 // world}
    for s in shares:  # each share starts on a group boundary and holds whole groups of k identical pairs
        assert len(s) % 2 == 0 and all(s[i] == s[i + 1] for i in range(0, len(s), 2))


def test_ppo_uneven_split_is_refused():
    fake, PPOTrainer = _fake_ppo(rollout=12, k=2)
    with pytest.raises(ValueError, match="cannot split 12 rollout samples .groups of 2. evenly over 4 processes"):
        PPOTrainer.sample_pairs(fake, 0, rank=0, world_size=4)


def test_ppo_sampling_seed_differs_per_rank(monkeypatch):
    from policy.ppo.trainer import PPOTrainer

    seeds = []
    for r in range(3):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        seeds.append(PPOTrainer._rank_seed(123))
    assert seeds[0] == 123 and len(set(seeds)) == 3


def test_several_processes_without_deepspeed_are_refused(monkeypatch):
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match="train.deepspeed"):
        dist.setup(load_config(None, ["model.name=tiny-random"]))


# ------------------------------------------------------------------------------------------------ torchrun


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(stage: str, overrides: dict, dump: Path) -> None:
    """`torchrun --nproc_per_node 2 -m pipelines.<stage>`; every rank dumps its final trainable weights to `dump`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", f"pipelines.{stage}", *[f"{k}={v}" for k, v in overrides.items()]]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
                "PRLHF_DUMP_RANK_WEIGHTS": str(dump)})
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]


def _rank_weights(dump: Path) -> tuple[dict, dict]:
    a, b = load_file(str(dump / "rank-0.safetensors")), load_file(str(dump / "rank-1.safetensors"))
    assert a and a.keys() == b.keys()
    return a, b


def _assert_two_rank_checkpoint(step_dir: Path) -> None:
    assert (step_dir / "COMPLETE").exists() and (step_dir / "state.json").exists()
    assert (step_dir / "rng.safetensors").exists() and (step_dir / "rng-rank-1.safetensors").exists()
    state = step_dir / "deepspeed" / "state"
    assert (state / "zero_pp_rank_0_mp_rank_00_optim_states.pt").exists()
    assert (state / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()
    assert not list(step_dir.parent.glob(".tmp-*"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist_data")
    rows = toy_rows(12)
    return write_jsonl(folder / "train.jsonl", rows[:16]), write_jsonl(folder / "eval.jsonl", rows[16:20])


def _rm_overrides(out: Path, train: Path, **extra) -> dict:
    """SGD: its update is linear in the gradient, so the layouts' different summation orders stay at rounding size
    in the weights. Under Adam an element whose gradient is near zero moves by about lr * sign(g), and the sign of
    a rounding-size gradient depends on the CPU and the reduction order (a 1e-5 tolerance held on one machine only)."""
    return {"model.name": "tiny-random", "output_dir": out, "data.train_path": train, "report_to": "none",
            "train.device": "cpu", "train.lr": 0.03, "train.optimizer": "sgd", "train.max_steps": 3,
            "eval.n_generation_prompts": 0, **extra}


@pytest.fixture(scope="module")
def single_rm(tmp_path_factory, data):
    """One process, plain torch, batch 4: the run two ranks of batch 2 must reproduce (and PPO's reward model)."""
    from pipelines.train_rm import run

    out = tmp_path_factory.mktemp("single") / "rm"
    run(load_config(None, [f"{k}={v}" for k, v in _rm_overrides(out, data[0], **{"train.batch_size": 4}).items()]))
    return out


def test_train_rm_on_two_processes(tmp_path, data, single_rm):
    """Two ranks of batch 2 take the steps one process takes with batch 4 (disjoint halves of each global batch,
    gradients averaged); both ranks end with identical weights, rank 0 writes a complete run folder, and a 2-rank
    checkpoint resumes to the same weights."""
    pytest.importorskip("deepspeed")
    train, evals = data
    out = tmp_path / "rm"
    over = _rm_overrides(out, train, **{"train.batch_size": 2, "train.deepspeed": ZERO2, "train.save_every": 2,
                                        "data.eval_path": evals})
    _torchrun("train_rm", over, tmp_path / "dump")
    a, b = _rank_weights(tmp_path / "dump")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for name in ("config.yaml", "users.json", "run.json", "metrics.json", "report.md", "metrics_log.jsonl",
                 "checkpoint/user_model.safetensors", "checkpoint/score_head.safetensors", "eval/metrics.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "metrics.json").read_text())["overall"]["n"] == 4
    _assert_two_rank_checkpoint(out / "checkpoints" / "step-2")

    single = load_file(str(single_rm / "checkpoint" / "adapter" / "adapter_model.safetensors"))
    both = load_file(str(out / "checkpoint" / "adapter" / "adapter_model.safetensors"))
    assert max(float(v.abs().max()) for k, v in single.items() if "lora_B" in k) > 1e-4  # LoRA B starts at 0
    for k in single:
        # gradients are clipped to norm <= 1: the layouts differ by float32 rounding of gradients <= 1, times lr,
        # over 3 steps (about 1e-8); a wrong data split or averaging differs by the size of a step
        assert torch.allclose(single[k], both[k], atol=1e-6, rtol=0), (k, float((single[k] - both[k]).abs().max()))
    users = load_file(str(out / "checkpoint" / "user_model.safetensors"))
    for k, v in users.items():
        assert torch.equal(a[f"backbone.user_model.{k}"], v), k
    loss = [json.loads(line) for line in (out / "metrics_log.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (single_rm / "metrics_log.jsonl").read_text().splitlines()]
    assert loss[0]["train/loss"] == pytest.approx(ref[0]["train/loss"], abs=1e-5)

    # resume: both ranks load the step-2 checkpoint and redo step 3 to the same weights
    _torchrun("train_rm", over, tmp_path / "dump_resumed")
    assert json.loads((out / "run.json").read_text())["train"]["resumed_from"] == 2
    c, _ = _rank_weights(tmp_path / "dump_resumed")
    for k in a:
        assert torch.allclose(a[k], c[k], atol=1e-6), k


def test_train_ppo_on_two_processes(tmp_path, data, single_rm):
    pytest.importorskip("deepspeed")
    out = tmp_path / "ppo"
    _torchrun("train_ppo", {"model.name": "tiny-random", "output_dir": out, "data.train_path": data[0],
                            "ppo.rm_run": single_rm, "report_to": "none", "train.device": "cpu",
                            "train.deepspeed": ZERO2, "train.max_steps": 2, "train.save_every": 1,
                            "ppo.rollout_batch_size": 4, "ppo.minibatch_size": 2, "ppo.max_new_tokens": 6,
                            "ppo.generic_user_share": 0.25, "train.lr": 0.003}, tmp_path / "dump")
    a, b = _rank_weights(tmp_path / "dump")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for name in ("config.yaml", "users.json", "run.json", "metrics.json", "ppo_history.json",
                 "checkpoint/user_model.safetensors", "checkpoint/value_head.safetensors"):
        assert (out / name).exists(), name
    assert len(json.loads((out / "ppo_history.json").read_text())["iterations"]) == 2
    _assert_two_rank_checkpoint(out / "checkpoints" / "step-1")
