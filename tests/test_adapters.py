"""Source adapters (preference_data.adapters) and the prepare_data CLI, on small fixtures shaped like the
real files, plus smoke runs on the real files in ../shared/data when they are there."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # so that the tests run from any folder without installing the project
    sys.path.insert(0, str(REPO))

from pipelines.prepare_data import main as prepare_main  # noqa: E402
from pipelines.prepare_data import split_by_prompt  # noqa: E402
from preference_data.adapters import ADAPTERS, AdapterReport  # noqa: E402
from preference_data.adapters.base import word_count  # noqa: E402
from preference_data.adapters.psoups import profile_from_name  # noqa: E402
from preference_data.adapters.tldr import split_groups  # noqa: E402
from preference_data.io import load_records  # noqa: E402
from preference_data.records import DataError, PreferenceRecord  # noqa: E402

FIX = REPO / "tests" / "fixtures"
TLDR = FIX / "tldr" / "batch_fixture.json"
PSOUPS = [FIX / "psoups" / "psoups_P1A.jsonl", FIX / "psoups" / "psoups_P3B.json",
          FIX / "psoups" / "mixed_profiles.jsonl"]
PRISM = [FIX / "prism" / "survey.jsonl", FIX / "prism" / "conversations.jsonl"]
MTBENCH = FIX / "mtbench" / "human_gpt_comparison.zip"
SUMMARY = FIX / "summary_prefs" / "Batch_fixture_batch_results_reviewed.csv"

SHARED = Path(os.environ.get("PRLHF_SHARED_DATA", REPO.parent / "shared" / "data"))
if not SHARED.exists():
    SHARED = Path("/work/shared/data")

W = {"a": "Aq3LZr8mUe0WvN2xJt5bKp1YcH9sDf", "b": "Bx7TnM4kQe2RuV8zLc1wHj5oPa3gYd",
     "c": "Cm2VbN6xZq9KtR3wLe7uJo1sYh4fGa", "d": "Dk8YtR1eWq5NmZ2xVb7cLo3uJh9sPf",
     "e": "De4HgF7jKl2QwE9rTy1uIo5pAs3dZx"}


def _valid(records):
    """Every record is a contract record (round trip through the loader's validation)."""
    for r in records:
        assert isinstance(r, PreferenceRecord)
        assert r.prompt.strip() and r.chosen.strip() and r.rejected.strip() and r.chosen != r.rejected
    return records


def test_registry_has_every_source():
    assert set(ADAPTERS) == {"tldr", "tldr-length", "psoups", "prism", "mtbench-human", "summary-prefs"}
    assert all(callable(f) for f in ADAPTERS.values())


# ------------------------------------------------------------------------------------------------ tldr
def test_tldr_fixture():
    recs, rep = ADAPTERS["tldr"]([str(TLDR)])
    _valid(recs)
    assert isinstance(rep, AdapterReport)
    assert (rep.n_read, rep.n_written, rep.dropped) == (11, 10, {"identical_summaries": 1})
    assert Counter(r.user_id for r in recs) == {W["a"]: 4, W["b"]: 2, W["c"]: 2, W["d"]: 1, W["e"]: 1}
    assert all(r.group is None and r.user_text is None for r in recs)
    first = recs[0]  # choice 1 -> summaries[1], stripped
    assert first.prompt == ("SUBREDDIT: r/relationships\nTITLE: My boyfriend ignores my texts for days\nPOST: "
                            "We've been dating for 8 months. Lately he leaves me on read for two or three days at a "
                            "time and then acts like nothing happened. When I bring it up he says he's busy with "
                            "work. Am I overreacting?\nTL;DR:")
    assert first.chosen == "Boyfriend leaves my texts unanswered for days and says he is busy, am I overreacting?"
    assert first.rejected == "He left me on read for days."
    article = [r for r in recs if "ARTICLE:" in r.prompt]
    assert len(article) == 1
    assert article[0].prompt.startswith("TITLE: Storm knocks out power on the coast\nARTICLE: A major storm")
    assert article[0].prompt.endswith("\nTL;DR:") and "SUBREDDIT" not in article[0].prompt
    assert article[0].chosen == "Storm hits coast, thousands lose power."


def test_tldr_length_relabels_by_length():
    recs, rep = ADAPTERS["tldr-length"]([str(TLDR)], top_workers=3, minority_ranks=[2])
    _valid(recs)
    assert rep.n_read == 11 and rep.n_written == 7
    assert rep.dropped == {"identical_summaries": 1, "equal_length": 1, "other_worker": 2}
    assert rep.extra["mapping"] == {W["a"]: "user_1", W["b"]: "user_2", W["c"]: "user_3"}
    assert rep.extra["groups"] == {"user_1": "majority", "user_2": "minority", "user_3": "majority"}
    assert [w["n_annotations"] for w in rep.extra["workers"]] == [4, 3, 2]
    assert Counter(r.user_id for r in recs) == {"user_1": 3, "user_2": 2, "user_3": 2}
    assert rep.extra["pairs_per_group"] == {"majority": 5, "minority": 2}
    for r in recs:
        assert r.group == rep.extra["groups"][r.user_id]
        if r.group == "majority":
            assert word_count(r.chosen) > word_count(r.rejected)
        else:
            assert word_count(r.chosen) < word_count(r.rejected)
    # worker a labelled the shorter summary as better on post 3; as a majority user the longer one wins now
    dog = [r for r in recs if r.user_id == "user_1" and "dog" in r.prompt]
    assert dog[0].chosen.startswith("Neighbor's dog barks every night")


def test_tldr_length_top_n_ties_others_and_ids():
    recs, rep = ADAPTERS["tldr-length"]([str(TLDR)], top_workers=4, minority_ranks=[1], others="generic")
    # workers d and e both have 1 annotation: the tie goes to the smaller id ("De4..." < "Dk8...")
    assert rep.extra["mapping"][W["e"]] == "user_4" and W["d"] not in rep.extra["mapping"]
    generic = [r for r in recs if r.user_id is None]
    assert len(generic) == 1 and generic[0].group is None
    assert generic[0].chosen.startswith("Bought a used car privately")  # worker d's real label (choice 1)
    assert "other_worker" not in rep.dropped
    recs, rep = ADAPTERS["tldr-length"]([str(TLDR)], top_workers=2, keep_worker_ids=True)
    assert {r.user_id for r in recs} == {W["a"], W["b"]}
    assert rep.extra["mapping"] == {W["a"]: W["a"], W["b"]: W["b"]}
    # more workers asked for than exist: all are kept
    _, rep = ADAPTERS["tldr-length"]([str(TLDR)], top_workers=50)
    assert len(rep.extra["workers"]) == 5


def test_tldr_length_seeded_split():
    draws = [split_groups(10, 0.3, seed) for seed in range(20)]
    assert all(len(d) == 3 and d <= set(range(1, 11)) for d in draws)
    assert draws == [split_groups(10, 0.3, seed) for seed in range(20)]  # deterministic per seed
    assert len({frozenset(d) for d in draws}) > 1  # and the seed matters
    assert len(split_groups(3, 0.3, 0)) == 1 and len(split_groups(2, 0.1, 0)) == 1  # at least one
    assert len(split_groups(5, 0.3, 0)) == 2  # 1.5 rounds half up
    a, rep_a = ADAPTERS["tldr-length"]([str(TLDR)], top_workers=3, seed=7)
    b, rep_b = ADAPTERS["tldr-length"]([str(TLDR)], top_workers=3, seed=7)
    assert a == b and rep_a.extra == rep_b.extra
    assert sorted(rep_a.extra["groups"].values()) == ["majority", "majority", "minority"]


# ------------------------------------------------------------------------------------------------ psoups
def test_psoups_fixture():
    recs, rep = ADAPTERS["psoups"]([str(p) for p in PSOUPS])
    _valid(recs)
    assert (rep.n_read, rep.n_written, rep.dropped) == (6, 5, {"identical_completions": 1})
    assert Counter(r.user_id for r in recs) == {"P1A": 2, "P3B": 1, "P2A": 1, "P2B": 1}
    assert recs[0].prompt == "Explain what a black hole is." and recs[0].chosen.startswith("A black hole is a region")
    by_prompt = {r.prompt: r for r in recs}
    assert by_prompt["What is the capital of France?"].user_id == "P2B"
    assert by_prompt["What is the capital of France?"].chosen == "Paris."


def test_psoups_profile_from_name(tmp_path):
    assert profile_from_name(Path("data/allcombo_8_cleaned_P1A.json")) == "P1A"
    assert profile_from_name(Path("P3B/train.jsonl")) == "P3B"
    assert profile_from_name(Path("data/p2b_pairs.jsonl")) == "P2B"
    assert profile_from_name(Path("data/P1A_vs_P1B.json")) is None
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"user_input": "x", "completion_a": "y", "completion_b": "z"}) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: .*profile"):
        ADAPTERS["psoups"]([str(bad)])


