import math

import pytest
import torch

from common.batching import EncodedPair, collate_pairs, score_pairs
from common.config import load_config
from common.run import build_backbone
from policy.dpo_loss import (personalized_dpo_loss, preference_loss, stochastic_dpo_loss, stochastic_generic_mask)
from policy.model import PersonalizedPolicy


def tiny_policy(kind="individual", n_users=3):
    cfg = load_config(None, [f"user_model.kind={kind}", "model.name=tiny-random"])
    backbone, tok = build_backbone(cfg, n_users, torch.device("cpu"))
    return PersonalizedPolicy(backbone), tok


def sp(x):  # -log sigmoid(x)
    return math.log(1 + math.exp(-x))


def test_pdpo_loss_hand_computation():
    uw, ul = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    gw, gl = torch.tensor([-3.5, -5.5]), torch.tensor([-3.5, -4.5])
    rw, rl = torch.tensor([-3.2, -5.1]), torch.tensor([-3.9, -4.2])
    alpha, beta = 0.4, 0.5
    loss, _ = personalized_dpo_loss(uw, ul, gw, gl, rw, rl, alpha, beta)
    h_user = [(-3.0 + 3.2) - (-4.0 + 3.9), (-5.0 + 5.1) - (-4.0 + 4.2)]
    h_gen = [(-3.5 + 3.2) - (-3.5 + 3.9), (-5.5 + 5.1) - (-4.5 + 4.2)]
    expected = alpha * sum(sp(beta * h) for h in h_user) / 2 + (1 - alpha) * sum(sp(beta * h) for h in h_gen) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_chosen_nll_term_hand_computation():
    uw, ul = torch.tensor([-3.0, -6.0]), torch.tensor([-4.0, -4.0])
    gw, gl = torch.tensor([-4.0, -9.0]), torch.tensor([-3.5, -4.5])
    rw, rl = torch.tensor([-3.2, -5.1]), torch.tensor([-3.9, -4.2])
    n_tok = torch.tensor([2, 3])
    alpha, beta, w = 0.4, 0.5, 0.7
    base, _ = personalized_dpo_loss(uw, ul, gw, gl, rw, rl, alpha, beta)
    loss, stats = personalized_dpo_loss(uw, ul, gw, gl, rw, rl, alpha, beta, nll_weight=w, chosen_tokens=n_tok)
    nll_user = (3.0 / 2 + 6.0 / 3) / 2  # per-token NLL of each chosen answer, averaged over pairs
    nll_gen = (4.0 / 2 + 9.0 / 3) / 2
    assert loss.item() == pytest.approx(base.item() + w * (alpha * nll_user + (1 - alpha) * nll_gen), rel=1e-6)
    assert stats["nll/user"].item() == pytest.approx(nll_user)
    mixed, _ = stochastic_dpo_loss(uw, ul, rw, rl, beta, nll_weight=w, chosen_tokens=n_tok)
    assert mixed.item() == pytest.approx(stochastic_dpo_loss(uw, ul, rw, rl, beta)[0].item() + w * nll_user)
    with pytest.raises(ValueError, match="chosen_tokens"):
        personalized_dpo_loss(uw, ul, gw, gl, rw, rl, alpha, beta, nll_weight=w)


def test_alpha_one_and_zero_reduce_to_single_terms():
    t = [torch.randn(5) for _ in range(6)]
    one, _ = personalized_dpo_loss(*t, alpha=1.0, beta=0.1)
    only_user, _ = personalized_dpo_loss(t[0], t[1], None, None, t[4], t[5], alpha=1.0, beta=0.1)
    assert one.item() == pytest.approx(only_user.item())
    zero, _ = personalized_dpo_loss(*t, alpha=0.0, beta=0.1)
    only_generic, _ = personalized_dpo_loss(t[2], t[3], None, None, t[4], t[5], alpha=1.0, beta=0.1)
    assert zero.item() == pytest.approx(only_generic.item())


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_other_loss_types(loss_type):
    h = torch.tensor([0.5, -1.0])
    if loss_type == "ipo":
        assert torch.allclose(preference_loss(h, 0.25, "ipo"), (h - 2.0) ** 2)
    else:
        assert torch.allclose(preference_loss(h, 0.5, "hinge"), torch.relu(1 - 0.5 * h))


