"""One objective per route (issue 24): training and adapting a new user minimise the same function.

For one batch and one user row, the value a trainer's `loss()` computes (`RewardModelTrainer`,
`PersonalizedDPOTrainer`) equals the value of the closure that adaptation hands to `fit_user_embedding`
(`common.run_users.objective_closure`), for the RM (exact and stochastic estimators, alpha edge cases), P-DPO (with
its `nll_weight`) and PPO (the implicit reward with beta = `ppo.kl_coef`, not `loss.beta`). Each equality is
checked to be sensitive: the same comparison with one side's config changed must fail.

Both sides are computed with the same model on the same pairs (tiny-random, built here; no training), so they
agree to float rounding; the tolerance is far below what any config change moves.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from common.batching import EncodedPair, collate_pairs
from common.config import ConfigError, load_config
from common.objective import scored_as
from common.run import build_backbone
from common.run_users import AdaptError, FixedScores, adaptation_loss_config, objective_closure
from policy.dpo_objective import pdpo_objective, route_beta, route_loss_config
from policy.model import PersonalizedPolicy
from policy.scoring import implicit_reward_margins, pair_logps
from reward.model import PersonalizedRewardModel
from reward.objective import rm_objective
from user_models.adaptation import fit_user_embedding, user_table

U = 2  # the user row both sides score
PAIRS = [EncodedPair([5, 6, 7], [8, 9, 2], [10, 2], U), EncodedPair([5, 6], [3, 2], [4, 4, 2], U),
         EncodedPair([7, 5], [9, 2], [3, 3, 2], U), EncodedPair([7, 8, 9, 5], [9, 9, 11, 2], [3, 2], U)]
TOL = dict(rel=1e-5, abs=1e-6)


def close(a, b) -> bool:
    return a == pytest.approx(b, **TOL)


def tiny(route, kind="individual", **over):
    """A tiny-random model of `route` whose user U differs clearly from the generic user (rows are moved off
    their init, as training would)."""
    cfg = load_config(None, [f"user_model.kind={kind}", "model.name=tiny-random", "train.batch_size=4"]
                      + [f"{k}={v}" for k, v in over.items()])
    torch.manual_seed(0)
    backbone, tok = build_backbone(cfg, 3, torch.device("cpu"))
    if kind != "uniform":
        with torch.no_grad():
            table = user_table(backbone.user_model)
            table[1:] += torch.randn_like(table[1:]) * (1.0 if kind == "individual" else 3.0)
    model = PersonalizedRewardModel(backbone) if route == "rm" else PersonalizedPolicy(backbone)
    return model.eval(), tok, cfg


def with_loss(cfg, **changes):
    """A copy of `cfg` with other loss / ppo settings (keys as in the config: "loss.alpha", "ppo.kl_coef")."""
    from dataclasses import replace

    for key, value in changes.items():
        section, name = key.split(".")
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **{name: value})})
    return cfg


def training_value(route, model, tok, cfg, tmp_path, pairs=PAIRS, step=0) -> float:
    """What the route's trainer minimises at this step (its batch: every pair, in its own order)."""
    with torch.no_grad():
        if route == "rm":
            from reward.trainer import RewardModelTrainer

            trainer = RewardModelTrainer(cfg, model, pairs, tok.pad_token_id, "cpu", tmp_path)
        else:
            from policy.dpo_trainer import PersonalizedDPOTrainer

            tmp_path.mkdir(parents=True, exist_ok=True)
            trainer = PersonalizedDPOTrainer(cfg, model, pairs, tok.pad_token_id, "cpu", tmp_path)
        return trainer.loss(step, 0)[0].item()


def adaptation_value(route, model, tok, cfg, pairs=PAIRS, batch_size=3) -> float:
    """What adaptation hands `fit_user_embedding` for row U: the parts of its closure (batches of 3 and 1
    pairs here, so the weighting of partial batches is tested too), summed."""
    fixed = FixedScores(model, route, tok.pad_token_id, batch_size, "cpu")
    closure = objective_closure(model, route, adaptation_loss_config(cfg, route), pairs, tok.pad_token_id,
                                batch_size, fixed)
    with torch.no_grad():
        return sum(part.item() for part in closure())


def assert_same_objective(route, model, tok, cfg, tmp_path, mutations):
    train, adapt = training_value(route, model, tok, cfg, tmp_path / "base"), adaptation_value(route, model, tok, cfg)
    assert close(adapt, train)
    # The comparison is sensitive to each setting: change it on one side only and the values part.
    for i, change in enumerate(mutations):
        other = with_loss(cfg, **change)
        assert not close(adaptation_value(route, model, tok, other), train), change
        assert not close(training_value(route, model, tok, other, tmp_path / f"m{i}"), adapt), change


# ------------------------------------------------------------------------------------------------------- RM