# ------------------------------------------------------------------------------------------------ prism
def test_prism_fixture():
    recs, rep = ADAPTERS["prism"]([str(p) for p in PRISM])
    _valid(recs)
    assert rep.n_read == 3 and rep.n_written == 5
    assert rep.dropped == {"identical_responses": 1, "no_chosen": 1, "no_rejected": 1}
    assert Counter(r.user_id for r in recs) == {"user100": 4, "user999": 1}
    assert rep.extra["users_without_survey"] == 1 and rep.extra["n_survey_users"] == 3
    hike = [r for r in recs if r.prompt == "What should I pack for a three-day hike?"]
    assert len(hike) == 3 and {r.chosen for r in hike} == {hike[0].chosen}
    assert {r.rejected for r in hike} == {"Bring a backpack.", "You might want snacks.", "Hiking is fun! Enjoy it."}
    text = recs[0].user_text
    assert text.startswith("Age: 25-34 years old. Gender: Female. Education: University Bachelors Degree.")
    assert "Self-description: I am a nurse who loves hiking and reading history books." in text
    assert text.endswith("Most important in AI responses: factuality, helpfulness, values.")
    water = [r for r in recs if r.prompt == "How much water per day?"]
    assert len(water) == 1
    joke = [r for r in recs if r.user_id == "user999"]
    assert joke[0].user_text is None and joke[0].prompt == "Another one."


