"""user_model.sparse: row-wise updates of the user table, optimizer state that does not grow with unseen users."""

import json

import pytest
import torch

from common.config import ConfigError, Config, load_config
from common.optim import OptimizerSet, RowWiseAdagrad, clip_grad_norm
from common.trainer import make_optimizer
from conftest import tiny_overrides
from user_models import build_user_model


@pytest.mark.parametrize("kind", ["individual", "cluster"])
def test_one_step_changes_only_the_batch_rows(kind):
    torch.manual_seed(0)
    um = build_user_model(kind, 50, 2, 8, n_clusters=3, sparse=True)
    (table,) = um.sparse_tables()
    groups = [{"params": [p for p in um.parameters() if p is not table], "lr": 0.1, "weight_decay": 0.0},
              {"params": [table], "lr": 0.1, "row_wise": True}]
    opt = make_optimizer(groups, Config())
    assert isinstance(opt, OptimizerSet)
    before = table.detach().clone()
    users = torch.tensor([3, 7, 7, 20])
    (um(users).embeds * torch.randn(2, 8)).sum().backward()  # a linear loss: every row in the batch gets a gradient
    assert table.grad.is_sparse
    opt.step()
    changed = (table.detach() != before).any(1).nonzero().squeeze(1).tolist()
    assert changed == [3, 7, 20]
    state = opt.optimizers[1].state[table]["sum"]
    assert state.shape == (51,)  # one float per row, not two copies of the table


def test_clip_grad_norm_with_sparse_gradients_matches_dense():
    torch.manual_seed(0)
    sparse = torch.nn.Embedding(10, 4, sparse=True)
    dense = torch.nn.Embedding(10, 4)
    dense.weight.data.copy_(sparse.weight.data)
    idx = torch.tensor([1, 2, 2, 9])
    sparse(idx).pow(2).sum().backward()
    dense(idx).pow(2).sum().backward()
    n_sparse = clip_grad_norm([sparse.weight], 0.5)
    n_dense = float(torch.nn.utils.clip_grad_norm_([dense.weight], 0.5))
    assert n_sparse == pytest.approx(n_dense, rel=1e-5)
    assert torch.allclose(sparse.weight.grad.to_dense(), dense.weight.grad, atol=1e-6)


def test_optimizer_set_state_dict_round_trip():
    a, b = torch.nn.Linear(3, 2), torch.nn.Embedding(6, 3, sparse=True)
    opt = OptimizerSet(torch.optim.AdamW(a.parameters(), lr=0.1), RowWiseAdagrad([b.weight], lr=0.1))
    (a(b(torch.tensor([1, 4]))).sum()).backward()
    opt.step()
    sd = opt.state_dict()
    assert sorted(sd["state"]) == [0, 1, 2] and [g["params"] for g in sd["param_groups"]] == [[0, 1], [2]]
    fresh = OptimizerSet(torch.optim.AdamW(a.parameters(), lr=0.1), RowWiseAdagrad([b.weight], lr=0.1))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.optimizers[1].state[b.weight]["sum"], opt.optimizers[1].state[b.weight]["sum"])
    assert torch.equal(fresh.optimizers[0].state[a.weight]["exp_avg"], opt.optimizers[0].state[a.weight]["exp_avg"])


def test_sparse_reward_model_trains_and_resumes(tmp_path, toy_data):
    """A full train_rm with the sparse table: it learns, and a checkpoint of the combined optimizer resumes."""
    from pipelines.train_rm import run

    train, evals = toy_data
    ov = tiny_overrides(tmp_path, train, evals, **{"user_model.sparse": "true", "train.max_steps": 6,
                                                   "train.save_every": 3, "train.log_every": 1})
    m = run(load_config(None, ov))
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics_log.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in log if "train/loss" in r]
    assert losses[-1] < losses[0]  # it learns through the sparse rows and their AdaGrad
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["user_model"]["kind"] == "individual"
    resumed = run(load_config(None, ov + ["train.max_steps=8"]))
    assert resumed["train"]["resumed_from"] == 3  # the step-3 checkpoint, optimizer set included


def test_sparse_with_deepspeed_is_refused_before_training(tmp_path, toy_data):
    train, evals = toy_data
    with pytest.raises(ConfigError, match="user_model.sparse"):
        load_config(None, tiny_overrides(tmp_path, train, evals, **{"user_model.sparse": "true",
                                                                     "train.deepspeed": "configs/deepspeed/zero2.json"}))
