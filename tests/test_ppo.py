"""PPO: the arithmetic against hand computations, the roles (alignment, reference, per-user reward), and the
train_ppo stage end to end on tiny-random (plain torch, DeepSpeed ZeRO-2 on CPU, exact resume)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common.batching import collate_sequences  # noqa: E402
from common.config import ConfigError, load_config  # noqa: E402
from common.run import build_backbone, prepare_run_dir, save_artifacts, write_run_info  # noqa: E402
from policy.model import PersonalizedPolicy  # noqa: E402
from policy.ppo.core import (  # noqa: E402
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    entropy_from_logits,
    per_token_kl_rewards,
    whiten,
)
from policy.ppo.roles import (  # noqa: E402
    Actor,
    Critic,
    Reference,
    _token_logps,
    build_roles,
    load_reward_role,
    response_index,
)
from preference_data.vocab import UserVocab  # noqa: E402
from reward.model import PersonalizedRewardModel  # noqa: E402

from conftest import toy_rows, write_jsonl  # noqa: E402

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------------ fixtures


def make_rm_run(folder: Path, users=("a", "b"), offset_std: float = 1.0) -> Path:
    """A finished train_rm run folder built directly with common.run (no training): tiny-random backbone whose
    user offsets are clearly different, so that the RM's reward depends on the user."""
    cfg = load_config(None, ["model.name=tiny-random", f"output_dir={folder}", "report_to=none",
                             "user_model.kind=individual"])
    run_dir = prepare_run_dir(cfg)
    vocab = UserVocab(users)
    vocab.save(run_dir / "users.json")
    backbone, _ = build_backbone(cfg, len(vocab), CPU)
    with torch.no_grad():
        backbone.user_model.implicit.offsets.weight[1:].normal_(0.0, offset_std)
    rm = PersonalizedRewardModel(backbone)
    save_artifacts(run_dir, backbone, {"score": rm.score})
    write_run_info(run_dir, cfg, "train_rm", backbone, vocab, extra={"route": "rm"})
    return run_dir


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    return make_rm_run(tmp_path_factory.mktemp("rm") / "rm")


@pytest.fixture(scope="module")
def ppo_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ppo_data")
    rows = toy_rows(6)
    return write_jsonl(folder / "train.jsonl", rows), write_jsonl(folder / "eval.jsonl", rows[:4])


def ppo_overrides(out: Path, train: Path, rm_run: Path, **extra) -> list[str]:
    base = {"model.name": "tiny-random", "output_dir": str(out), "report_to": "none", "data.train_path": str(train),
            "ppo.rm_run": str(rm_run), "train.max_steps": 1, "ppo.rollout_batch_size": 4, "ppo.minibatch_size": 2,
            "ppo.ppo_epochs": 2, "ppo.max_new_tokens": 6, "ppo.generic_user_share": 0.25, "train.lr": 0.003}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def make_trainer(cfg, rm_run: Path, run_dir: Path, lora_b_std: float | None = None):
    """A PPOTrainer on the toy prompts against `rm_run`; `lora_b_std` draws LoRA's B (which starts at 0) from
    N(0, std): a policy away from the reference, with adapters whose input matters."""
    from policy.ppo.trainer import PPOTrainer

    vocab = UserVocab.load(rm_run / "users.json")
    modules, actor, critic, reference, tok = build_roles(cfg, len(vocab), CPU)
    if lora_b_std is not None:
        with torch.no_grad():
            for name, param in modules.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, lora_b_std)
    return PPOTrainer(cfg, run_dir, modules, actor, critic, reference, load_reward_role(rm_run, CPU), tok, vocab,
                      ["Tell me about tea.", "Tell me about salt."])


# ------------------------------------------------------------------------------------------------ core


def test_gae_hand_computed():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 7.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.1, 9.0]])  # row 2's third position is padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 1: deltas 3 - .3 = 2.7; 2 + .9 * .3 - .4 = 1.87; 1 + .9 * .4 - .5 = .86 ; gamma * lam = .72
    a12 = 2.7
    a11 = 1.87 + 0.72 * a12
    a10 = 0.86 + 0.72 * a11
    # row 2 ends after 2 tokens: no bootstrap from the padding value 9, no reward 7 counted
    a21 = 5.0 - 0.1
    a20 = 4.0 + 0.9 * 0.1 - 0.2 + 0.72 * a21
    expected = torch.tensor([[a10, a11, a12], [a20, a21, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.allclose(ret, (expected + values) * mask, atol=1e-6)
    # gamma = lam = 1: advantage = reward-to-go minus value
    adv1, _ = compute_gae(rewards, values, mask, 1.0, 1.0)
    assert torch.allclose(adv1[0], torch.tensor([6.0 - 0.5, 5.0 - 0.4, 3.0 - 0.3]), atol=1e-6)


def test_kl_rewards_zero_kl_and_score_at_last_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    score = torch.tensor([2.0, -1.0])
    rewards, kl = per_token_kl_rewards(logp, logp.clone(), mask, 0.1, score)
    assert torch.equal(kl, torch.zeros_like(kl))
    assert torch.allclose(rewards, torch.tensor([[0.0, 0.0, 2.0], [0.0, -1.0, 0.0]]))
    ref = torch.tensor([[-1.5, -2.0, -0.25], [-0.3, -0.2, -9.0]])
    rewards, kl = per_token_kl_rewards(logp, ref, mask, 0.1, score)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -0.25], [0.0, -0.5, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 0.025 + 2.0], [0.0, 0.05 - 1.0, 0.0]]))


