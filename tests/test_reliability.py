"""Issue 6: resume after SIGKILL, atomic checkpoints, NaN guard, refusal of mismatched run folders."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common import checkpoint as ckpt
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def _run_stage(stage, overrides, env=None, wait=True):
    cmd = [sys.executable, "-m", f"pipelines.{stage}"] + overrides
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    return proc


def _final_weights(run_dir: Path) -> dict:
    w = load_file(str(run_dir / "checkpoint" / "user_model.safetensors"))
    w.update({f"adapter.{k}": v for k, v in load_file(
        str(run_dir / "checkpoint" / "adapter" / "adapter_model.safetensors")).items()})
    return w


@pytest.mark.parametrize("stage", ["train_rm", "train_pdpo"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, toy_data, stage):
    train, evals = toy_data
    common = {"train.max_steps": 12, "train.save_every": 3, "eval.n_generation_prompts": 0}
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    _run_stage(stage, tiny_overrides(tmp_path, train, evals, output_dir=ref_dir, **common))

    over = tiny_overrides(tmp_path, train, evals, output_dir=killed_dir, **common)
    proc = _run_stage(stage, over, env={"PRLHF_STEP_SLEEP": "0.3"}, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not ckpt.list_checkpoints(killed_dir / "checkpoints"):
        time.sleep(0.05)
    time.sleep(0.4)  # let it run into the next steps, then kill without warning
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = ckpt.list_checkpoints(killed_dir / "checkpoints")
    assert done and done[-1][0] < 12, "the kill must land mid-run"
    assert not (killed_dir / "checkpoint").exists()

    _run_stage(stage, over)  # train.resume=auto is the default
    # it went on from the last checkpoint (a silent restart from step 0 would end with the same weights too)
    assert json.loads((killed_dir / "run.json").read_text())["train"]["resumed_from"] == done[-1][0]
    log = [json.loads(l) for l in (killed_dir / "metrics_log.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in log if "train/loss" in r]
    assert train_steps[-1] == 12
    a, b = _final_weights(ref_dir), _final_weights(killed_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    m_ref = json.loads((ref_dir / "metrics.json").read_text())
    m_kill = json.loads((killed_dir / "metrics.json").read_text())
    assert m_ref["overall"] == m_kill["overall"]
    assert m_ref["training"]["final_loss"] == pytest.approx(m_kill["training"]["final_loss"], abs=1e-6)


def test_sigkill_then_resume_matches_uninterrupted_ppo(tmp_path, toy_data):
    from tests.test_ppo import make_rm_run, ppo_overrides

    train, _ = toy_data
    rm_run = make_rm_run(tmp_path / "rm")
    extra = {"train.max_steps": 6, "train.save_every": 2}
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    _run_stage("train_ppo", ppo_overrides(ref_dir, train, rm_run, **extra))
    over = ppo_overrides(killed_dir, train, rm_run, **extra)
    proc = _run_stage("train_ppo", over, env={"PRLHF_STEP_SLEEP": "0.5"}, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not ckpt.list_checkpoints(killed_dir / "checkpoints"):
        time.sleep(0.05)
    time.sleep(0.6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = ckpt.list_checkpoints(killed_dir / "checkpoints")
    assert done and done[-1][0] < 6 and not (killed_dir / "checkpoint").exists()
    _run_stage("train_ppo", over)
    assert json.loads((killed_dir / "run.json").read_text())["train"]["resumed_from"] == done[-1][0]
    a, b = _final_weights(ref_dir), _final_weights(killed_dir)
    a.update(load_file(str(ref_dir / "checkpoint" / "value_head.safetensors")))
    b.update(load_file(str(killed_dir / "checkpoint" / "value_head.safetensors")))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    hist_a = json.loads((ref_dir / "ppo_history.json").read_text())
    hist_b = json.loads((killed_dir / "ppo_history.json").read_text())
    assert len(hist_b["iterations"]) == len(hist_a["iterations"]) == 6
    assert hist_b["iterations"][-1]["reward_mean"] == pytest.approx(hist_a["iterations"][-1]["reward_mean"], abs=1e-6)


def test_half_written_checkpoint_is_never_picked(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    ckpt.save_checkpoint(root, 2, model, opt)
    # A writer killed mid-way: the save of step 4 dies after some files were written.
    calls = {"n": 0}
    real = ckpt.save_file

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(ckpt, "save_file", dying)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, 4, model, opt)
    monkeypatch.setattr(ckpt, "save_file", real)
    # Also a folder that looks like a checkpoint but was never completed.
    (root / "step-6").mkdir()
    (root / "step-6" / "trainable.safetensors").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(root) == root / "step-2"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2]


def test_keep_last_prunes(tmp_path):
    model = torch.nn.Linear(2, 1)
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, model, None, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]


def test_checkpoint_files_reach_the_disk_before_complete(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.is_file():
            synced.append((path.name, (path.parent / ckpt.COMPLETE).exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    model = torch.nn.Linear(2, 1)
    ckpt.save_checkpoint(tmp_path, 1, model, torch.optim.AdamW(model.parameters()))
    names = {name for name, _ in synced}
    assert {"trainable.safetensors", "optimizer.safetensors", "state.json"} <= names
    assert not any(complete for _, complete in synced)  # all of them before COMPLETE was written


def test_checkpoint_refuses_nan(tmp_path):
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        ckpt.save_checkpoint(tmp_path, 1, model, None)
    assert ckpt.list_checkpoints(tmp_path) == []
    assert not (tmp_path / "step-1").exists()


def test_nan_loss_stops_with_step(tmp_path, toy_data):
    from common.config import load_config
    from pipelines.train_rm import run
    from common.trainer import TrainingError

    train, evals = toy_data
    cfg = load_config(None, tiny_overrides(tmp_path, train, evals, **{"train.lr": 1e30, "train.max_grad_norm": 0.0,
                                                                       "train.max_steps": 30, "train.save_every": 1}))
    with pytest.raises(TrainingError, match=r"at step \d+"):
        run(cfg)
    for _, path in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints"):
        for t in load_file(str(path / "trainable.safetensors")).values():
            assert torch.isfinite(t).all()


def test_run_folder_mismatch_refused(tmp_path, toy_data):
    from common.config import load_config
    from common.run import load_backbone_from_run
    from pipelines.train_rm import run

    train, evals = toy_data
    run(load_config(None, tiny_overrides(tmp_path, train, evals, **{"train.max_steps": 1})))
    run_dir = tmp_path / "run"
    users = json.loads((run_dir / "users.json").read_text())
    users["users"]["zed"] = len(users["users"]) + 1
    (run_dir / "users.json").write_text(json.dumps(users))
    with pytest.raises(ValueError, match="user vocabulary"):
        load_backbone_from_run(run_dir, torch.device("cpu"))
    users["users"].pop("zed")
    (run_dir / "users.json").write_text(json.dumps(users))
    info = json.loads((run_dir / "run.json").read_text())
    info["model"]["hidden_size"] = 999
    (run_dir / "run.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="trained on model"):
        load_backbone_from_run(run_dir, torch.device("cpu"))


def test_resume_takes_a_checkpoint_from_before_a_key_existed_when_the_key_is_at_its_default(tmp_path):
    """The code was upgraded between a kill and the resume: a key the checkpoint does not record, at its default,
    is what the older code did (new options ship switched off) and does not block the resume; set to anything
    else it is another experiment, refused naming the key."""
    from common.config import ConfigError, load_config
    from common.trainer import check_resumable, run_settings

    settings = run_settings(load_config(None, []))
    checkpoint = tmp_path / "step-2"
    checkpoint.mkdir()
    older = {k: v for k, v in settings.items() if k != "ppo.overlong_buffer"}
    (checkpoint / "state.json").write_text(json.dumps({"step": 2, "settings": older}))
    check_resumable(checkpoint, settings, 4)
    with pytest.raises(ConfigError, match=r"other settings \(ppo\.overlong_buffer: None there, 8 now\)"):
        check_resumable(checkpoint, run_settings(load_config(None, ["ppo.overlong_buffer=8"])), 4)
    # a recorded key still has to match, default or not
    (checkpoint / "state.json").write_text(json.dumps({"step": 2, "settings": {**settings, "train.lr": 0.5}}))
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.5 there"):
        check_resumable(checkpoint, settings, 4)


def test_resume_refuses_a_checkpoint_of_other_settings_before_loading_it(tmp_path, toy_data):
    from common.config import ConfigError, load_config
    from pipelines.train_rm import run

    source, evals = toy_data
    original = source.read_text()
    train = tmp_path / "resumed_train.jsonl"
    train.write_text(original)

    def cfg(**over):
        return load_config(None, tiny_overrides(tmp_path, train, evals, **{"train.max_steps": 3,
                                                                          "train.save_every": 1, **over}))

    run(cfg())
    ckpt_root = tmp_path / "run" / "checkpoints"
    latest = ckpt.latest_checkpoint(ckpt_root)
    before = load_file(str(latest / "trainable.safetensors"))
    written = {f: (tmp_path / "run" / f).read_text() for f in ("config.yaml", "users.json", "run.json")}
    with pytest.raises(ConfigError, match=r"other settings \(train\.lr: 0\.003 there, 0\.01 now\)"):
        run(cfg(**{"train.lr": 0.01}))
    # refused before the run folder was touched: its files still describe the run its checkpoints are from
    assert {f: (tmp_path / "run" / f).read_text() for f in written} == written
    train.write_text(original + original.splitlines()[0] + "\n")
    with pytest.raises(ConfigError, match=r"other settings \(<training data sha256>"):  # same path, other data
        run(cfg())
    train.write_text(original)
    with pytest.raises(ConfigError, match=r"at step 2, train.max_steps is 2: nothing to resume"):
        run(cfg(**{"train.max_steps": 2}))
    assert ckpt.latest_checkpoint(ckpt_root) == latest  # nothing written over
    assert all(torch.equal(v, load_file(str(latest / "trainable.safetensors"))[k]) for k, v in before.items())
    state = json.loads((latest / "state.json").read_text())
    (latest / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "settings"}))
    with pytest.raises(ConfigError, match="does not record the settings"):  # an older version's checkpoint
        run(cfg())
    (latest / "state.json").write_text(json.dumps(state))
    assert run(cfg(**{"train.max_steps": 4, "train.log_every": 1}))  # longer, same settings: resumes
    assert run(cfg(**{"train.lr": 0.01, "train.resume": "never"}))  # or start over on purpose


def test_embedded_model_is_built_once_when_processes_start_together(tmp_path, monkeypatch):
    """torchrun ranks on a fresh machine all ask for the dequantised SmolLM2 at once: one builds it, the others
    wait on the lock and find it built (each building its own copy raced on the same folder)."""
    import threading

    from common import models

    monkeypatch.setenv("PRLHF_CACHE", str(tmp_path))
    builds = []

    def slow_build(target):
        builds.append(target)
        time.sleep(0.3)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(models, "_build_smollm2", slow_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(models._smollm2_cached())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(set(results)) == 1 and (results[0] / "config.json").exists()


def test_early_stopping_keeps_the_best_evaluation_and_resumes_to_the_same_stop(tmp_path):
    """train.early_stopping_patience: stop after `patience` evaluations without a better held-out loss, restore the
    best evaluation's weights; a run resumed from a checkpoint in between stops at the same step with the same best."""
    from common.config import load_config
    from common.trainer import TrainLoop

    losses = {1: 1.0, 2: 0.6, 3: 0.7, 4: 0.65, 5: 0.9, 6: 0.5}  # best at 2, then 3 evaluations without improving

    def make(run_dir, max_steps=8):
        torch.manual_seed(0)
        module = torch.nn.Linear(3, 1)
        cfg = load_config(None, ["train.max_steps=%d" % max_steps, "train.eval_every=1", "train.save_every=1",
                                 "train.early_stopping_patience=3", "train.lr=0.1", "report_to=none",
                                 "data.eval_path=unused.jsonl", f"output_dir={run_dir}"])
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))

        def loss_fn(step, micro):
            return module(x).pow(2).mean(), {}

        seen = {}

        def eval_fn(step):
            seen[step] = module.weight.detach().clone()
            return {"eval/loss": losses[step]}

        groups = [{"params": list(module.parameters()), "lr": 0.1, "weight_decay": 0.0}]
        return TrainLoop(cfg, run_dir, module, groups, loss_fn, eval_fn=eval_fn), module, seen

    loop, module, seen = make(tmp_path / "a")
    result = loop.run()
    assert result["early_stopping"]["stopped_at"] == 5 and result["early_stopping"]["best_step"] == 2
    assert result["steps"] == 5 and result["early_stopping"]["restored_best"]
    assert torch.equal(module.weight.detach(), seen[2])  # the best evaluation's weights, not the last step's
    assert [h["eval/loss"] for h in loop.history if "eval/loss" in h] == [1.0, 0.6, 0.7, 0.65, 0.9]

    # interrupted after step 3 (its checkpoint holds the counters), then resumed: the same stop and weights
    loop_b, _, _ = make(tmp_path / "b", max_steps=3)
    loop_b.cfg.train.early_stopping_patience = 3
    loop_b.run()
    loop_c, module_c, _ = make(tmp_path / "b")
    result_c = loop_c.run()
    assert result_c["resumed_from"] == 2 and result_c["early_stopping"]["stopped_at"] == 5
    assert torch.equal(module_c.weight.detach(), seen[2])
