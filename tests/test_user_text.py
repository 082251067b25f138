"""Explicit user text end to end (seed section 4.3): seen users with text, unseen users with text (generic implicit
embedding + their text), unseen users without text, reported separately by evaluate."""

import torch

from common.batching import PairEncoder
from common.config import load_config
from common.models import build_tiny_tokenizer
from preference_data import UserVocab
from preference_data.records import PreferenceRecord
from tests.conftest import tiny_overrides, toy_rows, write_jsonl

SHORT_TEXT, LONG_TEXT = "I like short answers.", "I like long detailed answers."


def _with_text(rows):
    return [{**r, "user_text": SHORT_TEXT if r["group"] == "minority" else LONG_TEXT} for r in rows]


def test_text_tokens_reach_the_prefix():
    tok = build_tiny_tokenizer()
    enc = PairEncoder(tok, 64, 32, max_user_text_length=8, use_text=True)
    pair = enc.encode(PreferenceRecord("p", "a", "b", "u", SHORT_TEXT), UserVocab(["u"]))
    assert len(pair.text_ids) == 8 and pair.user_idx == 1
    no_text = PairEncoder(tok, 64, 32, use_text=False).encode(PreferenceRecord("p", "a", "b", "u", SHORT_TEXT),
                                                              UserVocab(["u"]))
    assert no_text.text_ids == []


def test_explicit_user_model_end_to_end(tmp_path):
    from pipelines.train_rm import run

    rows = _with_text(toy_rows(12))
    train = write_jsonl(tmp_path / "train.jsonl", rows[:16])
    held = rows[16:]
    evals = held + [{**r, "user_id": "newcomer_" + r["group"]} for r in held] \
        + [{**r, "user_id": "anon", "user_text": None} for r in held]
    evals_path = write_jsonl(tmp_path / "eval.jsonl", evals)
    cfg = load_config(None, tiny_overrides(tmp_path, train, evals_path, **{
        "user_model.use_text": True, "data.max_user_text_length": 12, "train.max_steps": 3}))
    m = run(cfg)["eval"]
    seen = m["per_seen"]
    assert seen["seen_with_text"]["n"] == 8
    assert seen["unseen_with_text"]["n"] == 8
    assert seen["unseen_without_text"]["n"] == 8
    assert m["per_user"]["newcomer_minority"]["seen"] is False and m["per_user"]["newcomer_minority"]["has_text"]
    assert m["per_user"]["anon"]["has_text"] is False


def test_unseen_user_text_changes_the_score(tmp_path):
    """An unseen user (index 0) is scored with e_0 plus their own text: different texts, different rewards."""
    from common.batching import collate_pairs
    from common.run import build_backbone
    from reward.model import PersonalizedRewardModel

    cfg = load_config(None, ["model.name=tiny-random", "user_model.use_text=true"])
    backbone, tok = build_backbone(cfg, 2, torch.device("cpu"))
    rm = PersonalizedRewardModel(backbone).eval()
    enc = PairEncoder.from_config(tok, cfg)
    vocab = UserVocab(["a", "b"])
    a = enc.encode(PreferenceRecord("Tell me.", "Long answer here.", "Short.", "stranger", SHORT_TEXT), vocab)
    b = enc.encode(PreferenceRecord("Tell me.", "Long answer here.", "Short.", "stranger", LONG_TEXT), vocab)
    assert a.user_idx == b.user_idx == 0
    with torch.no_grad():
        ra = rm(collate_pairs([a], tok.pad_token_id))
        rb = rm(collate_pairs([b], tok.pad_token_id))
    assert not torch.allclose(ra, rb)