def test_clipped_policy_loss_hand_computed():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 3.0]]))  # ratios; the last token is padding
    adv = torch.tensor([[1.0, 1.0, -2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac, approx_kl = clipped_policy_loss(logp, old, adv, mask, clip=0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(-0.5, -0.8) = -0.5; token 3: max(2.2, 2.2) = 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(1 / 3)
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.1)]
    assert approx_kl.item() == pytest.approx(sum(k3) / 3, abs=1e-6)
    # at ratio 1 the loss is -mean(advantage) and its gradient -adv / n
    lp = torch.zeros(1, 3, requires_grad=True)
    loss, clipfrac, approx_kl = clipped_policy_loss(lp, torch.zeros(1, 3), torch.tensor([[1.0, -2.0, 4.0]]),
                                                    torch.ones(1, 3), 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-1.0) and clipfrac.item() == 0 and approx_kl.item() == 0
    assert torch.allclose(lp.grad, torch.tensor([[-1.0, 2.0, -4.0]]) / 3)


def test_clipped_value_loss_hand_computed():
    values = torch.tensor([[1.0, 0.0, 2.0]])
    old = torch.tensor([[0.5, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, clipfrac = clipped_value_loss(values, old, returns, mask, clip=0.2)
    # token 1: V_clip = 0.7: max((1-2)^2, (0.7-2)^2) = 1.69 (clipped one larger); token 2: max(1, 1) = 1
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)


def test_whiten_split_over_ranks_equals_whiten_of_the_whole_batch():
    # advantages 1, 2 on rank 0 and 10, 11 on rank 1: whitened per share, the 10 would turn negative
    x = torch.tensor([[1.0, 2.0], [10.0, 11.0]])
    mask = torch.ones_like(x)
    whole = whiten(x.reshape(1, 4), mask.reshape(1, 4)).reshape(2, 2)
    shares = [(x[i:i + 1], mask[i:i + 1]) for i in range(2)]

    def sum_over_two_ranks(local: dict) -> dict:  # what an all-reduce returns: every share's sums added
        stats = [{"n": float(m.sum()), "sum": float((v * m).sum()), "squares": float((v * v * m).sum())}
                 for v, m in shares]
        assert local in stats
        return {k: sum(st[k] for st in stats) for k in local}

    split = torch.cat([whiten(v, m, sum_over_ranks=sum_over_two_ranks) for v, m in shares])
    assert split.allclose(whole, atol=1e-5)
    assert split[1, 0] > 0 and whiten(x[1:], mask[1:])[0, 0] < 0


def test_whiten_entropy_and_kl_controllers():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    w = whiten(x, mask)
    real = w[mask.bool()]
    assert real.mean().abs() < 1e-6 and real.std().item() == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(w[~mask.bool()], torch.zeros(2))
    assert entropy_from_logits(torch.zeros(2, 7)).allclose(torch.full((2,), math.log(7)))
    assert entropy_from_logits(torch.tensor([[0.0, -1e9]])).item() == pytest.approx(0.0, abs=1e-6)

    fixed = FixedKLController(0.05)
    fixed.update(100.0, 8)
    assert fixed.value == 0.05
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(12.0, n_steps=10)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl.update(5.0, n_steps=10)  # error 5/6 - 1
    assert ctl.value == pytest.approx(0.1 * 1.02 * (1 + (5 / 6 - 1) * 0.1))
    other = AdaptiveKLController(1.0, 1.0, 1)
    other.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert (other.value, other.target, other.horizon) == (ctl.value, 6.0, 100)


# ------------------------------------------------------------------------------------------------ roles


def _tiny_cfg(tmp_path, *extra):
    return load_config(None, ["model.name=tiny-random", f"output_dir={tmp_path / 'x'}", "report_to=none",
                              "data.max_response_length=16", *extra])


def test_response_index_alignment():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, -100]])
    rows, cols, k = response_index(labels)
    # hidden position c predicts label c + 1
    assert rows.tolist() == [0, 0, 1, 1, 1] and cols.tolist() == [1, 2, 0, 1, 2] and k.tolist() == [0, 1, 0, 1, 2]


def test_roles_logps_reference_and_values(tmp_path):
    torch.manual_seed(0)
    cfg = _tiny_cfg(tmp_path, "ppo.temperature=1.0", "ppo.min_new_tokens=0")
    modules, actor, critic, reference, tok = build_roles(cfg, 2, CPU)
    with torch.no_grad():
        modules.value_head.weight.normal_()
    prompts, responses = [[10, 11, 12], [13, 14]], [[20, 21, tok.eos_token_id], [22, 23, 24, 25]]
    batch = collate_sequences(prompts, responses, [1, 2], [[], []], tok.pad_token_id)
    policy = actor.policy
    with torch.no_grad():
        hidden, inputs = actor.hidden(batch)
        logps, mask, entropy = actor.token_logps(hidden, inputs, width=5, with_entropy=True)
        ref = reference.token_logps(batch, width=5)
        # per-token log-probs sum to the policy's sequence log-probs (user prefix) / reference log-probs (none)
        assert torch.allclose(logps.sum(1), policy.sequence_logps(batch), atol=1e-5)
        assert torch.allclose(ref.sum(1), policy.reference_logps(batch), atol=1e-5)
        assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
        assert (entropy[mask.bool()] > 0).all() and (entropy[~mask.bool()] == 0).all()
        # a fresh LoRA (B = 0) changes nothing: without the prefix the actor *is* the reference, so the KL
        # term is exactly zero; the user prefix is what makes them differ at the start of PPO
        h0, in0 = actor.backbone.hidden_states(batch, use_prefix=False)
        same, _, _ = actor.token_logps(h0, in0, width=5)
        assert torch.allclose(same, ref, atol=1e-6)
        _, kl = per_token_kl_rewards(same, ref, mask, 0.1, torch.zeros(2))
        assert kl.abs().max() < 1e-6
        assert not torch.allclose(logps, ref, atol=1e-4)
        # a trained LoRA moves the actor but not the reference (adapters off): the KL is measured against pi_SFT
        for name, param in modules.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
        assert torch.equal(reference.token_logps(batch, width=5), ref)
        moved, _, _ = actor.token_logps(*actor.backbone.hidden_states(batch, use_prefix=False), width=5)
        assert not torch.allclose(moved, ref, atol=1e-3)
        # values: the head on the hidden state that predicts each response token
        values = critic.values(batch, 5, hidden, inputs)
        rows, cols, k = response_index(inputs.labels)
        expected = modules.value_head(hidden[:, :-1][rows, cols]).squeeze(-1)
        assert torch.allclose(values[rows, k], expected, atol=1e-6) and (values[~mask.bool()] == 0).all()
    with pytest.raises(ValueError, match="shared critic"):
        critic.values(batch, 5)


def test_separate_critic_has_its_own_backbone(tmp_path):
    cfg = _tiny_cfg(tmp_path, "ppo.critic=separate")
    modules, actor, critic, reference, tok = build_roles(cfg, 2, CPU)
    assert not critic.shared and critic.backbone is not actor.backbone
    names = {n.split(".")[0] for n, p in modules.named_parameters() if p.requires_grad}
    assert names == {"actor", "critic", "value_head"}
    batch = collate_sequences([[10, 11]], [[20, 21]], [1], [[]], tok.pad_token_id)
    with torch.no_grad():
        assert critic.values(batch, 3).shape == (1, 3)


def test_reward_scores_each_sample_for_its_user(rm_run):
    reward = load_reward_role(rm_run, CPU)
    assert all(not p.requires_grad for p in reward.model.parameters())
    prompts, responses = ["Tell me about tea."] * 2, ["Tea matters a lot."] * 2
    r_ab = reward.score(prompts, responses, ["a", "b"])
    r_ba = reward.score(prompts, responses, ["b", "a"])
    assert abs(r_ab[0] - r_ab[1]) > 1e-4, "the RM's users differ, so must the rewards"
    assert torch.allclose(r_ab, r_ba.flip(0))
    # unknown ids and None are the generic user 0; ids map through the RM's own users.json
    r_gen = reward.score(prompts, responses, [None, "somebody-else"])
    assert torch.allclose(r_gen[0], r_gen[1]) and not torch.allclose(r_gen[0], r_ab[0])
    enc = reward.encoder
    batch = collate_sequences([enc.prompt_ids(prompts[0])] * 2, [enc.response_ids(responses[0])] * 2,
                              [reward.vocab.index("b"), 0], [[], []], reward.tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(reward.model(batch), torch.stack([r_ab[1], r_gen[0]]), atol=1e-6)
    # a response cut by max_new_tokens has no EOS appended, so it scores differently
    assert not torch.allclose(reward.score(prompts[:1], responses[:1], ["a"], ended=[False]), r_ab[:1])


def test_min_new_tokens_logps_are_those_of_the_sampler(tmp_path):
    """With ppo.min_new_tokens=k the sampler never draws EOS among the first k tokens, so the actor's and the
    reference's log-probs there are over the other tokens only: log p(y_t) - log(1 - p(EOS)); later tokens keep
    the full softmax. Entropies stay finite."""
    torch.manual_seed(0)
    free = _tiny_cfg(tmp_path / "free", "ppo.min_new_tokens=0")
    ruled = _tiny_cfg(tmp_path / "ruled", "ppo.min_new_tokens=2")
    modules, actor, _, reference, tok = build_roles(free, 2, CPU)
    _, ruled_actor, _, ruled_reference, _ = build_roles(ruled, 2, CPU)
    ruled_actor.policy, ruled_reference.backbone = actor.policy, reference.backbone  # same weights, other rule
    eos = tok.eos_token_id
    batch = collate_sequences([[10, 11, 12], [13, 14]], [[20, 21, 22, eos], [23, 24, 25]], [1, 2], [[], []],
                              tok.pad_token_id)
    with torch.no_grad():
        hidden, inputs = actor.hidden(batch)
        full, mask, _ = actor.token_logps(hidden, inputs, width=4)
        ruled_lp, _, entropy = ruled_actor.token_logps(hidden, inputs, width=4, with_entropy=True)
        rows, cols, k = response_index(inputs.labels)
        p_eos = torch.softmax(actor.backbone.lm_head(hidden[:, :-1][rows, cols]).float(), -1)[:, eos]
        expected = full.clone()
        early = k < 2
        expected[rows[early], k[early]] -= torch.log1p(-p_eos[early])
        assert torch.allclose(ruled_lp, expected, atol=1e-5)
        assert torch.equal(ruled_lp[:, 2:], full[:, 2:])
        assert torch.isfinite(entropy).all()
        ref_full, ref_ruled = reference.token_logps(batch, 4), ruled_reference.token_logps(batch, 4)
        assert (ref_ruled[:, :2] > ref_full[:, :2]).all() and torch.equal(ref_ruled[:, 2:], ref_full[:, 2:])


def test_min_new_tokens_rule_holds_in_float16():
    # model.dtype=float16: the EOS rule's fill value must fit the dtype (-1e9 does not: fp16 ends at 65504)
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 5, bias=False)
    hidden = torch.randn(2, 6, 8)
    labels = torch.full((2, 6), -100)
    labels[:, 3:] = torch.tensor([1, 2, 4])
    eos = 4
    lp32, mask, _ = _token_logps(hidden, labels, head, 1.0, 3, False, eos_id=eos, min_new_tokens=1)
    half_head = torch.nn.Linear(8, 5, bias=False).half()
    half_head.weight.data.copy_(head.weight.data)
    lp16, _, ent16 = _token_logps(hidden.half(), labels, half_head, 1.0, 3, True, eos_id=eos, min_new_tokens=1)
    assert torch.isfinite(lp16).all() and torch.isfinite(ent16).all()
    assert torch.allclose(lp16.float(), lp32, atol=2e-2)
    first = head(hidden[:, 2]).float()  # position predicting the first response token
    ruled = torch.log_softmax(first[:, :eos], -1)[:, 1]  # token 1 among the non-EOS tokens
    assert torch.allclose(lp32[:, 0], ruled, atol=1e-5)


def test_min_new_tokens_keeps_rollouts_from_ending_empty(tmp_path):
    """A policy that wants to stop at once (EOS logit pushed up by 100) writes an empty answer unless
    ppo.min_new_tokens masks EOS for the first tokens."""
    cfg = _tiny_cfg(tmp_path)
    modules, actor, _, _, tok = build_roles(cfg, 2, CPU)
    eos = tok.eos_token_id
    lm_head = actor.backbone.base_lm.get_output_embeddings()

    def push_eos(module, inputs, out):
        out = out.clone()
        out[..., eos] += 100.0
        return out

    hook = lm_head.register_forward_hook(push_eos)
    try:
        prompts, users = [[10, 11, 12, 13], [14, 15]], torch.tensor([1, 2])
        kw = dict(pad_id=tok.pad_token_id, eos_id=eos, max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0)
        assert actor.generate(prompts, users, None, min_new_tokens=0, **kw) == [[eos], [eos]]
        out = actor.generate(prompts, users, None, min_new_tokens=3, **kw)
        assert [len(r) for r in out] == [4, 4] and all(r[-1] == eos and eos not in r[:3] for r in out)
    finally:
        hook.remove()
    with pytest.raises(ConfigError, match="ppo.min_new_tokens"):
        _tiny_cfg(tmp_path, "ppo.min_new_tokens=100", "ppo.max_new_tokens=8")


def test_actor_logps_are_those_of_the_sampling_distribution(tmp_path):
    """Re-scoring sampled tokens gives generate's own log-probs (temperature-scaled, EOS ruled out for the first
    min_new_tokens): the ratio PPO optimises is that of the distribution the rollout sampled from."""
    from common.batching import pad
    from user_models import prepend_prefix

    cfg = _tiny_cfg(tmp_path, "ppo.temperature=0.7", "ppo.min_new_tokens=2")
    modules, actor, _, _, tok = build_roles(cfg, 2, CPU)
    with torch.no_grad():
        actor.backbone.user_model.implicit.offsets.weight[1:].normal_(0.0, 1.0)
    modules.eval()
    prompts, users = [[10, 11, 12, 13], [14, 15]], torch.tensor([1, 2])
    lm = actor.backbone.base_lm
    with torch.no_grad():
        ids, mask = pad(prompts, tok.pad_token_id, "left"), pad([[1] * len(p) for p in prompts], 0, "left")
        prefix = actor.backbone.user_model(users, embed_tokens=lm.get_input_embeddings())
        inp = prepend_prefix(prefix.embeds, prefix.mask, lm.get_input_embeddings()(ids), mask, padding_side="left")
        out = lm.generate(inputs_embeds=inp.inputs_embeds, attention_mask=inp.attention_mask, do_sample=True,
                          temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=5, min_new_tokens=2,
                          pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, return_dict_in_generate=True, output_scores=True)
        sampled = torch.log_softmax(torch.stack(out.scores, 1).float(), -1)
        sampled = sampled.gather(-1, out.sequences.unsqueeze(-1)).squeeze(-1)
        batch = collate_sequences(prompts, out.sequences.tolist(), users.tolist(), [[], []], tok.pad_token_id)
        hidden, inputs = actor.hidden(batch)
        logps, _, _ = actor.token_logps(hidden, inputs, out.sequences.shape[1])
    assert torch.allclose(logps, sampled, atol=1e-5)


def test_rollout_pairs_seeded_and_first_ratio_is_one(tmp_path, rm_run, ppo_data):
    from policy.ppo.trainer import PPOTrainer

    cfg = load_config(None, ppo_overrides(tmp_path / "ppo", ppo_data[0], rm_run, **{"ppo.rollout_batch_size": 8}))
    vocab = UserVocab.load(rm_run / "users.json")
    modules, actor, critic, reference, tok = build_roles(cfg, len(vocab), CPU)
    reward = load_reward_role(rm_run, CPU)
    trainer = PPOTrainer(cfg, tmp_path / "ppo", modules, actor, critic, reference, reward, tok, vocab,
                         ["Tell me about tea.", "Tell me about salt."])
    pairs = trainer.sample_pairs(3)
    assert pairs == trainer.sample_pairs(3) and pairs != trainer.sample_pairs(4)
    assert sum(u is None for _, u in pairs) == 2  # round(0.25 * 8) generic samples
    ro = trainer.rollout(0)
    assert ro.logps.shape == ro.mask.shape == ro.advantages.shape == (8, ro.width)
    assert set(ro.user_ids) <= {None, "a", "b"}
    # each sample was scored for the user it was generated for, on the actor's own token ids (the RM shares the
    # tokenizer): decoding the sampled bytes and encoding the text again gives other tokens, and other scores
    prompts = [trainer.prompts[i] for i in ro.prompt_index]
    assert torch.allclose(ro.raw_scores, reward.score_ids(prompts, ro.response_ids, ro.user_ids))
    assert not torch.allclose(ro.raw_scores, reward.score(prompts, ro.responses, ro.user_ids, ro.ended.tolist()))
    swapped = [{"a": "b", "b": "a"}.get(u) for u in ro.user_ids]
    assert not torch.allclose(ro.raw_scores, reward.score_ids(prompts, ro.response_ids, swapped))
    m = ro.mask.bool()
    assert ro.advantages[m].mean().abs() < 1e-5 and (ro.advantages[~m] == 0).all()  # GAE: whitened
    # recomputing on a minibatch reproduces the rollout's log-probs: ratio 1 at the first step
    idx = [5, 1]
    batch = ro.batch(idx, tok.pad_token_id, CPU)
    with torch.no_grad():
        hidden, inputs = actor.hidden(batch)
        logp, _, _ = actor.token_logps(hidden, inputs, ro.width)
    assert torch.allclose(logp, ro.logps[idx], atol=1e-5)


def test_update_with_lora_dropout_compares_the_rollouts_own_policy(tmp_path, rm_run, ppo_data):
    """With model.lora_dropout > 0 the update must still score the policy the rollout sampled (dropout off): with
    no optimizer step taken, every ratio is 1, so nothing is clipped and the approximate KL is 0."""

    cfg = load_config(None, ppo_overrides(tmp_path / "ppo", ppo_data[0], rm_run, **{"ppo.rollout_batch_size": 8,
                                                                                     "model.lora_dropout": 0.5}))
    # LoRA's B starts at 0, which would hide dropout on its input: a trained adapter
    trainer = make_trainer(cfg, rm_run, tmp_path / "ppo", lora_b_std=0.5)
    ro = trainer.rollout(0)
    trainer._optimizer_step = lambda loss: None  # measure the ratios only: the policy stays the rollout's
    stats = trainer.update(ro, 0)
    assert stats["policy/clipfrac"] == 0.0 and abs(stats["policy/approx_kl"]) < 1e-9


# ------------------------------------------------------------------------------------------------ stage


def test_train_ppo_refuses_missing_or_unfinished_rm_run(tmp_path, ppo_data, monkeypatch, capsys):
    import common.run
    from pipelines.train_ppo import main

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before ppo.rm_run was checked")

    monkeypatch.setattr(common.run, "load_causal_lm", no_model)
    args = [f"data.train_path={ppo_data[0]}", f"output_dir={tmp_path / 'out'}", "model.name=tiny-random",
            "report_to=none"]
    assert main(args) == 2
    assert "ppo.rm_run" in capsys.readouterr().err
    unfinished = tmp_path / "rm_unfinished"
    (unfinished / "checkpoint").mkdir(parents=True)
    (unfinished / "config.yaml").write_text("seed: 0\n")
    assert main(args + [f"ppo.rm_run={unfinished}"]) == 2
    err = capsys.readouterr().err
    assert "ppo.rm_run" in err and "not a finished train_rm run" in err
    assert main(args + [f"ppo.rm_run={tmp_path / 'nowhere'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_ppo_end_to_end(tmp_path, rm_run, ppo_data):
    from common.run import load_backbone_from_run, load_head
    from pipelines.train_ppo import run
    from policy.ppo.roles import new_value_head

    out = tmp_path / "ppo"
    cfg = load_config(None, ppo_overrides(out, ppo_data[0], rm_run, **{"train.max_steps": 2}))
    run(cfg)
    for name in ("config.yaml", "users.json", "run.json", "metrics_log.jsonl", "ppo_history.json", "metrics.json",
                 "report.md", "checkpoint/user_model.json", "checkpoint/adapter/adapter_model.safetensors",
                 "checkpoint/value_head.safetensors", "plots/ppo_reward.png"):
        assert (out / name).exists(), name
    assert json.loads((out / "users.json").read_text()) == json.loads((rm_run / "users.json").read_text())
    info = json.loads((out / "run.json").read_text())
    assert info["route"] == "ppo" and Path(info["rm_run"]) == rm_run.resolve()
    history = json.loads((out / "ppo_history.json").read_text())
    assert [h["iteration"] for h in history["iterations"]] == [1, 2]
    for h in history["iterations"]:
        assert set(h["reward"]) == set(h["response_words"]) == set(h["kl_user"]) <= {"<generic>", "a", "b"}
        # per-user sequence KL, so that a drift can be traced to the user it happens to
        assert all(math.isfinite(v) for v in h["kl_user"].values())
        assert sum(h["kl_user"][u] * h["n"][u] for u in h["n"]) / sum(h["n"].values()) == pytest.approx(h["kl"])
        assert all(math.isfinite(v) for v in h["reward"].values())
    logged = [json.loads(line) for line in (out / "metrics_log.jsonl").read_text().splitlines()]
    for key in ("reward/mean", "kl/seq", "policy/entropy", "policy/clipfrac", "loss/value", "length/words",
                "perf/rollout_tokens_per_s", "perf/train_tokens_per_s"):
        assert key in logged[0], key
    assert any(k.startswith("reward/user/") for k in logged[0]) and any(k.startswith("kl/seq/user/") for k in logged[0])
    # the run loads back as a policy (what evaluate does) and its value head as a Linear
    _, backbone, _, vocab, _ = load_backbone_from_run(out, CPU)
    assert len(vocab) == 2 and isinstance(PersonalizedPolicy(backbone), PersonalizedPolicy)
    load_head(out, "value", new_value_head(backbone.hidden_size, torch.float32))


def _final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    ck = run_dir / "checkpoint"
    out = {}
    for f in ("user_model.safetensors", "value_head.safetensors", "adapter/adapter_model.safetensors"):
        out.update({f"{f}:{k}": v for k, v in load_file(str(ck / f)).items()})
    return out


def test_resume_after_checkpoint_is_exact(tmp_path, rm_run, ppo_data, monkeypatch):
    from pipelines.train_ppo import run
    from policy.ppo import trainer as ppo_trainer

    args = {"train.max_steps": 2, "train.save_every": 1}
    run(load_config(None, ppo_overrides(tmp_path / "straight", ppo_data[0], rm_run, **args)))

    original = ppo_trainer.PPOTrainer.update

    def crash_in_second_iteration(self, ro, iteration):
        if iteration == 1:
            raise KeyboardInterrupt("killed")
        return original(self, ro, iteration)

    monkeypatch.setattr(ppo_trainer.PPOTrainer, "update", crash_in_second_iteration)
    cfg = load_config(None, ppo_overrides(tmp_path / "resumed", ppo_data[0], rm_run, **args))
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    assert (tmp_path / "resumed" / "checkpoints" / "step-1" / "COMPLETE").exists()
    assert not (tmp_path / "resumed" / "checkpoint").exists()
    monkeypatch.setattr(ppo_trainer.PPOTrainer, "update", original)
    run(cfg)
    a, b = _final_params(tmp_path / "straight"), _final_params(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = json.loads((tmp_path / "straight" / "ppo_history.json").read_text())["iterations"]
    hb = json.loads((tmp_path / "resumed" / "ppo_history.json").read_text())["iterations"]
    assert [h["reward"] for h in ha] == [h["reward"] for h in hb]
    assert json.loads((tmp_path / "resumed" / "run.json").read_text())["train"]["resumed_from"] == 1


def test_one_iteration_under_deepspeed_zero2_matches_plain_torch(tmp_path, rm_run, ppo_data, monkeypatch):
    pytest.importorskip("deepspeed")
    import importlib

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # `import ... as` would give deepspeed.comm's torch

    from pipelines.train_ppo import run

    # one process needs no shared-memory all-reduce; skip JIT-compiling it (about a minute on a cold cache)
    monkeypatch.setattr(ds_torch, "build_shm_op", lambda: None)
    import socket

    with socket.socket() as sock:  # a free port for the one-process gloo group (other test runs may share the host)
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(sock.getsockname()[1]))
    ds_cfg = REPO / "configs" / "deepspeed" / "zero2.json"
    if not ds_cfg.exists():
        ds_cfg = tmp_path / "zero2.json"
        ds_cfg.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": False},
                                      "zero_allow_untested_optimizer": True, "steps_per_print": 1000000}))
    from policy.ppo import trainer as ppo_trainer

    engines = []
    real_engine = ppo_trainer.deepspeed_engine

    def spy(*args, **kwargs):
        engines.append(real_engine(*args, **kwargs))
        return engines[-1]

    monkeypatch.setattr(ppo_trainer, "deepspeed_engine", spy)
    # SGD: its update is linear in the gradient, so the two layouts' different float summation orders stay at
    # rounding size in the weights. Under Adam an element whose gradient is near zero moves by about lr * sign(g),
    # and the sign of a rounding-size gradient depends on the CPU and the reduction order.
    sgd = {"train.optimizer": "sgd"}
    run(load_config(None, ppo_overrides(tmp_path / "plain", ppo_data[0], rm_run, **sgd)))
    assert not engines
    run(load_config(None, ppo_overrides(tmp_path / "ds", ppo_data[0], rm_run,
                                        **{"train.deepspeed": str(ds_cfg), **sgd})))
    assert len(engines) == 1 and engines[0][0].zero_optimization_stage() == 2
    a, b = _final_params(tmp_path / "plain"), _final_params(tmp_path / "ds")
    moved = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)  # LoRA B starts at exactly 0
    assert moved > 1e-5  # the steps are large enough for a wrong update to show
    for k in a:
        # gradients are clipped to norm <= 1: each element's rounding difference is a few float32 ulps of a
        # gradient <= 1, times lr, per step (4 steps here): far below 1e-6
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (k, float((a[k] - b[k]).abs().max()))
    la = json.loads((tmp_path / "plain" / "metrics_log.jsonl").read_text().splitlines()[0])
    lb = json.loads((tmp_path / "ds" / "metrics_log.jsonl").read_text().splitlines()[0])
    assert lb["loss/total"] == pytest.approx(la["loss/total"], abs=1e-6)