@pytest.mark.parametrize("loss, mutations", [
    ({"loss.alpha": 0.75, "loss.label_smoothing": 0.1, "loss.center_rewards_coef": 0.05},  # the two-term loss
     [{"loss.alpha": 0.5}, {"loss.label_smoothing": 0.3}, {"loss.center_rewards_coef": 0.5}]),
    ({"loss.alpha": 1.0}, [{"loss.alpha": 0.5}, {"loss.label_smoothing": 0.2}]),  # one term, for the user
])
def test_rm_adaptation_objective_is_the_training_objective(tmp_path, loss, mutations):
    model, tok, cfg = tiny("rm", **loss)
    assert_same_objective("rm", model, tok, cfg, tmp_path, mutations)


def test_rm_objective_hand_computation_and_alpha_edge_cases():
    model, tok, cfg = tiny("rm", **{"loss.alpha": 0.75})
    batch = collate_pairs(PAIRS, tok.pad_token_id)
    users = batch["user_idx"][:4]
    with torch.no_grad():
        r_u = model(scored_as(batch, users))
        r_g = model(scored_as(batch, torch.zeros_like(users)))
        bt_u, bt_g = F.softplus(-(r_u[:4] - r_u[4:])).mean().item(), F.softplus(-(r_g[:4] - r_g[4:])).mean().item()
        value = lambda c, **kw: rm_objective(model, batch, users, c, **kw)[0].item()  # noqa: E731
        assert close(value(cfg.loss), 0.75 * bt_u + 0.25 * bt_g)
        assert close(value(cfg.loss, generic_rewards=(r_g[:4], r_g[4:])), 0.75 * bt_u + 0.25 * bt_g)
        assert close(value(with_loss(cfg, **{"loss.alpha": 1.0}).loss), bt_u)
        assert close(value(with_loss(cfg, **{"loss.alpha": 0.0}).loss), bt_g)
    uniform, tok, cfg = tiny("rm", kind="uniform", **{"loss.alpha": 0.5})  # every user is user 0: alpha 1
    with torch.no_grad():
        r = uniform(batch)
        expected = F.softplus(-(r[:4] - r[4:])).mean().item()
        assert close(rm_objective(uniform, batch, users, cfg.loss)[0].item(), expected)


def test_a_run_trained_with_alpha_zero_has_no_user_objective_to_adapt():
    model, tok, cfg = tiny("rm", **{"loss.alpha": 0.0})
    with pytest.raises(AdaptError, match="loss.alpha=0"):
        adaptation_value("rm", model, tok, cfg)


# ----------------------------------------------------------------------------------------------------- P-DPO


@pytest.mark.parametrize("loss, mutations", [
    # the demo's P-DPO settings, with a larger beta so that the two users' terms differ clearly on a random model
    ({"loss.alpha": 0.75, "loss.beta": 2.0, "loss.nll_weight": 0.5},
     [{"loss.nll_weight": 0.0}, {"loss.alpha": 0.5}, {"loss.beta": 1.0}, {"loss.loss_type": "hinge"},
      {"loss.label_smoothing": 0.2}]),
    ({"loss.alpha": 1.0, "loss.beta": 2.0, "loss.nll_weight": 0.5, "loss.loss_type": "ipo"},
     [{"loss.nll_weight": 0.0}, {"loss.loss_type": "sigmoid"}, {"loss.beta": 1.0}]),
])
def test_pdpo_adaptation_objective_is_the_training_objective(tmp_path, loss, mutations):
    model, tok, cfg = tiny("dpo", **loss)
    assert_same_objective("dpo", model, tok, cfg, tmp_path, mutations)


def test_pdpo_objective_hand_computation():
    model, tok, cfg = tiny("dpo", **{"loss.alpha": 0.75, "loss.beta": 2.0, "loss.nll_weight": 0.5})
    batch = collate_pairs(PAIRS, tok.pad_token_id)
    users = batch["user_idx"][:4]
    n_tok = (batch["labels"][:4] != -100).sum(1).float()
    with torch.no_grad():
        ref = model.reference_logps(batch)
        lp_u, lp_g = model.sequence_logps(scored_as(batch, users)), model.sequence_logps(scored_as(batch, users * 0))

        def term(lp):  # -log sigmoid(beta h) + w * per-token NLL of the chosen answer
            h = (lp[:4] - ref[:4]) - (lp[4:] - ref[4:])
            return (F.softplus(-2.0 * h).mean() + 0.5 * -(lp[:4] / n_tok).mean()).item()

        expected = 0.75 * term(lp_u) + 0.25 * term(lp_g)
        assert close(pdpo_objective(model, batch, users, ref[:4], ref[4:], cfg.loss)[0].item(), expected)
        assert close(pdpo_objective(model, batch, users, ref[:4], ref[4:], cfg.loss,
                                    generic_logps=(lp_g[:4], lp_g[4:]))[0].item(), expected)


# ------------------------------------------------------------------------------------------------------- PPO