def test_stochastic_estimator_is_unbiased():
    torch.manual_seed(0)
    n = 6
    uw, ul, gw, gl, rw, rl = [torch.randn(n) for _ in range(6)]
    alpha, beta = 0.7, 0.3
    exact, _ = personalized_dpo_loss(uw, ul, gw, gl, rw, rl, alpha, beta)
    g = torch.Generator().manual_seed(1)
    draws = []
    for _ in range(20000):
        generic = stochastic_generic_mask(n, alpha, g)
        w, l = torch.where(generic, gw, uw), torch.where(generic, gl, ul)
        draws.append(stochastic_dpo_loss(w, l, rw, rl, beta)[0].item())
    assert sum(draws) / len(draws) == pytest.approx(exact.item(), rel=5e-3)


def test_reference_never_sees_a_prefix():
    policy, tok = tiny_policy()
    pairs = [EncodedPair([5, 6, 7], [8, 9, 2], [10, 2], 1), EncodedPair([5, 6], [3, 2], [4, 4, 2], 2)]
    batch = collate_pairs(pairs, tok.pad_token_id)
    calls = []
    orig = policy.backbone.user_model.forward
    policy.backbone.user_model.forward = lambda *a, **k: calls.append(1) or orig(*a, **k)
    ref = policy.reference_logps(batch)
    assert calls == []  # the user model was never asked
    # and it equals the plain LM without adapters, whatever the users are
    ref_generic = policy.reference_logps({**batch, "user_idx": torch.zeros_like(batch["user_idx"])})
    assert torch.equal(ref, ref_generic)
    with torch.no_grad():
        for p in policy.backbone.lm.parameters():
            if p.requires_grad:
                p.add_(0.05)  # move the LoRA weights: the reference must not change
    assert torch.allclose(policy.reference_logps(batch), ref)
    assert not torch.allclose(policy.sequence_logps(batch), ref)


def test_batched_left_padded_generation_equals_single():
    policy, tok = tiny_policy()
    with torch.no_grad():
        policy.backbone.user_model.implicit.offsets.weight[1:] += 0.3 * torch.randn(3, policy.backbone.user_model.implicit.offsets.weight.shape[1])
    prompts = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]]
    users = torch.tensor([1, 2, 0])
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id)
    batched = policy.generate(prompts, users, pad_id=tok.pad_token_id, **kw)
    single = [policy.generate([p], users[i:i + 1], pad_id=tok.pad_token_id, **kw)[0] for i, p in enumerate(prompts)]
    assert batched == single


def test_generate_per_user_batches_users_together_with_the_same_result():
    """Users share generation batches (one decoding pass serves many (user, prompt) rows): the result is the one of
    generating each user's prompts on their own."""
    from common.batching import PairEncoder
    from common.config import load_config as _load
    from policy.generation import generate_per_user

    policy, tok = tiny_policy()
    with torch.no_grad():
        w = policy.backbone.user_model.implicit.offsets.weight
        w[1:] += 0.3 * torch.randn(w.shape[0] - 1, w.shape[1])
    encoder = PairEncoder.from_config(tok, _load(None, ["model.name=tiny-random"]))
    prompts = ["hello there", "a b c d e f", "why"]
    users = {"<generic>": 0, "u1": 1, "u2": 2}
    together = generate_per_user(policy, encoder, prompts, users, 6, tok.pad_token_id, batch_size=7)
    alone = generate_per_user(policy, encoder, prompts, users, 6, tok.pad_token_id, batch_size=1)
    assert together["texts"] == alone["texts"] and together["users"] == alone["users"]
    assert set(together["users"]) == {"<generic>", "u1", "u2", "<reference>"}
    assert len(together["texts"]["u2"]) == 3 and together["examples"]["u1"] == together["texts"]["u1"][:2]
    assert together["response_tokens"] == alone["response_tokens"]
    assert all(0 < together["response_tokens"][u] <= 6 for u in users)
    assert all(0 < v <= 1 for v in together["distinct_token_share"].values())