def test_per_user_reward_baseline_removes_each_users_shift():
    """Two users whose RM scores sit at different levels: after per-user centring each user's better response is
    positive and the worse negative; with one global baseline every response of the high user looks good."""
    from policy.ppo.core import PerUserRewardNormalizer

    raw = torch.tensor([4.0, 2.0, -7.0, 0.0])  # user a (short 4, long 2), user b (short -7, long 0)
    users = ["a", "a", "b", "b"]
    s = PerUserRewardNormalizer()(raw, users)
    assert s[0] > 0 > s[1] and s[3] > 0 > s[2]
    assert abs(float(s[:2].sum())) < 1e-6 and abs(float(s[2:].sum())) < 1e-6
    assert torch.allclose(s.abs(), torch.ones(4))  # each user at its own scale: margins 2 and 7 weigh the same
    glob = (raw - raw.mean()) / raw.std(unbiased=False)
    assert glob[0] > 0 and glob[1] > 0  # the global baseline rewards user a's worse response too


def test_per_user_reward_baseline_state_round_trip():
    from policy.ppo.core import PerUserRewardNormalizer

    a = PerUserRewardNormalizer()
    a(torch.tensor([1.0, 3.0, 5.0]), ["x", "x", "y"])
    b = PerUserRewardNormalizer()
    b.load_state_dict(a.state_dict())
    nxt = torch.tensor([2.0, 6.0]), ["x", "y"]
    assert torch.equal(a(*nxt), b(*nxt))