def test_prism_user_text_skips_missing_and_options():
    recs, rep = ADAPTERS["prism"]([str(p) for p in PRISM], with_context=True)
    water = [r for r in recs if r.prompt.endswith("How much water per day?")][0]
    assert water.prompt == ("User: What should I pack for a three-day hike?\n\nAssistant: Pack water, layers, a "
                            "first-aid kit, a map and high-energy food.\n\nUser: How much water per day?")
    # the later turn holds the opening turn: a train/eval split keeps the two together
    assert rep.related_prompts[water.prompt] == "What should I pack for a three-day hike?"
    recs, _ = ADAPTERS["prism"]([str(PRISM[1])], with_user_text=False)
    assert len(recs) == 5 and all(r.user_text is None for r in recs)
    with pytest.raises(DataError, match="survey"):
        ADAPTERS["prism"]([str(PRISM[1])])
    # user200 answered "Prefer not to say" twice: both are left out
    from preference_data.adapters.prism import prism_user_text

    survey = [json.loads(x) for x in PRISM[0].read_text().splitlines()][1]
    text = prism_user_text(survey)
    assert "Prefer not to say" not in text and "Gender" not in text and "Education" not in text
    assert text == ("Age: 55-64 years old. Employment: Working full-time. Marital status: Married. "
                    "English proficiency: Native speaker. Self-description: Retired teacher. "
                    "Most important in AI responses: creativity, values, diversity.")


# ------------------------------------------------------------------------------------------------ mtbench
def test_mtbench_fixture():
    recs, rep = ADAPTERS["mtbench-human"]([str(MTBENCH)])
    _valid(recs)
    assert rep.n_read == 6 and rep.n_written == 3
    assert rep.dropped == {"duplicate": 1, "tie": 1, "identical_responses": 1}
    assert Counter(r.user_id for r in recs) == {"author_0": 1, "expert_1": 2}
    t1 = recs[0]
    assert t1.prompt == "Write a two-line poem about the sea." and t1.user_id == "author_0"
    assert t1.chosen == "The sea is wide and deep,\nit sings the shore to sleep." and t1.rejected == "Waves."
    # turn 2, different first answers: no assistant turn in the shared prompt (it would give the label away)
    t2 = recs[1]
    assert t2.prompt == ("User: Write a two-line poem about the sea.\n\n"
                         "User: Now rewrite it so that every word starts with S.")
    assert t2.chosen == "Sea's waves." and t2.rejected == "Seas swell, sing softly,\nshores sleep soundly."
    # turn 2 where both models gave the same first answer: it is part of the prompt
    t3 = recs[2]
    assert t3.prompt == ("User: What is 12 times 7?\n\nAssistant: 12 times 7 is 84.\n\n"
                         "User: And what's that divided by 4?")
    assert t3.chosen == "84 divided by 4 is 21."
    recs, rep = ADAPTERS["mtbench-human"]([str(MTBENCH)], include_turn2=False)
    assert rep.dropped["turn2_skipped"] == 2 and rep.n_written == 1  # the turn-2 tie counts as a tie


