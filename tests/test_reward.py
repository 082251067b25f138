import json
import math
import warnings

import pytest
import torch

from common.batching import EncodedPair, collate_pairs
from common.config import load_config
from common.run import build_backbone
from reward.loss import bt_loss, personalized_bt_loss
from reward.model import SUM_POOLING_TOKENS, PersonalizedRewardModel
from reward.scoring import reward_margins


def tiny_rm(kind="individual", n_users=2, **over):
    cfg = load_config(None, [f"user_model.kind={kind}", "model.name=tiny-random"] +
                      [f"{k}={v}" for k, v in over.items()])
    backbone, tok = build_backbone(cfg, n_users, torch.device("cpu"))
    return PersonalizedRewardModel(backbone), tok, cfg


def test_lora_wrap_prints_no_library_deprecation_warning():
    # PEFT reads a property transformers 5 deprecated; the warning would land in every stage's output
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_rm(**{"model.finetune": "lora"})
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_bt_loss_hand_computation():
    rw = torch.tensor([1.0, 0.5])
    rl = torch.tensor([0.0, 1.5])
    gw = torch.tensor([0.2, 0.0])
    gl = torch.tensor([0.1, 0.3])
    alpha = 0.3
    loss, _ = personalized_bt_loss(rw, rl, gw, gl, alpha)
    sp = lambda x: math.log(1 + math.exp(-x))  # -log sigmoid(x)
    user = (sp(1.0) + sp(-1.0)) / 2
    generic = (sp(0.1) + sp(-0.3)) / 2
    assert loss.item() == pytest.approx(alpha * user + (1 - alpha) * generic, rel=1e-6)


def test_alpha_reduces_to_single_terms():
    rw, rl, gw, gl = torch.randn(4), torch.randn(4), torch.randn(4), torch.randn(4)
    one, _ = personalized_bt_loss(rw, rl, gw, gl, 1.0)
    assert one.item() == pytest.approx(bt_loss(rw, rl).mean().item())
    zero, _ = personalized_bt_loss(rw, rl, gw, gl, 0.0)
    assert zero.item() == pytest.approx(bt_loss(gw, gl).mean().item())


def test_reward_at_last_real_token_ignores_padding():
    rm, tok, _ = tiny_rm()
    rm.eval()
    short = EncodedPair([5, 6, 7], [8, 9, 2], [10, 2], 1)
    longer = EncodedPair([5, 6, 7], [8] * 20, [11] * 15, 1)
    with torch.no_grad():
        alone = rm(collate_pairs([short], tok.pad_token_id))
        padded = rm(collate_pairs([short, longer], tok.pad_token_id))  # `short` rows now carry padding
    assert torch.allclose(alone[0], padded[0], atol=1e-5)
    assert torch.allclose(alone[1], padded[2], atol=1e-5)


def test_rewards_depend_on_user():
    rm, tok, _ = tiny_rm()
    with torch.no_grad():
        rm.user_model.implicit.offsets.weight[1] += 0.5
    batch = collate_pairs([EncodedPair([5, 6], [7, 8], [9], 1)], tok.pad_token_id)
    with torch.no_grad():
        as_user = rm(batch)
        as_generic = rm({**batch, "user_idx": torch.zeros_like(batch["user_idx"])})
    assert not torch.allclose(as_user, as_generic)


def test_training_separates_two_conflicting_users(tmp_path, toy_data):
    from pipelines.train_rm import run
    from tests.conftest import tiny_overrides

    train, evals = toy_data
    cfg = load_config(None, tiny_overrides(tmp_path, train, evals, **{"train.max_steps": 40, "train.batch_size": 8}))
    metrics = run(cfg)
    per_user = metrics["eval"]["per_user"]
    assert per_user["a"]["accuracy"] == 1.0 and per_user["b"]["accuracy"] == 1.0
    # Lemma 3.2: the generic user cannot serve both when they conflict half/half.
    assert metrics["eval"]["generic"]["accuracy"] <= 0.75