def test_generate_per_user_decodes_a_uniform_user_model_once():
    """Every user of a uniform user model has the same prefix: one user's greedy answers are copied to the others,
    and they are what decoding each user would give."""
    from common.batching import PairEncoder
    from common.config import load_config as _load
    from policy.generation import generate_per_user

    policy, tok = tiny_policy(kind="uniform")
    encoder = PairEncoder.from_config(tok, _load(None, ["model.name=tiny-random"]))
    calls = []
    generate = policy.generate
    policy.generate = lambda *a, **kw: calls.append(len(a[0])) or generate(*a, **kw)
    users = {"<generic>": 0, "u1": 1, "u2": 2}
    out = generate_per_user(policy, encoder, ["hello there", "why"], users, 5, tok.pad_token_id, batch_size=16,
                            include_reference=False)
    assert calls == [2]  # one user's two prompts, in one batch
    policy.generate = generate
    for label, idx in users.items():
        own = policy.generate([encoder.prompt_ids(p) for p in ["hello there", "why"]], torch.tensor([idx, idx]),
                              pad_id=tok.pad_token_id, max_new_tokens=5, do_sample=False,
                              eos_token_id=tok.eos_token_id)
        assert out["texts"][label] == out["texts"]["<generic>"]
        assert [t["response"] for t in out["texts"][label]] == [tok.decode(o, skip_special_tokens=True).strip()
                                                                for o in own]


def test_generation_stats_expose_degenerate_short_answers():
    """A run of one token counts as one word; its token count and distinct-token share give it away."""
    from types import SimpleNamespace

    from policy.generation import generate_per_user

    canned = {1: [7, 7, 7, 7, 7, 7, 7, 7], 2: [3, 4, 5, 2]}  # user 1: "BBBBBBBB" (no EOS); user 2: an answer + EOS

    class Stub:
        def generate(self, prompts, user_idx, pad_id=0, reference=False, **kw):
            return [list(canned[2 if reference else int(u)]) for u in user_idx]

    vocab = {7: "B", 3: "Yes ", 4: "it ", 5: "is", 2: ""}
    tok = SimpleNamespace(eos_token_id=2, decode=lambda ids, skip_special_tokens=True: "".join(vocab[i] for i in ids))
    encoder = SimpleNamespace(tok=tok, prompt_ids=lambda p: [9, 9])
    out = generate_per_user(Stub(), encoder, ["p", "q"], {"u1": 1, "u2": 2}, 8, 0)
    assert out["users"] == {"u1": 1.0, "u2": 3.0, "<reference>": 3.0}
    assert out["response_tokens"]["u1"] == 8.0 and out["distinct_token_share"]["u1"] == 1 / 8
    assert out["distinct_token_share"]["u2"] == 1.0


def test_pdpo_run_separates_users_and_writes_run_folder(tmp_path, toy_data):
    import json

    from pipelines.train_pdpo import run
    from tests.conftest import tiny_overrides

    train, evals = toy_data
    m = run(load_config(None, tiny_overrides(tmp_path, train, evals, **{"train.max_steps": 30,
                                                                         "train.batch_size": 8})))
    ev = m["eval"]
    assert ev["route"] == "dpo"
    assert ev["per_user"]["a"]["accuracy"] == 1.0 and ev["per_user"]["b"]["accuracy"] == 1.0
    run_dir = tmp_path / "run"
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["per_group"]["minority"]["n"] == 4
    assert saved["per_user"]["a"]["mean_response_words"] is not None
    for f in ["config.yaml", "users.json", "checkpoint/user_model.safetensors", "checkpoint/user_model.json",
              "checkpoint/adapter/adapter_model.safetensors", "plots/per_user_accuracy.png",
              "plots/response_words.png", "report.md", "ref_logps.safetensors"]:
        assert (run_dir / f).exists(), f