def test_leave_one_out_centre_is_rloo():
    from policy.ppo.core import leave_one_out_centre

    raw = torch.tensor([1.0, 3.0, 5.0, 10.0, 10.0, 7.0])
    out = leave_one_out_centre(raw, [0, 0, 0, 1, 1, 2])
    assert torch.allclose(out[:3], torch.tensor([1 - 4.0, 3 - 3.0, 5 - 2.0]))
    assert torch.allclose(out[3:], torch.tensor([0.0, 0.0, 0.0]))  # equal pair, and a lone sample: no contrast


def test_samples_per_prompt_repeats_each_pair(tmp_path):
    """Rollout pairs come in groups of k identical (prompt, user) pairs, a pure function of (seed, iteration)."""
    from types import SimpleNamespace

    from common.config import load_config
    from policy.ppo.trainer import PPOTrainer

    cfg = load_config(None, ["ppo.rollout_batch_size=12", "ppo.samples_per_prompt=3", "ppo.minibatch_size=4",
                             "ppo.reward_baseline=group"])
    fake = SimpleNamespace(ppo=cfg.ppo, cfg=cfg, prompts=[f"p{i}" for i in range(20)], users=["a", "b", "c"])
    fake._seed = lambda it, stream: PPOTrainer._seed(fake, it, stream)
    pairs = PPOTrainer.sample_pairs(fake, 0)
    assert len(pairs) == 12
    for gi in range(4):
        assert len(set(pairs[3 * gi:3 * gi + 3])) == 1
    assert pairs == PPOTrainer.sample_pairs(fake, 0)