def test_vanilla_rm_is_majority_vote(tmp_path):
    from pipelines.train_rm import run
    from tests.conftest import toy_rows, tiny_overrides, write_jsonl

    rows = toy_rows(12, users=(("a", "majority"), ("b", "majority"), ("c", "majority"), ("d", "minority")))
    train = write_jsonl(tmp_path / "train.jsonl", rows[:32])
    evals = write_jsonl(tmp_path / "eval.jsonl", rows[32:])
    cfg = load_config(None, tiny_overrides(tmp_path, train, evals, **{
        "train.max_steps": 40, "train.batch_size": 8, "user_model.kind": "uniform", "loss.alpha": 1.0}))
    m = run(cfg)["eval"]
    assert m["per_group"]["majority"]["accuracy"] == 1.0
    assert m["per_group"]["minority"]["accuracy"] == 0.0


def test_save_reload_same_rewards(tmp_path, toy_data):
    from common.batching import PairEncoder
    from common.run import load_backbone_from_run, load_head
    from pipelines.train_rm import run
    from preference_data import UserVocab, load_records
    from tests.conftest import tiny_overrides

    train, evals = toy_data
    cfg = load_config(None, tiny_overrides(tmp_path, train, evals, **{"train.max_steps": 3}))
    m = run(cfg)
    run_dir = tmp_path / "run"
    _, backbone, tok, vocab, _ = load_backbone_from_run(run_dir, torch.device("cpu"))
    rm = PersonalizedRewardModel(backbone)
    load_head(run_dir, "score", rm.score)
    records = load_records(evals)
    pairs = PairEncoder.from_config(tok, cfg).encode_all(records, vocab)
    margins = reward_margins(rm.eval(), pairs, tok.pad_token_id, 4, "cpu")
    acc = (margins > 0).float().mean().item()
    assert acc == pytest.approx(m["eval"]["overall"]["accuracy"])
    # the margins themselves, not only their signs: a model reloaded without its trained weights ranks 8 pairs
    # the same way often enough
    assert margins.mean().item() == pytest.approx(m["eval"]["overall"]["mean_margin"], abs=1e-5)
    # and a second load scores bit-identically
    _, backbone2, _, _, _ = load_backbone_from_run(run_dir, torch.device("cpu"))
    rm2 = PersonalizedRewardModel(backbone2)
    load_head(run_dir, "score", rm2.score)
    assert torch.equal(margins, reward_margins(rm2.eval(), pairs, tok.pad_token_id, 4, "cpu"))


@pytest.mark.parametrize("kind", ["uniform", "cluster"])
def test_other_user_models_train(tmp_path, toy_data, kind):
    from pipelines.train_rm import run
    from tests.conftest import tiny_overrides

    train, evals = toy_data
    m = run(load_config(None, tiny_overrides(tmp_path, train, evals, **{"user_model.kind": kind,
                                                                         "user_model.n_clusters": 2,
                                                                         "train.max_steps": 40, "train.batch_size": 8})))
    acc = {u: v["accuracy"] for u, v in m["eval"]["per_user"].items()}
    if kind == "cluster":  # two centres are enough for two conflicting users
        assert acc == {"a": 1.0, "b": 1.0}
    else:  # one soft prompt for everyone ranks each pair alike for both users: what one gets right, the other not
        assert acc["a"] + acc["b"] == pytest.approx(1.0)
    assert (tmp_path / "run" / "checkpoint" / "user_model.json").exists()