def test_stochastic_estimator_trains(tmp_path, toy_data):
    from pipelines.train_pdpo import run
    from tests.conftest import tiny_overrides

    train, evals = toy_data
    m = run(load_config(None, tiny_overrides(tmp_path, train, evals, **{"loss.estimator": "stochastic",
                                                                         "train.max_steps": 30, "train.batch_size": 8,
                                                                         "eval.n_generation_prompts": 0})))
    # one pass per pair (its user or, with probability 1 - alpha, the generic user) still separates the users
    assert m["eval"]["overall"]["n"] == 8
    assert m["eval"]["per_user"]["a"]["accuracy"] == 1.0 and m["eval"]["per_user"]["b"]["accuracy"] == 1.0


def test_chosen_nll_keeps_chosen_answers_likelier_than_plain_dpo(tmp_path, toy_data):
    """The same run with and without loss.nll_weight: the NLL term must raise log pi(y_w | x, u) of the users' own
    chosen answers (what plain DPO is free to lower while it widens the margin)."""
    from pipelines.train_pdpo import run
    from policy.scoring import pair_logps
    from tests.conftest import tiny_overrides

    train, evals = toy_data
    chosen = {}
    for w in (0.0, 1.0):
        over = tiny_overrides(tmp_path / str(w), train, evals, **{"loss.nll_weight": w, "train.max_steps": 20,
                                                                  "eval.n_generation_prompts": 0})
        out = run(load_config(None, over))
        assert out["eval"]["overall"]["n"] == 8
        policy, encoder, pairs = _trained_policy(tmp_path / str(w) / "run", train)
        lp_w, _ = pair_logps(policy, pairs, encoder.tok.pad_token_id, 8, torch.device("cpu"))
        chosen[w] = lp_w.mean().item()
    assert chosen[1.0] > chosen[0.0]


def _trained_policy(run_dir, train_path):
    """(policy, encoder, encoded training pairs) of a finished train_pdpo run."""
    from common.batching import PairEncoder
    from common.run import load_backbone_from_run
    from preference_data import load_records

    cfg, backbone, tok, vocab, _ = load_backbone_from_run(run_dir, torch.device("cpu"))
    encoder = PairEncoder.from_config(tok, cfg)
    return PersonalizedPolicy(backbone), encoder, encoder.encode_all(load_records(train_path), vocab)


