"""`python -m pipelines.generate`: answers prompts as a user with a finished policy run, batched, every row with its
own user prefix (issue 21). The reference is decoding each row alone through `generate_texts`."""

from __future__ import annotations

import json

import pytest
import torch

from policy.loading import generate_texts, load_policy_run
from tests.conftest import write_jsonl
from tests.test_serve import PROMPTS, make_run, train_tiny_pdpo

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny_pdpo(tmp_path_factory.mktemp("generate"))


@pytest.fixture(scope="module")
def run(run_dir):
    return load_policy_run(run_dir, CPU)


def _main(*args):
    from pipelines.generate import main

    return main([str(a) for a in args])


def alone(run, prompt, user, n=64):
    return generate_texts(run, [prompt], [user], max_new_tokens=n, batch_size=1)[0]


def test_one_prompt_prints_the_users_answer(run_dir, run, capsys):
    for user in ("a", "c"):
        assert _main("--run", run_dir, "--user-id", user, "--prompt", PROMPTS[0], "--max-new-tokens", 16) == 0
        assert capsys.readouterr().out.rstrip("\n") == alone(run, PROMPTS[0], user, 16).text


def test_prompts_file_every_row_with_its_own_user(run_dir, run, tmp_path):
    rows = [{"prompt": PROMPTS[0], "user_id": "a"}, {"prompt": PROMPTS[0], "user_id": "c"},
            {"prompt": PROMPTS[2], "user_id": "stranger"}, {"prompt": PROMPTS[3]},
            {"prompt": PROMPTS[1], "user_id": "b", "chosen": "x", "rejected": "y"}]  # contract records work too
    src = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out" / "answers.jsonl"
    assert _main("--run", run_dir, "--user-id", "b", "--prompts", src, "--out", out, "--per-row-users",
                 "--max-new-tokens", 12, "--batch-size", 4) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    users = ["a", "c", "stranger", "b", "b"]  # a row without user_id takes --user-id
    assert [g["prompt"] for g in got] == [r["prompt"] for r in rows] and [g["user_id"] for g in got] == users
    assert [g["personalized"] for g in got] == [True, True, False, True, True]
    for g, r, u in zip(got, rows, users):
        want = alone(run, r["prompt"], u, 12)
        assert g["response"] == want.text and g["tokens"] == len(want.token_ids) and g["finished"] == want.finished
    assert got[0]["response"] != got[1]["response"]  # same prompt, two users, two prefixes
    # without --per-row-users every row is --user-id's
    assert _main("--run", run_dir, "--user-id", "c", "--prompts", src, "--out", out, "--max-new-tokens", 12) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert {g["user_id"] for g in got} == {"c"} and got[0]["response"] == alone(run, PROMPTS[0], "c", 12).text


def test_sampling_is_reproducible_with_a_seed(run_dir, capsys):
    def sample(seed):
        assert _main("--run", run_dir, "--user-id", "a", "--prompt", PROMPTS[1], "--max-new-tokens", 16,
                     "--temperature", "1.0", "--top-p", "0.95", "--seed", seed) == 0
        return capsys.readouterr().out

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_errors_exit_2_with_one_clear_line(run_dir, tmp_path, capsys):
    cases = []
    assert _main("--run", run_dir, "--user-id", "a", "--prompts", tmp_path / "x.jsonl") == 2
    cases.append("--prompts needs --out")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 5}\n')
    assert _main("--run", run_dir, "--user-id", "a", "--prompts", bad, "--out", tmp_path / "o.jsonl") == 2
    cases.append(f"{bad}:2")
    assert _main("--run", run_dir, "--user-id", "a", "--prompt", "x", "--temperature", "-1") == 2
    cases.append("--temperature")
    assert _main("--run", tmp_path / "nowhere", "--user-id", "a", "--prompt", "x") == 2
    cases.append("not a finished run")
    rm = make_run(tmp_path / "rm", "train_rm")
    assert _main("--run", rm, "--user-id", "a", "--prompt", "x") == 2
    cases.append("not a policy run")
    err = capsys.readouterr().err
    for words in cases:
        assert words in err, words
    assert not (tmp_path / "o.jsonl").exists()
