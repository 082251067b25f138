"""`policy.decoding`: batched decoding in which finished rows leave the batch, against transformers' generate."""

import pytest
import torch

import policy.model as policy_model
from common.config import load_config
from common.run import build_backbone
from policy.decoding import Decoding, plain_decoding
from policy.model import PersonalizedPolicy

PROMPTS = [[10, 11, 12, 13], [14, 15], [16, 17, 18, 19, 20, 21], [22, 23, 24]]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = load_config(None, ["user_model.kind=individual", "model.name=tiny-random"])
    backbone, tok = build_backbone(cfg, 3, torch.device("cpu"))
    with torch.no_grad():
        backbone.user_model.implicit.offsets.weight[1:].normal_(0.0, 1.0)  # users that decode differently
    return PersonalizedPolicy(backbone).eval(), tok


def _with_transformers(policy, monkeypatch, *args, **kw):
    monkeypatch.setattr(policy_model, "plain_decoding", lambda *a: None)
    try:
        return policy.generate(*args, **kw)
    finally:
        monkeypatch.undo()


def test_plain_decoding_reads_generate_kwargs():
    assert plain_decoding(dict(max_new_tokens=5, do_sample=False), 2) == Decoding(5, (2,))
    assert plain_decoding(dict(max_new_tokens=5, do_sample=True, temperature=0.7, top_k=0, top_p=1.0,
                               min_new_tokens=2, eos_token_id=[3, 4], repetition_penalty=1.0),
                          2) == Decoding(5, (3, 4), 2, 0.7)
    assert plain_decoding(dict(max_new_tokens=5, do_sample=True), 2).temperature == 1.0
    assert plain_decoding(dict(max_new_tokens=5, do_sample=True, temperature=0.0), 2).temperature == 0.0  # refused later
    for more in (dict(top_k=50), dict(top_p=0.9), dict(repetition_penalty=1.2), dict(num_beams=2),
                 dict(output_scores=True)):
        assert plain_decoding(dict(max_new_tokens=5, do_sample=True, **more), 2) is None


def test_greedy_equals_generate_while_rows_finish_at_different_steps(tiny, monkeypatch):
    policy, tok = tiny
    users = torch.tensor([1, 2, 0, 1])
    kw = dict(pad_id=tok.pad_token_id, max_new_tokens=8, do_sample=False)
    free = _with_transformers(policy, monkeypatch, PROMPTS, users, eos_token_id=-1, **kw)
    # an "EOS" that row 0 writes early and some other row not before its end: rows then finish at different steps
    eos = next(t for t in free[0][1:4] if any(t not in r[:6] for r in free[1:]))
    ours = policy.generate(PROMPTS, users, eos_token_id=eos, **kw)
    theirs = _with_transformers(policy, monkeypatch, PROMPTS, users, eos_token_id=eos, **kw)
    assert ours == theirs
    lengths = sorted(len(r) for r in ours)
    assert lengths[0] < 4 and lengths[-1] > lengths[0]
    assert all(r[-1] == eos or len(r) == 8 for r in ours)


def test_sampling_is_seeded_masks_eos_and_is_greedy_when_cold(tiny):
    policy, tok = tiny
    users = torch.tensor([1, 2, 0, 1])
    kw = dict(pad_id=tok.pad_token_id, max_new_tokens=6, eos_token_id=tok.eos_token_id)
    greedy = policy.generate(PROMPTS, users, do_sample=False, **kw)
    torch.manual_seed(0)
    cold = policy.generate(PROMPTS, users, do_sample=True, temperature=1e-4, **kw)
    torch.manual_seed(0)
    hot = policy.generate(PROMPTS, users, do_sample=True, temperature=1.0, **kw)
    torch.manual_seed(0)
    assert cold == greedy and hot != greedy
    assert hot == policy.generate(PROMPTS, users, do_sample=True, temperature=1.0, **kw)
    # min_new_tokens: a token the model writes first is ruled out like EOS for the first 3 tokens
    first = greedy[0][0]
    out = policy.generate(PROMPTS, users, do_sample=False, min_new_tokens=3,
                          **dict(kw, eos_token_id=first))
    assert all(first not in r[:3] for r in out)


def test_greedy_rows_in_a_sampling_batch_are_the_greedy_answers(tiny):
    """`greedy_rows`: those rows of a sampling batch are what greedy decoding gives them; the others are sampled."""
    policy, tok = tiny
    users = torch.tensor([1, 2, 0, 1])
    kw = dict(pad_id=tok.pad_token_id, max_new_tokens=8, eos_token_id=-1)
    greedy = policy.generate(PROMPTS, users, do_sample=False, **kw)
    torch.manual_seed(3)
    mixed = policy.generate(PROMPTS, users, do_sample=True, temperature=1.0, greedy_rows=[True, False, True, False],
                            **kw)
    assert mixed[0] == greedy[0] and mixed[2] == greedy[2]
    assert mixed[1] != greedy[1] or mixed[3] != greedy[3]  # a random tiny model at temperature 1 is not greedy
    with pytest.raises(ValueError, match="greedy_rows"):
        policy.generate(PROMPTS, users, do_sample=True, top_k=5, greedy_rows=[True, False, False, False], **kw)