def test_evaluate_cli_scores_any_file_with_a_finished_run(tmp_path, toy_data):
    import json

    from pipelines.evaluate import main
    from pipelines.train_pdpo import run
    from tests.conftest import tiny_overrides

    train, evals = toy_data
    run(load_config(None, tiny_overrides(tmp_path, train, evals, **{"train.max_steps": 2,
                                                                     "eval.n_generation_prompts": 0})))
    out = tmp_path / "eval_again"
    assert main(["--run", str(tmp_path / "run"), "--data", str(evals), "--out", str(out),
                 "eval.n_generation_prompts=1", "eval.max_new_tokens=4"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["route"] == "dpo" and m["overall"]["n"] == 8
    assert m["generation"]["users"]["<generic>"] is not None
    assert (out / "plots" / "per_user_accuracy.png").exists() and (out / "report.md").exists()
    assert main(["--run", str(tmp_path / "nope"), "--data", str(evals)]) == 2


def test_cached_reference_logps_are_recomputed_for_another_reference(tmp_path):
    from safetensors.torch import load_file, save_file

    from policy.dpo_trainer import cached_reference_logps

    policy, tok = tiny_policy()
    pairs = [EncodedPair([5, 6, 7], [8, 9, 2], [10, 2], 1), EncodedPair([5, 6], [3, 2], [4, 4, 2], 2),
             EncodedPair([7, 5], [9, 2], [3, 3, 2], 1)]
    cache = tmp_path / "ref_logps.safetensors"
    first = cached_reference_logps(policy, pairs, tok.pad_token_id, 2, "cpu", cache)
    stored = load_file(str(cache))
    stored["chosen"][2] = -123.0  # a mark only a read of the cache can return (the probe checks pairs 0 and 1)
    save_file(stored, str(cache))
    again = cached_reference_logps(policy, pairs, tok.pad_token_id, 2, "cpu", cache)
    assert again[0][2] == -123.0 and torch.equal(again[0][:2], first[0][:2])
    with torch.no_grad():  # another pi_SFT behind the same tokenizer
        policy.backbone.lm.get_input_embeddings().weight.mul_(1.5)
    fresh = cached_reference_logps(policy, pairs, tok.pad_token_id, 2, "cpu", cache)
    assert fresh[0][2] != -123.0 and not torch.allclose(fresh[0], first[0])


def test_score_pairs_maps_rows_back_and_scores_a_repeated_pair_once():
    """`score_pairs`, under both the RM's and the policy's held-out scoring: each pair gets its own chosen and
    rejected score whatever the length-sorted batching, `as_generic` scores as user 0, and `once_per_pair` scores a
    comparison that several annotators labelled once and hands the same score back to each of them."""
    seen_rows = []

    def score(batch):  # the answer's token sum, and the user: enough to tell every sequence apart
        seen_rows.append(len(batch["user_idx"]))
        answer = torch.where(batch["labels"] == -100, 0, batch["labels"]).sum(dim=1)
        return (answer + 1000 * batch["user_idx"]).float()

    pairs = [EncodedPair([5, 6], [7] * (1 + i), [8, 9], i % 3) for i in range(5)]
    pairs += [EncodedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids, 4) for p in pairs[:3]]  # relabelled by user 4
    expect_w = torch.tensor([7.0 * len(p.chosen_ids) + 1000 * p.user_idx for p in pairs])
    expect_l = torch.tensor([17.0 + 1000 * p.user_idx for p in pairs])
    w, l = score_pairs(score, pairs, 0, 2, "cpu")
    assert torch.equal(w, expect_w) and torch.equal(l, expect_l)
    seen_rows.clear()
    w, l = score_pairs(score, pairs, 0, 2, "cpu", as_generic=True, once_per_pair=True)
    users = torch.tensor([p.user_idx for p in pairs])
    assert torch.equal(w, expect_w - 1000 * users) and torch.equal(l, l[0].expand(8))
    assert sum(seen_rows) == 2 * 5  # five distinct comparisons, two answers each


def test_pair_logps_scores_length_sorted_sequences_like_whole_pairs():
    """Held-out scoring batches the 2N answers by length (a short answer is not padded to its pair's long one): the
    log-probs are those of scoring each pair's two answers together, for every route and user choice."""
    from policy.scoring import pair_logps

    policy, tok = tiny_policy()
    with torch.no_grad():
        policy.backbone.user_model.implicit.offsets.weight[1:].normal_(0.0, 0.5)
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(5, 60, (n,), generator=g).tolist()

    pairs = [EncodedPair(ids(3 + i % 4), ids(2 + 5 * (i % 3)), ids(12 - 3 * (i % 3)), i % 4) for i in range(7)]
    for kw in (dict(), dict(reference=True), dict(as_generic=True)):
        w, l = pair_logps(policy, pairs, tok.pad_token_id, 2, "cpu", **kw)
        for i, p in enumerate(pairs):
            batch = collate_pairs([p], tok.pad_token_id)
            if kw.get("as_generic"):
                batch["user_idx"] = torch.zeros_like(batch["user_idx"])
            with torch.no_grad():
                lp = policy.reference_logps(batch) if kw.get("reference") else policy.sequence_logps(batch)
            assert torch.allclose(torch.stack([w[i], l[i]]), lp, atol=1e-5), (kw, i)