def test_rloo_advantages_hand_computed():
    from policy.ppo.core import rloo_advantages

    score = torch.tensor([1.0, 3.0, 2.0, 2.0])
    kl = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    adv = rloo_advantages(score, kl, mask, 0.5, [0, 0, 1, 1])
    # R = score - 0.5 * sum(kl * mask) = [0.5, 2.5, 2.0, -1.0]; each minus its sibling
    expected = torch.tensor([0.5 - 2.5, 2.5 - 0.5, 2.0 + 1.0, -1.0 - 2.0])
    assert torch.allclose(adv, expected.unsqueeze(1) * mask)


def test_train_ppo_rloo_leaves_the_critic_alone(tmp_path, rm_run, ppo_data):
    """The critic-free estimator trains the actor and never the value head (zero-initialised, so it stays 0)."""
    from common.run import load_backbone_from_run, load_head
    from pipelines.train_ppo import run
    from policy.ppo.roles import new_value_head

    out = tmp_path / "ppo_rloo"
    cfg = load_config(None, ppo_overrides(out, ppo_data[0], rm_run, **{
        "train.max_steps": 1, "ppo.advantage_estimator": "rloo", "ppo.samples_per_prompt": 2}))
    run(cfg)
    _, backbone, _, _, _ = load_backbone_from_run(out, CPU)
    head = load_head(out, "value", new_value_head(backbone.hidden_size, torch.float32))
    assert float(head.weight.abs().sum()) == 0.0 and float(head.bias.abs().sum()) == 0.0
    assert float(backbone.user_model.implicit.offsets.weight.abs().sum()) > 0  # the actor did learn
    with pytest.raises(ConfigError, match="ppo.advantage_estimator"):
        load_config(None, ["ppo.advantage_estimator=rloo"])


def test_cycled_user_sampling_visits_every_user_equally():
    """`ppo.user_sampling=cycle`: over a whole pass each seen user gets the same number of samples (a group of three
    among ten is never skipped by chance), still a pure function of (seed, iteration)."""
    from collections import Counter
    from types import SimpleNamespace

    from policy.ppo.trainer import PPOTrainer

    cfg = load_config(None, ["ppo.rollout_batch_size=12", "ppo.samples_per_prompt=2", "ppo.minibatch_size=4",
                             "ppo.generic_user_share=0.0", "ppo.user_sampling=cycle"])
    users = [f"u{i}" for i in range(10)]
    fake = SimpleNamespace(ppo=cfg.ppo, cfg=cfg, prompts=[f"p{i}" for i in range(20)], users=users)
    fake._seed = lambda it, stream: PPOTrainer._seed(fake, it, stream)
    fake.cycled_users = lambda start, n: PPOTrainer.cycled_users(fake, start, n)
    drawn = [u for it in range(5) for (_, u) in PPOTrainer.sample_pairs(fake, it)[::2]]  # 6 groups x 5 = 3 passes
    assert Counter(drawn) == {u: 3 for u in users}
    assert drawn[:10] != drawn[10:20]  # each pass in its own order
    assert PPOTrainer.sample_pairs(fake, 3) == PPOTrainer.sample_pairs(fake, 3)


def test_group_balanced_user_sampling_gives_each_group_the_same_share():
    """`ppo.user_sampling=group_balanced`: 3 minority users among 10 get half of the samples (cycle would give them
    3 in 10), each group's users equally often, a pure function of (seed, iteration)."""
    from collections import Counter
    from types import SimpleNamespace

    from policy.ppo.trainer import PPOTrainer

    cfg = load_config(None, ["ppo.rollout_batch_size=12", "ppo.samples_per_prompt=2", "ppo.minibatch_size=4",
                             "ppo.generic_user_share=0.0", "ppo.user_sampling=group_balanced"])
    users = [f"u{i}" for i in range(10)]
    groups = {u: ("minority" if i < 3 else "majority") for i, u in enumerate(users)}
    fake = SimpleNamespace(ppo=cfg.ppo, cfg=cfg, prompts=[f"p{i}" for i in range(20)], users=users,
                           user_groups=groups)
    fake._seed = lambda it, stream: PPOTrainer._seed(fake, it, stream)
    fake.cycled_users = lambda *a, **k: PPOTrainer.cycled_users(fake, *a, **k)
    fake._user_group_members = lambda: PPOTrainer._user_group_members(fake)
    fake.group_balanced_users = lambda start, n: PPOTrainer.group_balanced_users(fake, start, n)
    drawn = [u for it in range(7) for (_, u) in PPOTrainer.sample_pairs(fake, it)[::2]]  # 42 groups
    count = Counter(drawn)
    assert sum(count[u] for u in users[:3]) == 21 == sum(count[u] for u in users[3:])
    assert {count[u] for u in users[:3]} == {7} and {count[u] for u in users[3:]} == {3}
    assert PPOTrainer.sample_pairs(fake, 3) == PPOTrainer.sample_pairs(fake, 3)
    fake.user_groups = {}  # no groups in the data: one group, every user equally often (as cycle)
    assert Counter(u for it in range(5) for (_, u) in PPOTrainer.sample_pairs(fake, it)[::2]) == {u: 3 for u in users}
    cfg.ppo.user_sampling = "cycle"  # the cycle walk is unchanged by the group walk beside it
    assert Counter(u for it in range(5) for (_, u) in PPOTrainer.sample_pairs(fake, it)[::2]) == {u: 3 for u in users}


