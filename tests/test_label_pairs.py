"""reward.labelling.best_worst_pairs against hand computations, and pipelines.label_pairs end to end on tiny runs:
the written pairs are contract records, one per (prompt, known user) at most, and each is ordered as the RM scores
it for that user."""

import json

import pytest
import torch

from common.config import load_config
from conftest import tiny_overrides, toy_rows, write_jsonl
from pipelines.label_pairs import main
from preference_data.io import load_records
from reward.labelling import LabelledPair, best_worst_pairs


def test_best_worst_pairs_hand_computed():
    scores = torch.tensor([[0.1, 2.0, -1.0, 0.5],    # best 1, worst 2, margin 3.0
                           [1.0, 1.0, 1.0, 1.2],     # margin 0.2: kept at min_margin 0, dropped at 0.5
                           [3.0, 3.0, 3.0, 3.0]])    # no gap: never a pair
    assert best_worst_pairs(scores) == [LabelledPair(1, 2, pytest.approx(3.0)), LabelledPair(3, 0, pytest.approx(0.2)),
                                        None]
    assert best_worst_pairs(scores, min_margin=0.5)[1] is None
    # sample 1 invalid (e.g. cut at max_new_tokens): the next best is 3
    assert best_worst_pairs(scores, valid=torch.tensor([True, False, True, True]))[0] == \
        LabelledPair(3, 2, pytest.approx(1.5))
    assert best_worst_pairs(scores, valid=torch.tensor([False, False, True, False])) == [None, None, None]


def test_best_worst_pairs_rejects_bad_shapes():
    with pytest.raises(ValueError, match="n_users, n_samples"):
        best_worst_pairs(torch.zeros(3))
    with pytest.raises(ValueError, match="valid must have shape"):
        best_worst_pairs(torch.zeros(2, 3), valid=torch.ones(2, dtype=torch.bool))


def test_label_pairs_end_to_end(tmp_path):
    from pipelines.train_rm import run as train_rm
    from pipelines.train_sft import run as train_sft
    from policy.ppo.roles import load_reward_role

    rows = toy_rows(8)
    train, evals = write_jsonl(tmp_path / "train.jsonl", rows[:12]), write_jsonl(tmp_path / "eval.jsonl", rows[12:])
    common = {"train.max_steps": 2, "eval.n_generation_prompts": 0}
    train_sft(load_config(None, tiny_overrides(tmp_path, train, evals, **common, output_dir=str(tmp_path / "sft"),
                                               **{"user_model.kind": "uniform"})))
    train_rm(load_config(None, tiny_overrides(tmp_path, train, evals, **common, output_dir=str(tmp_path / "rm"))))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows[:6] + [dict(rows[0], user_id="zz")])  # zz: unseen
    out = tmp_path / "pairs.jsonl"
    assert main(["--policy", str(tmp_path / "sft"), "--rm", str(tmp_path / "rm"), "--prompts", str(prompts),
                 "--out", str(out), "--samples", "4", "--max-new-tokens", "6", "--allow-unfinished",
                 "--min-margin", "1e-3", "--device", "cpu"]) == 0
    pairs = load_records(out)
    summary = json.loads((tmp_path / "pairs.jsonl.summary.json").read_text())
    assert summary["pairs"] == len(pairs) > 0 and summary["skipped_users"] == ["zz"]
    keys = [(r.prompt, r.user_id) for r in pairs]
    assert len(keys) == len(set(keys)) and {u for _, u in keys} <= {"a", "b"}
    groups = {r["user_id"]: r["group"] for r in rows}
    assert all(r.group == groups[r.user_id] for r in pairs)
    reward = load_reward_role(tmp_path / "rm", "cpu")
    got = reward.score([r.prompt for r in pairs] * 2, [r.chosen for r in pairs] + [r.rejected for r in pairs],
                       [r.user_id for r in pairs] * 2, ended=[False] * (2 * len(pairs)))
    # unfinished answers are scored as cut (no EOS appended): as label_pairs scored them. Every kept pair has a gap
    # above 1e-3, far above what scoring the rows in other batches can change (float32 rounding, ~1e-6)
    assert bool((got[:len(pairs)] > got[len(pairs):]).all())


def test_label_pairs_needs_two_samples_and_a_known_user(tmp_path, capsys):
    assert main(["--policy", "x", "--rm", "y", "--prompts", "z", "--out", str(tmp_path / "o"), "--samples", "1"]) == 2
    assert "--samples must be >= 2" in capsys.readouterr().err