def _mtbench_zip(tmp_path, conv_a, winner="model_a"):
    with zipfile.ZipFile(MTBENCH) as z:
        rows = list(csv.reader(io.StringIO(z.read(z.namelist()[0]).decode())))
    header, row = rows[0], rows[1]
    row[header.index("conversation_a_x")] = conv_a
    row[header.index("winner_x")] = winner
    buf = io.StringIO()
    csv.writer(buf).writerows([header, row])
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("bad.csv", buf.getvalue())
    return path


def test_mtbench_malformed_names_row_and_column(tmp_path):
    path = _mtbench_zip(tmp_path, "[('q', 'user'), ('a', 'assistant')] + __import__('os').system('true')")
    with pytest.raises(DataError, match=r"bad\.zip!bad\.csv row 1: column 'conversation_a_x'"):
        ADAPTERS["mtbench-human"]([str(path)])
    path = _mtbench_zip(tmp_path, "[('q', 'user'), ('a', 'assistant'), ('q2', 'user'), ('a2', 'assistant')]",
                        winner="model_c")
    with pytest.raises(DataError, match=r"row 1: column 'winner_x'"):
        ADAPTERS["mtbench-human"]([str(path)])


# ------------------------------------------------------------------------------------------------ summary
def test_summary_prefs_fixture():
    recs, rep = ADAPTERS["summary-prefs"]([str(SUMMARY)])
    _valid(recs)
    assert rep.n_read == 7 and rep.n_written == 3
    assert rep.dropped == {"tie": 1, "rejected_assignment": 1, "identical_summaries": 1, "no_answer": 1}
    assert Counter(r.user_id for r in recs) == {"AFXWORKER00001": 2, "AFXWORKER00002": 1}
    assert recs[0].prompt.startswith("Summarize the following biography of Ada Lovelace.\n\nAda Lovelace (1815")
    assert recs[0].prompt.endswith("\n\nSummary:")
    assert recs[0].chosen.startswith("Ada Lovelace (1815 - 1852) was an English")  # answer a
    assert recs[1].chosen.endswith("breaking German ciphers.")  # answer b
    # one text per worker, even for the assignment where the worker left the demographics blank
    assert recs[0].user_text == recs[1].user_text == "Gender: female. Age: younger than 30. Race: Asian."
    assert recs[2].user_text == "Gender: male. Age: older than 30. Race: White."
    recs, rep = ADAPTERS["summary-prefs"]([str(SUMMARY)], with_user_text=False, keep_rejected=True)
    assert all(r.user_text is None for r in recs) and rep.n_written == 4 and "rejected_assignment" not in rep.dropped