def test_init_user_model_from_rm_copies_the_rms_users(tmp_path, rm_run, ppo_data):
    """`ppo.init_user_model=rm`: the actor's per-user rows start as the RM's times the scale (row for row: same
    vocabulary), e_0 keeps the actor's own init; a user model of another shape is refused naming the key."""
    from common.run import load_backbone_from_run
    from pipelines.train_ppo import run
    from policy.ppo.roles import build_roles, init_user_model_from_rm, load_reward_role

    reward = load_reward_role(rm_run, CPU)
    rm_offsets = reward.model.backbone.user_model.implicit.offsets.weight
    n_users = reward.model.backbone.user_model.n_users
    cfg = load_config(None, ppo_overrides(tmp_path / "x", ppo_data[0], rm_run, **{"ppo.init_user_model": "rm"}))
    modules, *_ = build_roles(cfg, n_users, CPU)
    generic = modules.actor.user_model.implicit.generic.detach().clone()
    init_user_model_from_rm(modules.actor.user_model, reward, 0.5)
    assert torch.equal(modules.actor.user_model.implicit.offsets.weight, 0.5 * rm_offsets)
    assert torch.equal(modules.actor.user_model.implicit.generic, generic)
    other = load_config(None, ppo_overrides(tmp_path / "y", ppo_data[0], rm_run, **{"user_model.n_tokens": 3}))
    wrong, *_ = build_roles(other, n_users, CPU)
    with pytest.raises(ConfigError, match="ppo.init_user_model"):
        init_user_model_from_rm(wrong.actor.user_model, reward)
    # wired into train_ppo: with (almost) no user-model learning the trained actor's rows are the scaled RM rows
    out = tmp_path / "ppo_init"
    run(load_config(None, ppo_overrides(out, ppo_data[0], rm_run, **{
        "ppo.init_user_model": "rm", "ppo.init_user_model_scale": 0.3, "user_model.lr": 1e-12,
        "user_model.shared_lr": 0.0})))
    _, backbone, _, _, _ = load_backbone_from_run(out, CPU)
    got = backbone.user_model.implicit.offsets.weight
    assert torch.allclose(got, 0.3 * rm_offsets, atol=1e-9) and got.abs().sum() > 0