def test_ppo_run_is_adapted_on_its_implicit_reward_with_beta_kl_coef():
    """PPO's optimum is pi_ref exp(r / kl_coef) / Z: its implicit reward is kl_coef * log pi/pi_ref. A PPO run's
    users are fitted with the DPO loss of that reward, for the user alone: loss.beta (a reporting setting of a
    PPO run), loss.alpha and loss.nll_weight (P-DPO's) play no part."""
    model, tok, cfg = tiny("ppo", **{"ppo.kl_coef": 0.7, "loss.beta": 0.1, "loss.alpha": 0.5,
                                     "loss.nll_weight": 0.5})
    assert route_beta(cfg, "ppo") == 0.7 and route_beta(cfg, "dpo") == 0.1
    with torch.no_grad():
        rw, rl = pair_logps(model, PAIRS, tok.pad_token_id, 4, "cpu", reference=True)
        pw, pl = pair_logps(model, PAIRS, tok.pad_token_id, 4, "cpu")
        h = (pw - rw) - (pl - rl)
    by_hand = F.softplus(-0.7 * h).mean().item()  # -log sigmoid(kl_coef * h)
    assert close(-F.logsigmoid(implicit_reward_margins(pw, pl, rw, rl, route_beta(cfg, "ppo"))).mean().item(), by_hand)
    assert close(adaptation_value("ppo", model, tok, cfg), by_hand)
    # kl_coef is the beta: another kl_coef, another objective; the P-DPO settings leave it alone
    assert not close(adaptation_value("ppo", model, tok, with_loss(cfg, **{"ppo.kl_coef": 0.2})), by_hand)
    for change in ({"loss.beta": 0.7}, {"loss.alpha": 1.0}, {"loss.nll_weight": 0.0}, {"loss.loss_type": "ipo"}):
        assert adaptation_value("ppo", model, tok, with_loss(cfg, **change)) == adaptation_value("ppo", model, tok, cfg)
    ppo_loss = route_loss_config(cfg, "ppo")
    assert (ppo_loss.alpha, ppo_loss.beta, ppo_loss.nll_weight, ppo_loss.loss_type) == (1.0, 0.7, 0.0, "sigmoid")
    with pytest.raises(ConfigError, match="kl_coef"):
        route_beta(with_loss(cfg, **{"ppo.kl_coef": 0.0}), "ppo")
    with pytest.raises(ValueError, match="no implicit reward"):
        route_beta(cfg, "rm")


# ------------------------------------------------------------------------------------- stochastic estimator


@pytest.mark.parametrize("route, loss", [
    ("rm", {"loss.label_smoothing": 0.1}),
    ("dpo", {"loss.beta": 2.0, "loss.nll_weight": 0.5}),
])
def test_stochastic_run_is_adapted_with_the_expectation_of_its_estimator(tmp_path, route, loss):
    """The stochastic estimator scores each pair as its user (prob. alpha) or as the generic user: on one pair,
    every step's training value is one of the two single-term values, and adaptation's (deterministic) value is
    their alpha-weighted mean, the exact loss. (An RM's centring penalty is the exception: the stochastic
    estimator applies it to the mixed users' rewards, the exact loss to the users'.)"""
    model, tok, cfg = tiny(route, **loss, **{"loss.alpha": 0.6, "loss.estimator": "stochastic", "train.batch_size": 1})
    one = PAIRS[3:]
    v_user = training_value(route, model, tok, with_loss(cfg, **{"loss.alpha": 1.0}), tmp_path / "u", one)
    v_gen = training_value(route, model, tok, with_loss(cfg, **{"loss.alpha": 0.0}), tmp_path / "g", one)
    assert not close(v_user, v_gen)
    draws = [training_value(route, model, tok, cfg, tmp_path / "s", one, step) for step in range(40)]
    assert all(close(v, v_user) or close(v, v_gen) for v in draws)
    assert any(close(v, v_user) for v in draws) and any(close(v, v_gen) for v in draws)
    assert close(adaptation_value(route, model, tok, cfg, one), 0.6 * v_user + 0.4 * v_gen)


# --------------------------------------------------------------------------------------- what the fit sees


@pytest.mark.parametrize("route", ["rm", "dpo"])
def test_fit_user_embedding_minimises_that_value(route):
    """The closure is what the fit minimises: its first recorded loss is the objective at the starting row."""
    model, tok, cfg = tiny(route, **{"loss.alpha": 0.75, "loss.beta": 2.0, "loss.nll_weight": 0.5})
    expected = adaptation_value(route, model, tok, cfg)
    fixed = FixedScores(model, route, tok.pad_token_id, 3, "cpu")
    closure = objective_closure(model, route, adaptation_loss_config(cfg, route), PAIRS, tok.pad_token_id, 3, fixed)
    res = fit_user_embedding(model.user_model, U, closure, steps=3, lr=0.05, init="current", freeze=[model])
    assert close(res.losses[0], expected)
    assert math.isfinite(res.final_loss) and res.final_loss <= res.losses[0]
