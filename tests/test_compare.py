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


def write_winrate(folder, per_group, baseline="runs/sft", judge="length:prefer_short=u2", per_user=None):
    """A winrate.json (pipelines.winrate's schema) with {group: (win, tie, loss, ci95)}."""
    folder.mkdir(parents=True, exist_ok=True)

    def row(win, tie, loss, ci):
        n = win + tie + loss
        return {"win": win, "tie": tie, "loss": loss, "n": n, "win_rate": (win + tie / 2) / n, "ci95": ci}

    groups = {g: row(*v) for g, v in per_group.items()}
    total = [sum(v[i] for v in per_group.values()) for i in range(3)]
    w = {"run": str(folder.parent), "baseline": baseline, "judge": judge, "n": sum(total), "per_user": per_user or {},
         "per_group": groups, "overall": row(*total, None), "position_consistency": None}
    (folder / "winrate.json").write_text(json.dumps(w))
    return folder


def test_win_rates_join_the_comparison_by_convention(tmp_path):
    pdpo = write_run(tmp_path / "pdpo", "dpo", {"u1": ("majority", 1.0), "u2": ("minority", 1.0)})
    write_winrate(pdpo / "winrate", {"majority": (3, 1, 0, [0.6, 1.0]), "minority": (7, 1, 0, [0.8, 1.0])},
                  per_user={u: {"mean_distinct_token_share": {"run": x, "baseline": 0.7}}
                            for u, x in (("u1", 0.65), ("u2", 0.9), ("u3", 0.55))})
    ppo = write_run(tmp_path / "ppo", "ppo", {"u1": ("majority", 1.0)})
    (ppo / "run.json").write_text(json.dumps({"stage": "train_ppo", "route": "ppo"}))
    evaluation = write_run(ppo / "eval", "ppo", {"u1": ("majority", 0.5)})  # an evaluate output inside the run
    write_winrate(ppo / "winrate", {"minority": (1, 0, 3, [0.0, 0.6])}, judge="rm:runs/rm")
    direct = write_winrate(tmp_path / "other" / "wr", {"majority": (0, 2, 0, [0.5, 0.5])})  # given on its own
    plain = write_run(tmp_path / "rm", "rm", {"u1": ("majority", 1.0)})
    comp = compare([pdpo, evaluation, direct, plain], tmp_path / "out")
    assert comp["win_rate_per_group"]["minority"] == {"pdpo": 0.9375, "eval": 0.25}
    assert comp["win_rate_per_group"]["majority"] == {"pdpo": 0.875, "wr": 0.5}
    assert comp["win_rate"]["eval"]["judge"] == "rm:runs/rm"
    assert comp["win_rate"]["eval"]["source"] == str(ppo / "winrate" / "winrate.json")
    assert "rm" not in comp["win_rate"]  # a run without win rates keeps its columns, and gets none here
    assert comp["win_rate"]["pdpo"]["lowest_distinct_token_share"] == {"user": "u3", "share": 0.55}
    assert "lowest_distinct_token_share" not in comp["win_rate"]["eval"]  # its winrate.json has no shares
    assert "wr" not in comp["cost"] and list(comp["generic_accuracy"]) == ["pdpo", "eval", "rm"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Win rate against a baseline" in report
    assert "| minority | 0.938 [0.80, 1.00] | 0.250 [0.00, 0.60] | - |" in report
    assert "`wr` (win rates only)" in report and "judge `rm:runs/rm`" in report
    assert "distinct-token share, lowest user u3 0.550" in report
    assert (tmp_path / "out" / "plots" / "win_rate_per_group.png").exists()
    saved = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert saved["win_rate_per_group"] == comp["win_rate_per_group"]


def test_no_win_rates_no_section_and_empty_folders_still_fail(tmp_path, capsys):
    a = write_run(tmp_path / "a", "rm", {"u1": ("majority", 1.0)})
    comp = compare([a], tmp_path / "out")
    assert comp["win_rate"] == {} and comp["win_rate_per_group"] == {}
    assert "Win rate" not in (tmp_path / "out" / "report.md").read_text()
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "out2")]) == 2
    assert "no metrics.json" in capsys.readouterr().err
