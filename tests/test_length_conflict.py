"""The embedded length-conflict task: corpus quality, prompt split, preferences per group, determinism."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict

import pytest

from preference_data.io import load_records
from preference_data.length_conflict import (
    CORPUS_PATH,
    DEFAULT_USERS,
    MINORITY_USERS,
    load_corpus,
    make_length_conflict,
    write_length_conflict,
)
from preference_data.records import DataError, validate_record


def _words(text: str) -> int:
    return len(text.split())


def _sentences(text: str) -> int:
    return len([s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s])


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


@pytest.fixture(scope="module")
def default_split():
    return make_length_conflict()


# ---------------------------------------------------------------- corpus


def test_corpus_size_and_distinct_prompts(corpus):
    prompts = [item["prompt"] for item in corpus]
    assert len(corpus) >= 150
    assert len(set(p.strip().lower() for p in prompts)) == len(prompts)
    assert len({item["short"] for item in corpus}) == len(corpus)
    assert len({item["long"] for item in corpus}) == len(corpus)
    assert len({item["topic"] for item in corpus}) >= 10


def test_corpus_word_counts_and_ratio(corpus):
    for item in corpus:
        p, s, l = _words(item["prompt"]), _words(item["short"]), _words(item["long"])
        assert 5 <= p <= 15, item["prompt"]
        assert 5 <= s <= 12, item["short"]
        assert 40 <= l <= 60, item["long"]
        assert l >= 4 * s, item["prompt"]
        assert _sentences(item["short"]) == 1, item["short"]
        assert 3 <= _sentences(item["long"]) <= 4, item["long"]
        assert item["short"].split()[0].lower() != item["long"].split()[0].lower(), item["prompt"]


def test_load_corpus_rejects_bad_files(tmp_path):
    good = {"prompt": "Why is the sky blue?", "short": "Scattering.", "long": "Because of Rayleigh scattering."}
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.jsonl:2: prompt repeats line 1"):
        load_corpus(path)
    path.write_text(json.dumps({**good, "long": ""}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.jsonl:1: field 'long'"):
        load_corpus(path)
    with pytest.raises(DataError, match="not found"):
        load_corpus(tmp_path / "missing.jsonl")


def test_corpus_path_is_inside_package():
    assert CORPUS_PATH.is_file()
    assert CORPUS_PATH.parent.name == "assets"


# ---------------------------------------------------------------- records


def test_defaults_counts_and_validity(corpus, default_split):
    train, evals = default_split
    n_users = len(DEFAULT_USERS)
    assert len(evals) == 30 * n_users
    assert len(train) == (len(corpus) - 30) * n_users
    for rec in train + evals:
        assert validate_record(rec.to_dict()) == rec
        assert rec.user_text is None
        assert rec.user_id in DEFAULT_USERS


def test_split_by_prompt(default_split):
    train, evals = default_split
    train_prompts = {r.prompt for r in train}
    eval_prompts = {r.prompt for r in evals}
    assert len(eval_prompts) == 30
    assert not train_prompts & eval_prompts
    # every user sees every prompt of its split, once
    for records, prompts in ((train, train_prompts), (evals, eval_prompts)):
        per_user = defaultdict(list)
        for r in records:
            per_user[r.user_id].append(r.prompt)
        assert set(per_user) == set(DEFAULT_USERS)
        for user_prompts in per_user.values():
            assert len(user_prompts) == len(set(user_prompts)) == len(prompts)


def test_preferences_follow_groups(corpus, default_split):
    by_prompt = {item["prompt"]: item for item in corpus}
    train, evals = default_split
    for rec in train + evals:
        item = by_prompt[rec.prompt]
        if rec.user_id in MINORITY_USERS:
            assert rec.group == "minority"
            assert (rec.chosen, rec.rejected) == (item["short"], item["long"])
            assert _words(rec.chosen) < _words(rec.rejected)
        else:
            assert rec.group == "majority"
            assert (rec.chosen, rec.rejected) == (item["long"], item["short"])
            assert _words(rec.chosen) > _words(rec.rejected)
    groups = Counter(r.group for r in evals)
    assert groups == {"minority": 30 * 3, "majority": 30 * 7}


def test_deterministic_and_seed_dependent(default_split):
    again = make_length_conflict(seed=0)
    assert again == default_split
    other_train, other_eval = make_length_conflict(seed=1)
    assert {r.prompt for r in other_eval} != {r.prompt for r in default_split[1]}
    assert other_train != default_split[0]


def test_records_are_shuffled(default_split):
    train, _ = default_split
    first_users = [r.user_id for r in train[:50]]
    assert len(set(first_users)) > 1  # not grouped user by user


def test_eval_prompts_independent_of_train_size(default_split):
    small_train, small_eval = make_length_conflict(n_train_prompts=20, n_eval_prompts=30, seed=0)
    assert {r.prompt for r in small_eval} == {r.prompt for r in default_split[1]}
    assert len({r.prompt for r in small_train}) == 20
    assert len(small_train) == 20 * len(DEFAULT_USERS)


def test_pairs_per_user_subset():
    train, evals = make_length_conflict(n_train_prompts=40, n_eval_prompts=10, pairs_per_user=15, seed=3)
    train_prompts = {r.prompt for r in train}
    assert len(train_prompts) <= 40
    per_user = defaultdict(set)
    for r in train:
        per_user[r.user_id].add(r.prompt)
    assert set(per_user) == set(DEFAULT_USERS)
    assert all(len(p) == 15 for p in per_user.values())
    assert len(train) == 15 * len(DEFAULT_USERS)
    assert len({frozenset(p) for p in per_user.values()}) > 1  # users get different subsets
    assert len(evals) == 10 * len(DEFAULT_USERS)  # eval stays complete
    assert not train_prompts & {r.prompt for r in evals}
    assert make_length_conflict(n_train_prompts=40, n_eval_prompts=10, pairs_per_user=15, seed=3) == (train, evals)


def test_custom_users():
    train, evals = make_length_conflict(n_train_prompts=5, n_eval_prompts=2, users=("a", "b", "c"), minority=("b",))
    assert {r.user_id for r in train} == {"a", "b", "c"}
    assert {r.user_id for r in train if r.group == "minority"} == {"b"}
    assert len(train) == 15 and len(evals) == 6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"minority": ("user_4", "user_99")}, "not among users"),
        ({"n_train_prompts": 10_000}, "corpus has only"),
        ({"n_eval_prompts": 10_000}, "leaves no training prompts"),
        ({"n_eval_prompts": -1}, "n_eval_prompts"),
        ({"n_train_prompts": 0}, "n_train_prompts"),
        ({"n_train_prompts": 10, "pairs_per_user": 11}, "exceeds"),
        ({"pairs_per_user": 0}, "pairs_per_user"),
        ({"users": ()}, "must not be empty"),
        ({"users": ("user_1", "user_1"), "minority": ()}, "duplicates"),
        ({"users": "user_1"}, "not a single string"),
    ],
)
def test_bad_args_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_length_conflict(**kwargs)


# ---------------------------------------------------------------- files


def test_write_length_conflict(tmp_path):
    summary = write_length_conflict(tmp_path / "lc", n_train_prompts=12, n_eval_prompts=4, seed=5)
    train = load_records(tmp_path / "lc" / "train.jsonl")
    evals = load_records(tmp_path / "lc" / "eval.jsonl")
    assert (train, evals) == make_length_conflict(n_train_prompts=12, n_eval_prompts=4, seed=5)
    assert summary["train"] == {"records": 120, "prompts": 12, "groups": {"majority": 84, "minority": 36}}
    assert summary["eval"] == {"records": 40, "prompts": 4, "groups": {"majority": 28, "minority": 12}}
    assert summary["users"] == list(DEFAULT_USERS)
    assert summary["minority"] == list(MINORITY_USERS)
    assert summary["seed"] == 5
    json.dumps(summary)  # serialisable
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="must be a folder"):
        write_length_conflict(tmp_path / "file", n_train_prompts=2, n_eval_prompts=1)


def test_medium_answers_train_on_every_pair_of_three_lengths():
    from preference_data.length_conflict import medium_answer

    corpus = load_corpus()
    train, evals = make_length_conflict(n_train_prompts=6, n_eval_prompts=3, seed=1, with_medium=True)
    plain_train, plain_evals = make_length_conflict(n_train_prompts=6, n_eval_prompts=3, seed=1)
    assert len(train) == 3 * len(plain_train) and evals == plain_evals  # held-out stays short vs long
    by_prompt = {c["prompt"]: c for c in corpus}
    for r in train:
        item = by_prompt[r.prompt]
        answers = {item["short"], item["long"], medium_answer(item["long"])}
        assert {r.chosen, r.rejected} <= answers and r.chosen != r.rejected
        shorter = len(r.chosen.split()) < len(r.rejected.split())
        assert shorter == (r.group == "minority")
    med = medium_answer(corpus[0]["long"])
    assert corpus[0]["long"].startswith(med) and med.endswith((".", "!", "?")) and len(med) < len(corpus[0]["long"])


def test_long_answer_set_is_held_out_and_2_to_3_times_longer(tmp_path):
    from pipelines.prepare_data import main as prepare_main
    from preference_data.length_conflict import LONG_ANSWERS_PATH, long_answer_records

    items = load_corpus(LONG_ANSWERS_PATH)
    main_prompts = {c["prompt"].strip().lower() for c in load_corpus()}
    assert len(items) == 30 and not {i["prompt"].strip().lower() for i in items} & main_prompts
    assert all(10 <= len(i["short"].split()) <= 30 and 80 <= len(i["long"].split()) <= 150 for i in items)
    records = long_answer_records()
    assert len(records) == 300 and {r.group for r in records} == {"majority", "minority"}
    assert all((len(r.chosen.split()) < len(r.rejected.split())) == (r.group == "minority") for r in records)
    assert len({r.prompt for r in long_answer_records(n_prompts=12)}) == 12
    assert prepare_main(["length-conflict", "--corpus", "long-answers", "--out", str(tmp_path / "long")]) == 0
    assert load_records(tmp_path / "long" / "eval.jsonl") == records and not (tmp_path / "long" / "train.jsonl").exists()