def test_rm_clusters_seeds_each_users_cluster_weights_from_the_rms_rows(tmp_path, ppo_data):
    """`ppo.init_user_model=rm_clusters`: users whose RM rows point the same way share a centre (whatever their
    rows' lengths), the others get the other one; the generic user stays at the even mixture; the centres are
    untouched. Refused for a non-cluster actor (naming user_model.kind) and for an RM without per-user rows."""
    from pipelines.train_ppo import run
    from policy.ppo.roles import seed_clusters_from_rm

    rm = make_rm_run(tmp_path / "rm4", users=("a", "b", "c", "d"))
    reward = load_reward_role(rm, CPU)
    offsets = reward.model.backbone.user_model.implicit.offsets.weight
    v = torch.randn(offsets.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a and d alike, b and c alike (the opposite way), at different lengths
        offsets[1:] = torch.stack([v, -2 * v, -0.5 * v, 3 * v]) + 0.1 * torch.randn(4, offsets.shape[1])
    cfg = load_config(None, ppo_overrides(tmp_path / "x", ppo_data[0], rm, **{
        "user_model.kind": "cluster", "user_model.n_clusters": 2, "ppo.init_user_model": "rm_clusters"}))
    modules, *_ = build_roles(cfg, 4, CPU)
    um = modules.actor.user_model
    centres = um.implicit.centres.detach().clone()
    assert seed_clusters_from_rm(um, reward, 2.5) == [0, 1, 1, 0]
    assert torch.equal(um.implicit.logits.weight.detach(), torch.tensor(
        [[0.0, 0.0], [2.5, 0.0], [0.0, 2.5], [0.0, 2.5], [2.5, 0.0]]))
    assert torch.equal(um.implicit.centres, centres)
    with pytest.raises(ConfigError, match="user_model.kind"):
        load_config(None, ppo_overrides(tmp_path / "y", ppo_data[0], rm, **{"ppo.init_user_model": "rm_clusters"}))
    with torch.no_grad():
        offsets.zero_()  # every user is the generic one: nothing to group
    with pytest.raises(ConfigError, match="nothing to group"):
        seed_clusters_from_rm(um, reward, 2.5)
    # wired into train_ppo: with (almost) no user-model learning the trained weights are the seeded ones
    out = tmp_path / "ppo_rmk"
    run(load_config(None, ppo_overrides(out, ppo_data[0], rm, **{
        "user_model.kind": "cluster", "user_model.n_clusters": 2, "ppo.init_user_model": "rm_clusters",
        "ppo.init_cluster_logit": 4.0, "user_model.lr": 1e-12, "user_model.shared_lr": 0.0})))
    logits = load_file(str(out / "checkpoint" / "user_model.safetensors"))["implicit.logits.weight"]
    assert logits[0].abs().max() < 1e-6 and torch.allclose(logits[1:].max(dim=1).values, torch.full((4,), 4.0))
    assert torch.allclose(logits[1:].min(dim=1).values, torch.zeros(4), atol=1e-6)


# ------------------------------------------------------------------------------------------------ issue 19: the RM route


def test_reward_keeps_the_eos_of_a_finished_answer_however_long(rm_run):
    """An answer longer than the RM's training window is scored whole, EOS included (issue 19, cause 3: a
    re-encoding cut at the window dropped the EOS of a finished answer and scored it as unfinished)."""
    reward = load_reward_role(rm_run, CPU)
    long_text = "Tea matters a lot, " * 20  # far more tokens than data.max_response_length
    ids = reward._response(long_text, ended=True)
    assert len(ids) > reward.encoder.max_response and ids[-1] == reward.tokenizer.eos_token_id
    assert reward._response(long_text, ended=False)[-1] != reward.tokenizer.eos_token_id
    r_end = reward.score(["Tell me about tea."], [long_text], ["a"], ended=[True])
    assert torch.allclose(r_end, reward.score_ids(["Tell me about tea."], [ids], ["a"]))
    assert not torch.allclose(r_end, reward.score(["Tell me about tea."], [long_text], ["a"], ended=[False]))


def test_rloo_rollout_uses_one_normalisation(tmp_path, rm_run, ppo_data):
    """RLOO by default: the RM's raw score, minus the leave-one-out mean of its (prompt, user) siblings, with the KL
    inside the sequence reward; no per-user scaling before it and no token whitening after it (issue 19, cause 4)."""
    from policy.ppo.core import rloo_advantages

    cfg = load_config(None, ppo_overrides(tmp_path / "ppo", ppo_data[0], rm_run, **{
        "ppo.rollout_batch_size": 8, "ppo.minibatch_size": 4, "ppo.advantage_estimator": "rloo",
        "ppo.samples_per_prompt": 4, "ppo.kl_coef": 0.1}))
    # a policy away from the reference, so that the KL term is not zero
    trainer = make_trainer(cfg, rm_run, tmp_path / "ppo", lora_b_std=0.05)
    ro = trainer.rollout(0)
    assert torch.equal(ro.scores, ro.raw_scores.clamp(-cfg.ppo.reward_clip, cfg.ppo.reward_clip))
    expected = rloo_advantages(ro.raw_scores, ro.kl, ro.mask, 0.1, [i // 4 for i in range(8)])
    assert torch.equal(ro.advantages, expected)
    seq = ro.advantages[:, 0]
    assert torch.allclose(seq.view(2, 4).sum(1), torch.zeros(2), atol=1e-5)  # each group sums to zero
    assert float(ro.kl.abs().sum()) > 0


@pytest.mark.parametrize("start", [{}, {"user_model.kind": "cluster", "user_model.n_clusters": 2,
                                       "ppo.init_user_model": "rm_clusters"}], ids=["fresh", "rm_clusters"])
def test_the_actor_starts_exactly_at_pi_sft(tmp_path, rm_run, ppo_data, start):
    """From a train_sft run the first rollout carries no KL at all, for every user (issue 19, cause 5: the RM's
    rows and a random e_0 made the first rollouts differ from pi_SFT before any update); also with cluster weights
    seeded from the RM (the centres all start at pi_SFT's prompt)."""
    from pipelines.train_sft import run as run_sft

    train = ppo_data[0]
    run_sft(load_config(None, [f"output_dir={tmp_path / 'sft'}", "model.name=tiny-random", "report_to=none",
                               f"data.train_path={train}", "train.max_steps=3", "train.lr=0.03",
                               "user_model.kind=uniform", "user_model.n_tokens=4"]))
    cfg = load_config(None, ppo_overrides(tmp_path / "ppo", train, rm_run, **{
        "model.sft_run": str(tmp_path / "sft"), "user_model.n_tokens": 4, "ppo.rollout_batch_size": 8,
        "ppo.minibatch_size": 4, "ppo.advantage_estimator": "rloo", "ppo.samples_per_prompt": 2,
        "ppo.generic_user_share": 0.25, **start}))
    trainer = make_trainer(cfg, rm_run, tmp_path / "ppo")
    if start:
        from policy.ppo.roles import seed_clusters_from_rm

        seed_clusters_from_rm(trainer.actor.backbone.user_model, trainer.reward, 3.0)
        assert trainer.actor.backbone.user_model.implicit.logits.weight[1:].max() == 3.0
    ro = trainer.rollout(0)
    assert {u for u in ro.user_ids} >= {None, "a"} or {u for u in ro.user_ids} >= {None, "b"}
    assert torch.equal(ro.logps, ro.ref_logps) and float(ro.kl.abs().max()) == 0.0


def test_rm_gated_user_rows_start_at_zero_learn_one_number_per_user_and_fold(tmp_path, rm_run, ppo_data):
    """ppo.init_user_model=rm_gated: o_i = g_i * (the RM's row of user i), g_i learned from 0, the free offsets
    frozen; at g = 0 the actor is its start; saved runs hold the folded offsets (a plain individual model)."""
    from policy.ppo.roles import PPOModules, gate_user_model_on_rm, new_value_head
    from common.trainer import make_optimizer

    cfg = load_config(None, ppo_overrides(tmp_path / "ppo", ppo_data[0], rm_run, **{
        "ppo.init_user_model": "rm_gated", "user_model.n_tokens": 4}))
    vocab = UserVocab.load(rm_run / "users.json")
    modules, actor, critic, reference, tok = build_roles(cfg, len(vocab), CPU)
    reward = load_reward_role(rm_run, CPU)
    um = modules.actor.user_model
    users = torch.tensor([0, 1, 2])
    before = um(users).embeds.detach().clone()
    gate_user_model_on_rm(um, reward)
    assert torch.equal(um(users).embeds, before)  # g = 0: nothing moved
    rm_rows = reward.model.backbone.user_model.implicit.offsets.weight
    groups = modules.param_groups(cfg)
    tables = [p for g in groups if g.get("lazy") for p in g["params"]]
    assert tables == [um.implicit.gates.weight]  # one number per user is what learns (the offsets are frozen)
    opt = make_optimizer(groups, cfg)
    (um(torch.tensor([1])).embeds * torch.randn(1, 4, um.implicit.dim)).sum().backward()
    opt.step()
    g = um.implicit.gates.weight.detach()
    assert g[1].abs().item() > 0 and g[2].item() == 0 and g[0].item() == 0  # only the batch's user moved
    moved = um(users).embeds.detach().clone()
    expected = um.implicit.generic.detach() + (g[1] * rm_rows[1]).view(4, -1)  # e_0 (shared) moved too
    assert torch.allclose(moved[1], expected, atol=1e-6)
    um.implicit.fold_gates()
    assert um.implicit.gates is None and um.implicit.offsets.weight.requires_grad
    assert torch.allclose(um(users).embeds, moved, atol=1e-6)
    with pytest.raises(ConfigError, match="rm_gated"):
        cluster = load_config(None, ppo_overrides(tmp_path / "c", ppo_data[0], rm_run, **{
            "user_model.kind": "cluster", "user_model.n_tokens": 4}))
        gate_user_model_on_rm(build_roles(cluster, len(vocab), CPU)[0].actor.user_model, reward)


def test_clipped_policy_loss_sequence_aggregation_hand_computed():
    from policy.ppo.core import clipped_policy_loss

    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    adv = torch.tensor([[3.0, 3.0, 3.0], [-1.0, -1.0, -1.0]]) * mask
    tok, _, _ = clipped_policy_loss(logp, torch.zeros(2, 3), adv, mask, 0.2, "token")
    seq, _, _ = clipped_policy_loss(logp, torch.zeros(2, 3), adv, mask, 0.2, "sequence")
    assert tok.item() == pytest.approx((-3 + 1 + 1 + 1) / 4)  # every token weighs 1/4
    assert seq.item() == pytest.approx((-3 + 1) / 2)  # every sample weighs 1/2: the one-token answer as much
    seq.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.5, 0, 0], [1 / 6, 1 / 6, 1 / 6]]))
    with pytest.raises(ValueError, match="aggregation"):
        clipped_policy_loss(logp, torch.zeros(2, 3), adv, mask, 0.2, "sum")


def test_repeated_ngram_share_hand_computed():
    from policy.ppo.core import repeated_ngram_share

    # 3-grams of 1 2 3 1 2 3 1: (123) (231) (312) (123) (231) -> the last two repeat earlier ones: 2 / 5
    assert repeated_ngram_share([1, 2, 3, 1, 2, 3, 1], 3) == pytest.approx(2 / 5)
    assert repeated_ngram_share([1, 2, 3, 4, 5, 6], 3) == 0.0
    assert repeated_ngram_share([7] * 10, 1) == pytest.approx(9 / 10)
    assert repeated_ngram_share([7, 7, 7, 9], 2) == pytest.approx(1 / 3)
    # the EOS is not text: a finished answer counts as its words alone
    assert repeated_ngram_share([1, 2, 1, 2, 0], 2, eos_id=0) == repeated_ngram_share([1, 2, 1, 2], 2) == 1 / 3
    assert repeated_ngram_share([], 3) == repeated_ngram_share([1, 2], 3) == repeated_ngram_share([0], 1, 0) == 0.0


def test_overlong_penalty_hand_computed():
    """DAPO's soft ramp: nothing up to max_len - buffer tokens, then linear up to coef at max_len; off at buffer 0."""
    from policy.ppo.core import overlong_penalty

    got = overlong_penalty(torch.tensor([0, 72, 73, 84, 96]), max_len=96, buffer=24, coef=2.0)
    assert torch.allclose(got, torch.tensor([0.0, 0.0, 2 / 24, 1.0, 2.0]))
    assert torch.equal(overlong_penalty(torch.tensor([5, 96]), 96, 0, 2.0), torch.zeros(2))
    assert torch.equal(overlong_penalty(torch.tensor([5, 96]), 96, 24, 0.0), torch.zeros(2))