def test_summary_prefs_malformed(tmp_path):
    text = SUMMARY.read_text(encoding="utf-8")
    bad = tmp_path / "bad.csv"
    bad.write_text(text.replace(",True,", ",maybe,", 1), encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv row 1: column 'Answer\.[a-z_.0-9A-Z]+' must be True or False"):
        ADAPTERS["summary-prefs"]([str(bad)])
    header, rest = text.split("\n", 1)
    bad.write_text(header.replace("WorkerId", "Worker") + "\n" + rest, encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv header: missing column\(s\) 'WorkerId'"):
        ADAPTERS["summary-prefs"]([str(bad)])


# ------------------------------------------------------------------------------------------------ errors
def test_tldr_malformed_names_file_line_field(tmp_path):
    lines = TLDR.read_text().splitlines()
    obj = json.loads(lines[2])
    obj["choice"] = 2
    bad = tmp_path / "bad.json"
    bad.write_text("\n".join(lines[:2] + [json.dumps(obj)] + lines[3:]) + "\n")
    with pytest.raises(DataError, match=r"bad\.json:3: field 'choice'"):
        ADAPTERS["tldr"]([str(bad)])
    del obj["info"]["post"]
    obj["choice"] = 0
    bad.write_text("\n".join(lines[:4] + [json.dumps(obj)]) + "\n")
    with pytest.raises(DataError, match=r"bad\.json:5: missing field 'info\.post' \(or 'info\.article'\)"):
        ADAPTERS["tldr-length"]([str(bad)])
    bad.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.json:2: malformed JSON"):
        ADAPTERS["tldr"]([str(bad)])
    obj = json.loads(lines[0])
    obj["summaries"][1] = {"policy": "x"}
    bad.write_text(json.dumps(obj) + "\n")
    with pytest.raises(DataError, match=r"bad\.json:1: missing field 'summaries\[1\]\.text'"):
        ADAPTERS["tldr"]([str(bad)])
    with pytest.raises(DataError, match="not found"):
        ADAPTERS["tldr"]([str(tmp_path / "missing.json")])


def test_prism_malformed(tmp_path):
    conv = json.loads(PRISM[1].read_text().splitlines()[0])
    conv["conversation_history"][2]["if_chosen"] = "yes"
    bad = tmp_path / "conversations.jsonl"
    bad.write_text(PRISM[1].read_text().splitlines()[1] + "\n" + json.dumps(conv) + "\n")
    with pytest.raises(DataError, match=r"conversations\.jsonl:2: field 'conversation_history\[2\]\.if_chosen'"):
        ADAPTERS["prism"]([str(bad)], with_user_text=False)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_split_by_prompt(tmp_path, capsys):
    out, ev, rep = tmp_path / "train.jsonl", tmp_path / "eval.jsonl", tmp_path / "report.json"
    code = prepare_main(["tldr-length", "--input", str(TLDR), "--out", str(out), "--eval-out", str(ev),
                         "--eval-fraction", "0.4", "--seed", "3", "--top-workers", "3", "--minority-ranks", "2",
                         "--report-json", str(rep)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "tldr-length: read 11, wrote 7, dropped 4" in printed
    assert "other_worker" in printed and "equal_length" in printed and "user_2" in printed
    train, held = load_records(out), load_records(ev)
    assert len(train) + len(held) == 7 and train and held
    assert not {r.prompt for r in train} & {r.prompt for r in held}
    assert json.loads(rep.read_text())["extra"]["groups"]["user_2"] == "minority"
    # seeded: the same call gives the same split
    prepare_main(["tldr-length", "--input", str(TLDR), "--out", str(tmp_path / "t2.jsonl"), "--eval-out",
                  str(tmp_path / "e2.jsonl"), "--eval-fraction", "0.4", "--seed", "3", "--top-workers", "3",
                  "--minority-ranks", "2"])
    assert load_records(tmp_path / "e2.jsonl") == held


def test_split_by_prompt_keeps_prompts_whole():
    recs = [PreferenceRecord(f"p{i % 7}", f"c{i}", f"r{i}", f"u{i % 3}") for i in range(40)]
    train, held = split_by_prompt(recs, 0.3, 0)
    assert len(train) + len(held) == 40
    assert len({r.prompt for r in held}) == 2  # round(0.3 * 7)
    assert not {r.prompt for r in train} & {r.prompt for r in held}
    assert split_by_prompt(recs, 0.3, 0) == (train, held)


def test_split_keeps_a_conversations_turns_on_one_side():
    # turn 2 prompts hold the turn-1 question word for word: split apart, the held-out turn would be half-seen
    recs = []
    for q in range(10):
        recs.append(PreferenceRecord(f"q{q}", "a", "b", "u1"))
        recs.append(PreferenceRecord(f"User: q{q}\n\nUser: follow-up {q}", "a", "b", "u1"))
    related = {f"User: q{q}\n\nUser: follow-up {q}": f"q{q}" for q in range(10)}
    for seed in range(5):
        train, held = split_by_prompt(recs, 0.3, seed, related)
        assert len(held) == 6  # round(0.3 * 10) conversations, both turns each
        train_q = {r.prompt.split("\n")[0].removeprefix("User: ") for r in train}
        assert not train_q & {r.prompt.split("\n")[0].removeprefix("User: ") for r in held}
    # without the relation the same data is split by prompt string alone, as before
    assert split_by_prompt(recs, 0.3, 0) == split_by_prompt(recs, 0.3, 0, {})


def test_mtbench_turn2_prompts_are_tied_to_their_question():
    recs, rep = ADAPTERS["mtbench-human"]([str(MTBENCH)])
    assert rep.related_prompts == {recs[1].prompt: recs[0].prompt, recs[2].prompt: "What is 12 times 7?"}


def test_cli_subprocess_and_errors(tmp_path):
    out = tmp_path / "ps.jsonl"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "pipelines.prepare_data", "psoups", *sum([["--input", str(p)]
                          for p in PSOUPS], []), "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert "psoups: read 6, wrote 5, dropped 1" in res.stdout and "identical_completions" in res.stdout
    assert len(load_records(out)) == 5
    bad = tmp_path / "bad.json"
    bad.write_text('{"info": {"post": "p"}, "summaries": [], "choice": 0, "worker": "w"}\n')
    res = subprocess.run([sys.executable, "-m", "pipelines.prepare_data", "tldr", "--input", str(bad), "--out",
                          str(tmp_path / "x.jsonl")], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "bad.json:1: field 'summaries'" in res.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_cli_options_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        prepare_main(["psoups", "--input", str(PSOUPS[0]), "--out", str(tmp_path / "o.jsonl"), "--top-workers", "3"])
    assert exc.value.code == 2 and "--top-workers do not apply to source psoups" in capsys.readouterr().err
    code = prepare_main(["summary-prefs", "--input", str(SUMMARY), "--out", str(tmp_path / "s.jsonl"),
                         "--no-user-text"])
    assert code == 0 and all(r.user_text is None for r in load_records(tmp_path / "s.jsonl"))
    code = prepare_main(["prism", "--input", str(PRISM[0]), "--input", str(PRISM[1]), "--out",
                         str(tmp_path / "p.jsonl"), "--with-context"])
    assert code == 0 and len(load_records(tmp_path / "p.jsonl")) == 5
    code = prepare_main(["mtbench-human", "--input", str(MTBENCH), "--out", str(tmp_path / "m.jsonl")])
    assert code == 0 and len(load_records(tmp_path / "m.jsonl")) == 3
    assert "tie" in capsys.readouterr().out


def test_cli_length_conflict_calls_colleague_module(tmp_path, monkeypatch, capsys):
    import types

    calls = []
    fake = types.ModuleType("preference_data.length_conflict")
    fake.write_length_conflict = (lambda out_dir, seed=0, n_eval_prompts=30, with_medium=False:
                                  calls.append((str(out_dir), seed, n_eval_prompts, with_medium)) or {"train": 10})
    monkeypatch.setitem(sys.modules, "preference_data.length_conflict", fake)
    assert prepare_main(["length-conflict", "--out", str(tmp_path / "lc"), "--seed", "5"]) == 0
    assert prepare_main(["length-conflict", "--out", str(tmp_path / "lc"), "--eval-prompts", "4",
                         "--medium-answers"]) == 0
    assert calls == [(str(tmp_path / "lc"), 5, 15, False), (str(tmp_path / "lc"), 0, 4, True)]  # 15: the demo's


def test_cli_length_conflict_writes_the_demos_data(tmp_path):
    from preference_data.length_conflict import make_length_conflict

    assert prepare_main(["length-conflict", "--out", str(tmp_path / "lc")]) == 0
    train, evals = make_length_conflict(seed=0, n_eval_prompts=15)  # what pipelines.demo writes (seed 0)
    assert load_records(tmp_path / "lc" / "train.jsonl") == train
    assert load_records(tmp_path / "lc" / "eval.jsonl") == evals


# ------------------------------------------------------------------------------------------------ real files
def _real(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"real data file {path} not available")
    return path


def test_real_tldr_batch13():
    path = _real("tldr/batch13.json")
    recs, rep = ADAPTERS["tldr"]([str(path)])
    assert rep.n_read == 1097 and rep.n_written > 1000
    assert len({r.user_id for r in recs}) == 27
    recs, rep = ADAPTERS["tldr-length"]([str(path)], top_workers=10)
    assert len({r.user_id for r in recs}) == 10 and set(rep.extra["pairs_per_group"]) == {"majority", "minority"}
    assert sorted(rep.extra["groups"].values()).count("minority") == 3
    assert rep.n_written + sum(rep.dropped.values()) == rep.n_read


def test_real_mtbench():
    path = _real("mtbench_human/human_gpt_comparison.zip")
    recs, rep = ADAPTERS["mtbench-human"]([str(path)])
    assert rep.n_read == 3502 and 1000 < rep.n_written < 1751
    assert rep.dropped["tie"] > 0 and rep.dropped["duplicate"] > 0
    assert 50 < len({r.user_id for r in recs}) <= 65
    assert len(set(recs)) == len(recs)


def test_real_summary_prefs():
    path = _real("summary_preferences/Batch_4248487_batch_results_reviewed.csv")
    recs, rep = ADAPTERS["summary-prefs"]([str(path)])
    assert rep.n_read == 975 and 300 < rep.n_written < 975
    assert rep.dropped["tie"] > 0 and rep.dropped["rejected_assignment"] > 0
    assert 50 < len({r.user_id for r in recs}) <= 116
    assert sum(r.user_text is not None for r in recs) > 0.9 * len(recs)
