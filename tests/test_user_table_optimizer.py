"""User tables move only the rows of the batch's users (issue 19, cause 2): `LazyAdamW` and its wiring into every
stage's optimizer. Under dense AdamW a user absent from a batch keeps moving on stale moments."""

import pytest
import torch

from common.config import load_config
from common.optim import LazyAdamW
from common.trainer import make_optimizer, param_groups


def test_dense_groups_are_plain_adamw():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    ours = LazyAdamW(a.parameters(), lr=0.01, weight_decay=0.1)
    ref = torch.optim.AdamW(b.parameters(), lr=0.01, weight_decay=0.1, foreach=False)
    for step in range(4):
        x = torch.randn(7, 5, generator=torch.Generator().manual_seed(step))
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)


def test_lazy_group_leaves_absent_rows_bit_identical_and_counts_steps_per_row():
    torch.manual_seed(0)
    table = torch.nn.Embedding(6, 4)
    opt = LazyAdamW([{"params": [table.weight], "lazy": True}], lr=0.1)
    history = [table.weight.detach().clone()]
    for users in ([1, 2], [1], [1], [3]):
        opt.zero_grad()
        (table(torch.tensor(users)) * torch.arange(1.0, 5.0)).sum().backward()
        opt.step()
        history.append(table.weight.detach().clone())
    # user 2 got one gradient (step 1), then none: it never moves again
    assert torch.equal(history[1][2], history[4][2]) and not torch.equal(history[0][2], history[1][2])
    # rows nobody used are untouched throughout
    for row in (0, 4, 5):
        assert torch.equal(history[0][row], history[4][row])
    # user 3's first update (at the optimizer's 4th step) is Adam's first update: lr * sign(g) (up to eps)
    assert torch.allclose(history[3][3] - history[4][3], torch.full((4,), 0.1), atol=1e-6)
    assert torch.equal(opt.state[table.weight]["step"][1], torch.full((4,), 3.0))
    assert torch.equal(opt.state[table.weight]["step"][3], torch.ones(4))


def test_dense_adamw_moves_absent_rows():
    """The behaviour the lazy group removes (what the test above would see with dense AdamW)."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(4, 3)
    opt = torch.optim.AdamW([table.weight], lr=0.1, weight_decay=0.0)
    for users in ([1, 2], [1]):
        before = table.weight.detach().clone()
        opt.zero_grad()
        table(torch.tensor(users)).sum().backward()
        opt.step()
    assert not torch.equal(before[2], table.weight.detach()[2])  # user 2 was absent from the last step


def _tiny_backbone(**over):
    from common.run import build_backbone

    cfg = load_config(None, ["model.name=tiny-random", "user_model.n_tokens=2", "train.lr=0.01",
                             *[f"{k}={v}" for k, v in over.items()]])
    backbone, _ = build_backbone(cfg, 4, torch.device("cpu"))
    return cfg, backbone


def _step(backbone, opt, users):
    ids = torch.randint(3, 100, (len(users), 5), generator=torch.Generator().manual_seed(len(users)))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "user_idx": torch.tensor(users)}
    opt.zero_grad(set_to_none=True)
    hidden, _ = backbone.hidden_states(batch)
    hidden.pow(2).mean().backward()
    opt.step()


@pytest.mark.parametrize("stage", ["rm_dpo", "ppo"])
@pytest.mark.parametrize("kind", ["individual", "cluster"])
def test_every_stage_moves_only_the_batch_users_rows(stage, kind):
    """The optimizer every stage builds (train_rm / train_pdpo: `param_groups`; train_ppo: `PPOModules`)."""
    def rows_after_two_steps(table_optimizer):
        torch.manual_seed(0)
        cfg, backbone = _tiny_backbone(**{"user_model.kind": kind, "user_model.table_optimizer": table_optimizer})
        if stage == "ppo":
            from policy.ppo.roles import PPOModules, new_value_head

            groups = PPOModules(backbone, new_value_head(backbone.hidden_size, torch.float32)).param_groups(cfg)
        else:
            groups = param_groups(backbone, cfg, [])
        opt = make_optimizer(groups, cfg)
        (table,) = backbone.user_model.user_tables()
        _step(backbone, opt, [1, 2])
        before = table.detach().clone()
        _step(backbone, opt, [1, 3])  # user 2 is absent
        return before, table.detach().clone()

    before, after = rows_after_two_steps("lazy_adamw")
    assert torch.equal(before[2], after[2]) and torch.equal(before[4], after[4])
    assert not torch.equal(before[1], after[1]) and not torch.equal(before[3], after[3])
    before, after = rows_after_two_steps("adamw")  # the old dense optimizer drifts the absent user
    assert not torch.equal(before[2], after[2])


def test_sgd_option_is_plain_sgd():
    cfg, backbone = _tiny_backbone(**{"train.optimizer": "sgd"})
    opt = make_optimizer(param_groups(backbone, cfg, []), cfg)
    assert isinstance(opt, torch.optim.SGD) and all(g["momentum"] == 0 for g in opt.param_groups)