def test_train_rm_under_deepspeed_zero2_matches_plain_torch(tmp_path, toy_data, monkeypatch):
    """DeepSpeed ZeRO-2, one process on CPU (gloo): same losses and weights as the plain torch loop."""
    import importlib
    import json
    import socket
    from pathlib import Path

    from safetensors.torch import load_file

    from pipelines.train_rm import run
    from tests.conftest import tiny_overrides

    ds_torch = importlib.import_module("deepspeed.comm.torch")
    monkeypatch.setattr(ds_torch, "build_shm_op", lambda: None)  # one process: skip the shm all-reduce JIT build
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(sock.getsockname()[1]))
    train, evals = toy_data
    zero2 = Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / "zero2.json"
    plain = run(load_config(None, tiny_overrides(tmp_path, train, evals, output_dir=tmp_path / "plain",
                                                 **{"train.max_steps": 3, "eval.n_generation_prompts": 0})))
    ds = run(load_config(None, tiny_overrides(tmp_path, train, evals, output_dir=tmp_path / "ds",
                                              **{"train.max_steps": 3, "train.deepspeed": str(zero2)})))
    assert ds["train"]["final_loss"] == pytest.approx(plain["train"]["final_loss"], abs=1e-5)
    a = load_file(str(tmp_path / "plain" / "checkpoint" / "user_model.safetensors"))
    b = load_file(str(tmp_path / "ds" / "checkpoint" / "user_model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_degenerate_negative_pairs_keep_prompt_user_and_a_real_answer():
    from reward.degenerate import degenerate_negative_pairs

    eos = 2
    pairs = [EncodedPair([10 + i, 11], [20 + i, 21, eos], [30 + i, 31, 32], i % 3, []) for i in range(40)]
    extra = degenerate_negative_pairs(pairs, 0.5, eos, max_len=8, seed=0)
    assert len(extra) == 20
    assert extra == degenerate_negative_pairs(pairs, 0.5, eos, max_len=8, seed=0)  # seeded
    by_prompt = {tuple(p.prompt_ids): p for p in pairs}
    sides, run_lengths, run_ends = set(), set(), set()
    for k, e in enumerate(extra):
        src = by_prompt[tuple(e.prompt_ids)]
        assert e.user_idx == src.user_idx
        # preferred: one of the record's real answers (also the one its user liked less)
        side = "chosen" if e.chosen_ids == src.chosen_ids else "rejected"
        assert e.chosen_ids == getattr(src, f"{side}_ids")
        sides.add(side)
        a, b = e.chosen_ids[:2]
        bad = e.rejected_ids
        # the kinds in turn: nothing; the answer's first token repeated; its first two tokens looped (a random
        # length up to the limit, EOS or not); its own tokens in another order, its EOS kept; a passage loop
        if k % 5 == 0:
            assert bad == [eos]
        elif k % 5 == 1:
            body = bad[:-1] if bad[-1] == eos else bad
            assert set(body) == {a} and 4 <= len(body) <= 8
            run_lengths.add(len(body)), run_ends.add(bad[-1] == eos)
        elif k % 5 == 2:
            body = bad[:-1] if bad[-1] == eos else bad
            assert body == ([a, b] * 8)[:len(body)] and 4 <= len(body) <= 8
        elif k % 5 == 3:
            assert sorted(bad) == sorted(e.chosen_ids) and bad != e.chosen_ids
        else:
            body = bad[:-1] if bad[-1] == eos else bad
            assert body[0] == a and set(body) <= set(e.chosen_ids) and len(body) <= 8
    assert sides == {"chosen", "rejected"} and len(run_lengths) > 1 and run_ends == {True, False}
    assert degenerate_negative_pairs(pairs, 0.0, eos, 5, 0) == []


def test_passage_loop_repeats_a_span_of_the_answer_after_its_opening():
    """The answer's first k tokens, then its tokens k-m .. k at least twice more, never past max_len; EOS only when
    it stops short of max_len; lengths and spans vary with the seed."""
    import random

    from reward.degenerate import passage_loop

    body, eos, max_len = list(range(100, 160)), 2, 80
    rng = random.Random(0)
    shapes, ends = set(), set()
    for _ in range(200):
        out = passage_loop(body, eos, max_len, rng)
        ended = out[-1] == eos
        loop = out[:-1] if ended else out
        assert len(out) <= max_len and (not ended or len(loop) < max_len)
        k = next(i for i in range(1, len(loop) + 1) if i == len(loop) or loop[i] != body[i])  # the opening's end
        span = [t for t in body[:k] if t in loop[k:]]
        m = len(span)
        assert 1 <= m <= 16 and loop[:k] == body[:k] and loop[k:] == (span * max_len)[:len(loop) - k]
        assert len(loop) >= k + 2 * m
        shapes.add((k, m)), ends.add(ended)
    assert len(shapes) > 20 and ends == {True, False}


def test_rm_with_degenerate_negatives_ranks_broken_answers_last(tmp_path, toy_data):
    """For every user, the RM trained with data.degenerate_negatives scores the empty answer, one-token runs, short
    loops and passage loops below the user's own chosen answer of held-out pairs more often than the RM trained
    without them. (The shuffled kind is left out: a tiny random model on 16 records does not learn word order.)"""
    from pipelines.train_rm import run
    from policy.ppo.roles import load_reward_role
    from preference_data import load_records
    from reward.degenerate import degenerate_answers
    from tests.conftest import tiny_overrides

    train, evals = toy_data
    wins = {}
    for share in (0.0, 1.0):
        out = tmp_path / f"s{share}"
        run(load_config(None, tiny_overrides(out, train, evals, **{"data.degenerate_negatives": share,
                                                                   "train.max_steps": 30, "train.batch_size": 8,
                                                                   "eval.n_generation_prompts": 0})))
        reward = load_reward_role(out / "run", "cpu")
        cfg, tok = reward.cfg, reward.tokenizer
        assert cfg.data.degenerate_negatives == share
        held_out = reward.encoder.encode_all(load_records(evals), reward.vocab)
        structural = (0, 1, 2, 4)  # empty, one-token run, two-token loop, passage loop
        broken = [EncodedPair(p.prompt_ids, p.chosen_ids, bad, p.user_idx, p.text_ids) for p in held_out
                  for kind, bad in enumerate(degenerate_answers(p.chosen_ids, tok.eos_token_id,
                                                                cfg.data.max_response_length)) if kind in structural]
        with torch.no_grad():
            margins = reward_margins(reward.model, broken, tok.pad_token_id, 16, torch.device("cpu"))
        wins[share] = int((margins > 0).sum()), len(broken)
    (won, n), (won_before, _) = wins[1.0], wins[0.0]
    assert won >= 0.9 * n and won > won_before, wins


def test_accuracy_metrics_report_mean_margin_per_user_and_group():
    from common.metrics import accuracy_metrics
    from preference_data import PreferenceRecord, UserVocab

    recs = [PreferenceRecord("p", "c", "r", user_id=u, group=g)
            for u, g in (("a", "majority"), ("a", "majority"), ("b", "minority"), (None, None))]
    vocab = UserVocab(["a", "b"])
    m = accuracy_metrics("rm", recs, vocab, torch.tensor([2.0, -0.5, 0.25, 1.0]),
                         generic_margins=torch.tensor([1.0, 1.0, -3.0, 0.0]))
    assert m["per_user"]["a"]["accuracy"] == 0.5 and m["per_user"]["a"]["mean_margin"] == pytest.approx(0.75)
    assert m["per_group"]["minority"]["mean_margin"] == pytest.approx(0.25)
    assert m["overall"]["mean_margin"] == pytest.approx(0.6875)
    assert m["generic"]["accuracy"] == 0.5 and m["generic"]["mean_margin"] == pytest.approx(-0.25)
    assert m["generic_per_group"]["minority"] == {"accuracy": 0.0, "n": 1, "mean_margin": -3.0}


@pytest.mark.parametrize("estimator", ["exact", "stochastic"])
def test_center_rewards_penalty_applies_with_either_estimator(tmp_path, estimator):
    from common.batching import EncodedPair
    from reward.trainer import RewardModelTrainer

    pairs = [EncodedPair([5, 6, 7], [8, 9, 2], [10, 2], 1), EncodedPair([5, 6], [3, 2], [4, 4, 2], 2)] * 2
    losses = []
    for coef in (0.0, 100.0):
        torch.manual_seed(0)
        rm, tok, cfg = tiny_rm(n_users=3, **{"loss.estimator": estimator, "loss.alpha": 0.5,
                                             "loss.center_rewards_coef": coef, "train.batch_size": 4})
        with torch.no_grad():
            rm.score.bias.fill_(3.0)  # rewards far from 0: the penalty is large
        trainer = RewardModelTrainer(cfg, rm, pairs, tok.pad_token_id, "cpu", tmp_path / f"{estimator}{coef}")
        losses.append(trainer.loss(0, 0)[0].item())
    assert losses[1] > losses[0] + 100.0  # coef * mean((r_w + r_l)^2) with r near 3: about 100 * 36


def test_train_rm_logs_the_held_out_loss_and_can_stop_early(tmp_path, toy_data):
    """train.eval_every logs the training objective on the held-out pairs (eval/loss, the learning curve);
    train.early_stopping_patience stops on it and says so in run.json."""
    import json

    from conftest import tiny_overrides
    from pipelines.train_rm import run

    train, evals = toy_data
    run(load_config(None, tiny_overrides(tmp_path, train, evals, **{
        "train.max_steps": 12, "train.eval_every": 2, "train.early_stopping_patience": 1, "train.lr": 0.05,
        "train.early_stopping_min_delta": 10.0})))  # no evaluation can improve by 10: stops at the second one
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics_log.jsonl").read_text().splitlines()]
    held = [r for r in log if "eval/loss" in r]
    assert [r.get("_step", r.get("step")) for r in held][:1] and all(r["eval/loss"] > 0 for r in held)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    es = info["train"]["early_stopping"]
    assert es["stopped_at"] == 4 and es["best_step"] == 2 and es["restored_best"]
    assert (tmp_path / "run" / "plots" / "train_loss.png").exists()


def test_evaluate_scores_whole_answers_unless_told_and_says_which(tmp_path, toy_data):
    """evaluate scores held-out responses whole, whatever window the run trained with; eval.max_response_length
    cuts them, and metrics.json says so (issue 19: a reward that held only inside the window looked better)."""
    from conftest import tiny_overrides
    from pipelines.evaluate import evaluate_run
    from pipelines.train_rm import run

    train, evals = toy_data
    run(load_config(None, tiny_overrides(tmp_path, train, evals, **{"data.max_response_length": 8})))
    whole = evaluate_run(tmp_path / "run", evals, tmp_path / "whole", ["report_to=none"])
    assert whole["scoring"]["complete"] and whole["scoring"]["truncated_responses"] == 0
    assert whole["scoring"]["max_response_length"] > 100
    cut = evaluate_run(tmp_path / "run", evals, tmp_path / "cut", ["report_to=none", "eval.max_response_length=8"])
    assert not cut["scoring"]["complete"] and cut["scoring"]["truncated_responses"] > 0
    assert "cut at 8 tokens" in (tmp_path / "cut" / "report.md").read_text()


def test_sum_pooling_adds_the_head_score_of_every_answer_token_and_nothing_else():
    rm, tok, cfg = tiny_rm()
    summed = PersonalizedRewardModel(rm.backbone, "sum").eval()
    summed.score.load_state_dict(rm.score.state_dict())
    with torch.no_grad():
        summed.score.bias.fill_(0.25)
    pairs = [EncodedPair([5, 6, 7], [8, 9, 2], [10, 2], 1), EncodedPair([5, 6], [11, 12, 13, 14, 2], [2], 0)]
    batch = collate_pairs(pairs, pad_id=0)
    with torch.no_grad():
        rewards = summed(batch)
        hidden, inputs = rm.backbone.hidden_states(batch)
        per_token = hidden.float() @ summed.score.weight.squeeze(0).float()
    for row in range(batch["input_ids"].shape[0]):
        answer = (inputs.labels[row] != -100).nonzero().squeeze(-1)  # positions of the answer's tokens, after the prefix
        assert len(answer) == int((batch["labels"][row] != -100).sum())
        expected = float(per_token[row, answer].sum()) / SUM_POOLING_TOKENS + 0.25
        assert float(rewards[row]) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # the other rows' padding changes nothing: pair 1's chosen answer scored alone
    alone = collate_pairs([pairs[1]], pad_id=0)
    with torch.no_grad():
        assert float(summed(alone)[0]) == pytest.approx(float(rewards[1]), rel=1e-4, abs=1e-4)
    with pytest.raises(ValueError, match="one of"):
        PersonalizedRewardModel(rm.backbone, "mean")


@pytest.mark.parametrize("pooling", ["last_sum", "sum_validity"])
def test_last_sum_pooling_is_the_last_token_output_plus_the_summed_per_token_output(pooling):
    rm, tok, cfg = tiny_rm()
    both = PersonalizedRewardModel(rm.backbone, pooling).eval()
    # sum_validity: the last-token output enters as log sigmoid, at most 0
    judged = (lambda v: float(v)) if pooling == "last_sum" else (lambda v: float(torch.nn.functional.logsigmoid(v)))
    assert both.score.out_features == 2
    with torch.no_grad():
        both.score.bias.copy_(torch.tensor([0.5, -0.125]))
    pairs = [EncodedPair([5, 6, 7], [8, 9, 2], [10, 2], 1), EncodedPair([5, 6], [11, 12, 13, 14, 2], [2], 0)]
    batch = collate_pairs(pairs, pad_id=0)
    with torch.no_grad():
        rewards = both(batch)
        hidden, inputs = rm.backbone.hidden_states(batch)
        values = hidden.float() @ both.score.weight.float().T + both.score.bias.float()  # [N, L, 2]
    for row in range(batch["input_ids"].shape[0]):
        last = int(inputs.attention_mask[row].sum()) - 1  # the answer's EOS, before the right padding
        answer = (inputs.labels[row] != -100).nonzero().squeeze(-1)
        assert int(answer[-1]) == last
        expected = judged(values[row, last, 0]) + float(values[row, answer, 1].sum()) / SUM_POOLING_TOKENS
        assert float(rewards[row]) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # one more answer token adds its per-token value / 64 (and moves the last token): the empty answer [EOS] pays the
    # per-token bias once
    empty = collate_pairs([EncodedPair([5, 6], [2], [2], 0)], pad_id=0)
    with torch.no_grad():
        h, inp = rm.backbone.hidden_states(empty)
        v = h.float()[0, int(inp.attention_mask[0].sum()) - 1] @ both.score.weight.float().T + both.score.bias.float()
        assert float(both(empty)[0]) == pytest.approx(float(judged(v[0]) + v[1] / SUM_POOLING_TOKENS), rel=1e-5,
                                                      abs=1e-5)


def test_reward_pooling_is_a_config_key_the_stages_read(tmp_path):
    from common.config import ConfigError
    from conftest import tiny_overrides, toy_rows, write_jsonl
    from pipelines.evaluate import evaluate_run
    from pipelines.train_rm import run as train_rm
    from policy.ppo.roles import load_reward_role

    with pytest.raises(ConfigError, match="reward_pooling"):
        load_config(None, ["model.reward_pooling=mean"])
    rows = toy_rows(6)
    train, evals = write_jsonl(tmp_path / "train.jsonl", rows[:8]), write_jsonl(tmp_path / "eval.jsonl", rows[8:])
    train_rm(load_config(None, tiny_overrides(tmp_path, train, evals, **{
        "train.max_steps": 2, "eval.n_generation_prompts": 0, "model.reward_pooling": "sum",
        "output_dir": str(tmp_path / "rm")})))
    reward = load_reward_role(tmp_path / "rm", "cpu")  # PPO's and serving's RM
    assert reward.model.pooling == "sum"
    # evaluate ranks the pairs with the summed reward too: its margins are the PPO role's scores' differences
    metrics = evaluate_run(tmp_path / "rm", evals, tmp_path / "ev", ["report_to=none", "eval.n_generation_prompts=0"])
    pairs = [r for r in map(json.loads, evals.read_text().splitlines())]
    scores = reward.score([r["prompt"] for r in pairs] * 2, [r["chosen"] for r in pairs] + [r["rejected"] for r in pairs],
                          [r["user_id"] for r in pairs] * 2)
    margins = scores[:len(pairs)] - scores[len(pairs):]
    assert metrics["overall"]["mean_margin"] == pytest.approx(float(margins.mean()), rel=1e-3, abs=1e-3)


def test_evaluate_reports_each_users_cluster_weights_for_a_cluster_model(tmp_path, toy_data):
    """A cluster run's metrics.json and report.md give every user's (and the generic user's) w_i over the centres,
    as the trained table holds them; other kinds report none."""
    from safetensors.torch import load_file

    from conftest import tiny_overrides
    from pipelines.evaluate import evaluate_run
    from pipelines.train_rm import run
    from preference_data.vocab import UserVocab

    train, evals = toy_data
    run(load_config(None, tiny_overrides(tmp_path, train, evals, **{
        "train.max_steps": 3, "user_model.kind": "cluster", "user_model.n_clusters": 3,
        "eval.n_generation_prompts": 0})))
    metrics = evaluate_run(tmp_path / "run", evals, tmp_path / "ev", ["report_to=none"])
    weights = metrics["cluster_weights"]
    vocab = UserVocab.load(tmp_path / "run" / "users.json")
    assert list(weights) == ["<generic>"] + vocab.ids
    logits = load_file(str(tmp_path / "run" / "checkpoint" / "user_model.safetensors"))["implicit.logits.weight"]
    for name, w in weights.items():
        expected = torch.softmax(logits[vocab.index(None if name == "<generic>" else name)].float(), -1)
        assert w == pytest.approx(expected.tolist(), abs=1e-4) and sum(w) == pytest.approx(1.0, abs=1e-3)
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "| user | group | centre 1 | centre 2 | centre 3 |" in report
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["cluster_weights"] == weights

    run(load_config(None, tiny_overrides(tmp_path, train, evals, **{
        "train.max_steps": 1, "output_dir": str(tmp_path / "ind"), "eval.n_generation_prompts": 0})))
    plain = evaluate_run(tmp_path / "ind", evals, tmp_path / "ev_ind", ["report_to=none"])
    assert "cluster_weights" not in plain and "Cluster weights" not in (tmp_path / "ev_ind" / "report.md").read_text()
