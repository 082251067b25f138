"""`pipelines.compare` on hand-written run folders (no model): labels, SFT runs, references, missing values."""

import argparse
import json

import pytest

from pipelines.compare import compare, main, run_labels
from pipelines.demo import parse_stages


def write_run(folder, route, per_user=None, reference=None, sft_words=None, generic_words=None):
    folder.mkdir(parents=True)
    metrics = {"route": route}
    if per_user is not None:  # {user: (group, accuracy)}
        metrics["per_user"] = {u: {"accuracy": a, "group": g, "n": 2, "seen": True, "mean_margin": 0.5}
                               for u, (g, a) in per_user.items()}
        groups = {g for g, _ in per_user.values()}
        metrics["per_group"] = {g: {"accuracy": sum(a for gg, a in per_user.values() if gg == g) /
                                    sum(gg == g for gg, _ in per_user.values()), "n": 2, "mean_margin": 0.5}
                                for g in groups}
        metrics["generic"] = {"accuracy": 0.5}
        users = {u: 10.0 for u in per_user}
        if reference is not None:
            users["<reference>"] = reference
        if generic_words is not None:
            users["<generic>"] = generic_words
        metrics["generation"] = {"users": users, "per_group": {g: 10.0 for g in groups}}
    if sft_words is not None:
        metrics["generation"] = {"mean_response_words": {"<sft>": sft_words}}
        metrics["training"] = {"train_wall_s": 1.0}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_runs_with_the_same_folder_name_keep_apart(tmp_path):
    a = write_run(tmp_path / "rm" / "eval", "rm", {"u1": ("majority", 1.0), "u2": ("minority", 1.0)})
    b = write_run(tmp_path / "pdpo" / "eval", "dpo", {"u1": ("majority", 1.0), "u2": ("minority", 0.5)})
    assert run_labels([a, b]) == ["rm/eval", "pdpo/eval"]
    comp = compare([a, b], tmp_path / "out")
    assert comp["per_group_accuracy"]["minority"] == {"rm/eval": 1.0, "pdpo/eval": 0.5}
    assert run_labels([tmp_path / "x" / "rm", tmp_path / "y" / "ppo"]) == ["rm", "ppo"]  # short when unique


def test_the_same_run_twice_is_an_error(tmp_path, capsys):
    a = write_run(tmp_path / "rm", "rm", {"u1": ("majority", 1.0)})
    with pytest.raises(ValueError, match="more than once"):
        run_labels([a, tmp_path / "." / "rm"])
    assert main([str(a), str(a), "--out", str(tmp_path / "out")]) == 2
    assert "more than once" in capsys.readouterr().err


def test_sft_run_gives_the_reference_and_no_accuracy_column(tmp_path):
    sft = write_run(tmp_path / "sft", "sft", sft_words=21.0)
    pdpo = write_run(tmp_path / "pdpo", "dpo", {"u1": ("majority", 1.0)}, reference=21.0, generic_words=12.0)
    comp = compare([sft, pdpo], tmp_path / "out")
    assert list(comp["generic_accuracy"]) == ["pdpo"]
    assert comp["per_user_accuracy"] == {"u1": {"pdpo": 1.0}}
    assert comp["response_words_by_group"]["reference (SFT)"] == {"all users": 21.0}
    assert comp["response_words_by_group"]["pdpo"]["generic user"] == 12.0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| group | pdpo |" in report  # the accuracy tables have no empty SFT column


def test_different_references_are_shown_per_run(tmp_path):
    a = write_run(tmp_path / "a", "dpo", {"u1": ("majority", 1.0)}, reference=20.0)
    b = write_run(tmp_path / "b", "ppo", {"u1": ("majority", 1.0)}, reference=30.0)
    comp = compare([a, b], tmp_path / "out")
    assert comp["reference_response_words"] is None
    assert comp["response_words_by_group"]["reference of a"] == {"all users": 20.0}
    assert comp["response_words_by_group"]["reference of b"] == {"all users": 30.0}


def test_runs_with_different_users_leave_the_missing_ones_empty(tmp_path):
    a = write_run(tmp_path / "a", "rm", {"u1": ("majority", 1.0), "u2": ("minority", 0.0)})
    b = write_run(tmp_path / "b", "rm", {"u1": ("majority", 1.0)})
    comp = compare([a, b], tmp_path / "out")
    assert comp["per_user_accuracy"]["u2"] == {"a": 0.0, "b": None}
    assert (tmp_path / "out" / "plots" / "accuracy_per_user.png").exists()


def test_demo_stages_are_checked():
    assert parse_stages("rm,pdpo") == ["rm", "pdpo"]
    with pytest.raises(argparse.ArgumentTypeError, match="'compare'"):
        parse_stages("rm,compare")
    with pytest.raises(argparse.ArgumentTypeError, match="none given"):
        parse_stages(",")


def test_generation_statistics_per_group_share_one_rule():
    from pipelines.evaluate import _mean_by_group

    groups = {"u1": "majority", "u2": "majority", "u3": "minority", "u4": None}
    per_label = {"u1": 10.0, "u2": 20.0, "u3": 4.0, "u4": 7.0, "<generic>": 12.0, "<reference>": 9.0}
    # a user without a group is in the per-user table only; the generic user and the reference stand alone
    assert _mean_by_group(per_label, groups) == {"majority": 15.0, "minority": 4.0, "<generic>": 12.0,
                                                 "<reference>": 9.0}