def test_rollout_scores_pay_the_missing_eos_repeated_ngram_and_overlong_penalties(tmp_path, rm_run, ppo_data):
    """score = RM score (clipped) - missing_eos_penalty * [no EOS] - repeated_ngram_penalty * repeated share -
    the overlong ramp on the response's length, each sample on its own tokens."""
    from policy.ppo.core import overlong_penalty, repeated_ngram_share

    over = {"ppo.rollout_batch_size": 8, "ppo.minibatch_size": 4, "ppo.advantage_estimator": "rloo",
            "ppo.samples_per_prompt": 4, "ppo.max_new_tokens": 40, "ppo.missing_eos_penalty": 0.5,
            "ppo.repeated_ngram_size": 1}
    cfg = load_config(None, ppo_overrides(tmp_path / "a", ppo_data[0], rm_run, **over))
    trainer = make_trainer(cfg, rm_run, tmp_path / "a")
    plain = trainer.rollout(0)
    penalised = make_trainer(load_config(None, ppo_overrides(tmp_path / "b", ppo_data[0], rm_run, **over,
                                                             **{"ppo.repeated_ngram_penalty": 3.0,
                                                                "ppo.overlong_buffer": 30,
                                                                "ppo.overlong_penalty": 1.5})),
                             rm_run, tmp_path / "b").rollout(0)
    assert penalised.response_ids == plain.response_ids  # the penalty changes the reward, not the sampling
    shares = torch.tensor([repeated_ngram_share(r, 1, trainer.eos_id) for r in plain.response_ids])
    assert torch.equal(penalised.repeated, plain.repeated) and torch.allclose(plain.repeated, shares)
    # a random tiny model repeats tokens and runs past 40 tokens: the test sees both penalties at work
    assert float(shares.max()) > 0 and not bool(plain.ended.all())
    clipped = plain.raw_scores.clamp(-cfg.ppo.reward_clip, cfg.ppo.reward_clip)
    assert torch.allclose(plain.scores, clipped - 0.5 * (~plain.ended).float())
    lengths = torch.tensor([len(r) for r in plain.response_ids])
    ramp = overlong_penalty(lengths, 40, 30, 1.5)
    assert float(ramp.max()) > 0 and float(ramp.min()) < 1.5  # some answers on the ramp, not all at its top
    assert torch.allclose(penalised.scores, plain.scores - 3.0 * shares - ramp)


def test_length_sorted_batches_group_rows_of_a_length():
    from common.batching import length_sorted_batches

    assert length_sorted_batches([5, 1, 9, 1, 3], 2) == [[1, 3], [4, 0], [2]]
    assert sorted(i for b in length_sorted_batches([4, 2, 7, 7, 1, 3, 2], 3) for i in b) == list(range(7))
    assert length_sorted_batches([], 4) == []


def test_preference_reward_hand_computed():
    from policy.ppo.core import preference_reward

    got = preference_reward(torch.tensor([2.0, -1.0, 0.5, 30.0]), torch.tensor([1.0, 1.0, 0.5, 0.0]))
    expected = torch.tensor([1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(2.0)), 0.5, 1.0])
    assert torch.allclose(got, expected, atol=1e-6)


def test_reward_reference_scores_each_sample_against_pi_sfts_greedy_answer(tmp_path, rm_run, ppo_data):
    """ppo.reward_reference=sft_greedy: score = sigmoid(r(x, y, u) - r(x, y_SFT, u)), y_SFT the reference policy's
    greedy answer to x, decoded once per prompt and scored once per (prompt, user); the sampled responses and the
    logged raw RM scores are those of the plain run; a resumed trainer gets the same references back."""
    over = {"ppo.rollout_batch_size": 16, "ppo.minibatch_size": 4, "ppo.advantage_estimator": "rloo",
            "ppo.samples_per_prompt": 4, "ppo.max_new_tokens": 8, "train.max_steps": 3}
    plain = make_trainer(load_config(None, ppo_overrides(tmp_path / "a", ppo_data[0], rm_run, **over)),
                         rm_run, tmp_path / "a").rollout(0)
    cfg = load_config(None, ppo_overrides(tmp_path / "b", ppo_data[0], rm_run, **over,
                                          **{"ppo.reward_reference": "sft_greedy"}))
    trainer = make_trainer(cfg, rm_run, tmp_path / "b")
    calls = []
    generate = trainer.actor.policy.generate

    def spy(prompts, *args, **kwargs):
        if kwargs.get("reference"):
            calls.append([tuple(p) for p in prompts])
        return generate(prompts, *args, **kwargs)

    trainer.actor.policy.generate = spy
    ro = trainer.rollout(0)
    assert ro.response_ids == plain.response_ids and torch.equal(ro.raw_scores, plain.raw_scores)
    drawn = sorted(set(ro.prompt_index))
    assert len(calls) == 1 and calls[0] == [tuple(trainer.prompt_ids[i]) for i in drawn]
    greedy = generate([trainer.prompt_ids[i] for i in drawn], torch.zeros(len(drawn), dtype=torch.long), None,
                      pad_id=trainer.pad_id, reference=True, do_sample=False, max_new_tokens=8,
                      eos_token_id=trainer.eos_id)
    assert [trainer.reference_answers[i] for i in drawn] == greedy
    for i, u, ref in zip(ro.prompt_index, ro.user_ids, ro.reference_scores.tolist()):
        ids = trainer.reference_answers[i]
        alone = trainer.reward.score_ids([trainer.prompts[i]], [ids], [u])
        assert abs(float(alone) - ref) < 1e-4
    expected = torch.sigmoid(ro.raw_scores - ro.reference_scores)
    assert torch.allclose(ro.scores, expected, atol=1e-6)
    assert float(ro.scores.min()) > 0 and float(ro.scores.max()) < 1
    # prompts already drawn are not decoded again
    known = set(trainer.reference_answers)
    trainer.rollout(1)
    assert all(p not in [tuple(trainer.prompt_ids[i]) for i in known] for call in calls[1:] for p in call)

    trainer.history.append({"iteration": 1})
    trainer.save(1)
    resumed = make_trainer(cfg, rm_run, tmp_path / "b")
    assert resumed.maybe_resume() == 1
    assert resumed.reference_answers == trainer.reference_answers
    assert resumed.reference_rm_scores == trainer.reference_rm_scores


def test_greedy_in_group_makes_each_groups_first_sample_the_actors_greedy_answer(tmp_path, rm_run, ppo_data):
    """ppo.greedy_in_group: sample 0 of every (prompt, user) group is the actor's greedy answer for that user (what
    a separate greedy decode gives), the others are sampled; a group of fewer than 3 is refused by the config."""
    over = {"ppo.rollout_batch_size": 12, "ppo.minibatch_size": 4, "ppo.advantage_estimator": "rloo",
            "ppo.samples_per_prompt": 3, "ppo.max_new_tokens": 8, "ppo.greedy_in_group": "true"}
    cfg = load_config(None, ppo_overrides(tmp_path / "a", ppo_data[0], rm_run, **over))
    trainer = make_trainer(cfg, rm_run, tmp_path / "a", lora_b_std=0.05)
    pairs = trainer.sample_pairs(0)
    # the whole batch decoded greedily: the same rows, padding and batch as the rollout's
    greedy = trainer.actor.generate([trainer.prompt_ids[i] for i, _ in pairs],
                                    torch.tensor([trainer.vocab.index(u) for _, u in pairs]),
                                    [trainer._text_ids(u) for _, u in pairs], trainer.pad_id, trainer.eos_id, 8,
                                    1.0, 0, 1.0, greedy_rows=[True] * len(pairs))
    ro = trainer.rollout(0)
    assert ro.response_ids[::3] == greedy[::3]
    sampled = [r for j, r in enumerate(ro.response_ids) if j % 3]
    # a random tiny model's samples are not its greedy answers (each sampled answer differs from its group's)
    assert sum(s != ro.response_ids[j // 2 * 3] for j, s in enumerate(sampled)) >= len(sampled) // 2
    with pytest.raises(ConfigError, match="ppo.greedy_in_group"):
        load_config(None, ppo_overrides(tmp_path / "b", ppo_data[0], rm_run,
                                        **{**over, "ppo.samples_per_prompt": 2, "ppo.rollout_batch_size": 8}))
