"""pipelines.winrate and evaluation/: statistics against hand computations, the judges (length rule, RM, an
OpenAI-compatible stub server on 127.0.0.1, a tiny-random hf judge), the both-orders rule, and the CLI end to end on
tiny policy runs trained here."""

import json
import math
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from common.config import load_config
from conftest import tiny_overrides, toy_rows, write_jsonl
from evaluation import stats
from evaluation.judges import (JudgeError, JudgeSpecError, Judgment, LengthJudge, Query, parse_judge_spec,
                               prefer_short_users)
from evaluation.templates import BUILTIN, TemplateError, check_placeholders, load_template
from evaluation.verdicts import combine_orders, parse_verdict
from evaluation.winrate import Item, aggregate, judge_items, run_winrate
from pipelines.winrate import main
from policy.loading import Generated

# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny P-DPO, SFT and RM runs on the toy two-user task (a few seconds), and a prompts file: the held-out
    prompts for both users, a duplicate record and an unseen user."""
    from pipelines.train_pdpo import run as train_pdpo
    from pipelines.train_rm import run as train_rm
    from pipelines.train_sft import run as train_sft

    tmp = tmp_path_factory.mktemp("winrate")
    rows = toy_rows(12)
    train, evals = write_jsonl(tmp / "train.jsonl", rows[:16]), write_jsonl(tmp / "eval.jsonl", rows[16:])
    common = {"train.max_steps": 2, "eval.n_generation_prompts": 0}
    train_pdpo(load_config(None, tiny_overrides(tmp, train, evals, **common, output_dir=str(tmp / "pdpo"))))
    train_sft(load_config(None, tiny_overrides(tmp, train, evals, **common, output_dir=str(tmp / "sft"),
                                               **{"user_model.kind": "uniform"})))
    train_rm(load_config(None, tiny_overrides(tmp, train, evals, **common, output_dir=str(tmp / "rm"))))
    extra = [dict(rows[16], user_id="zz", group="minority"), rows[17]]  # an unseen user; a duplicate (prompt, user)
    prompts = write_jsonl(tmp / "prompts.jsonl", rows[16:] + extra)
    return {"pdpo": tmp / "pdpo", "sft": tmp / "sft", "rm": tmp / "rm", "prompts": prompts, "n_items": 9, "tmp": tmp}


@pytest.fixture
def stub():
    """An OpenAI-compatible chat endpoint on 127.0.0.1: replies from `state["script"]` (text, or (status, text)),
    then `state["default"]`; every request body lands in `state["requests"]`."""
    state = {"script": [], "default": "[[A]]", "requests": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append(body)
            item = state["script"].pop(0) if state["script"] else state["default"]
            status, text = item if isinstance(item, tuple) else (200, item)
            payload = {"error": {"message": "stub failure", "type": "server_error"}} if status != 200 else {
                "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()
    server.server_close()


def q(user, a, b, prompt="p"):
    return Query(prompt, user, None, a, b)


class AlwaysA:
    """A judge with total position bias: the first answer shown always wins."""

    position_sensitive = True
    name = "always-a"

    def __init__(self):
        self.asked = []

    def judge(self, queries):
        self.asked += queries
        return [Judgment("A") for _ in queries]

    def close(self):
        pass


class PrefersGood(AlwaysA):
    """A position-free judge: the answer containing "good" wins."""

    def judge(self, queries):
        self.asked += queries
        return [Judgment("A" if "good" in x.answer_a else "B" if "good" in x.answer_b else "tie") for x in queries]


# ------------------------------------------------------------------------------------------------ statistics


def test_tally_hand_computation():
    row = stats.tally(["win"] * 7 + ["tie"] + ["invalid"] * 2)
    assert row == {"win": 7, "tie": 1, "loss": 0, "n": 8, "invalid": 2, "win_rate": 0.9375}  # (7 + 0.5) / 8
    assert stats.tally(["loss", "tie", "tie"])["win_rate"] == pytest.approx(1 / 3)
    assert stats.tally(["invalid"])["win_rate"] is None
    with pytest.raises(ValueError, match="unknown outcome"):
        stats.tally(["draw"])
    assert stats.scores_of(["win", "invalid", "tie", "loss"]).tolist() == [1.0, 0.5, 0.0]


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_n():
    assert stats.bootstrap_ci([1.0] * 5, 200) == [1.0, 1.0]  # no variation, no width
    assert stats.bootstrap_ci([], 200) is None and stats.bootstrap_ci([1.0], 0) is None
    small = [1.0, 0.0, 0.5, 1.0] * 3
    large = small * 50
    lo_s, hi_s = stats.bootstrap_ci(small, 1000, seed=1)
    lo_l, hi_l = stats.bootstrap_ci(large, 1000, seed=1)
    estimate = float(np.mean(small))
    assert lo_s <= estimate <= hi_s and lo_l <= estimate <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 4  # 50x the items: about 1/7 of the width
    # hand computation: n = 400 coin flips, the normal interval is +- 1.96 * sqrt(0.25 / 400) = +- 0.049
    lo, hi = stats.bootstrap_ci([1.0, 0.0] * 200, 2000, seed=0)
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 400), abs=0.01)
    assert stats.bootstrap_ci(small, 300, seed=4) == stats.bootstrap_ci(small, 300, seed=4)  # seeded
    assert stats.bootstrap_ci(small, 300, seed=4, chunk=7) == stats.bootstrap_ci(small, 300, seed=4)  # any block size


def test_length_controlled_win_rate_hand_computation():
    # the run wins 4 of 5 when 10 words longer, half of 10 when 10 words shorter: raw (4 + 5) / 15 = 0.6. Two length
    # values make the unpenalized model saturated, p(+) = 0.8 and p(-) = 0.5, and z = 0 lies midway in logit:
    # sigmoid((logit 0.8 + logit 0.5) / 2) = sigmoid(ln 2) = 2 / 3
    scores = [1, 1, 1, 1, 0] + [1] * 5 + [0] * 5
    diff = [10] * 5 + [-10] * 10
    assert np.mean(scores) == pytest.approx(0.6)
    assert stats.length_controlled_win_rate(scores, diff, ridge=0.0) == pytest.approx(2 / 3, abs=1e-6)
    shrunk = stats.length_controlled_win_rate(scores, diff)  # the ridge pulls the slope, and LC, towards the raw rate
    assert 0.6 < shrunk < 2 / 3
    assert stats.length_controlled_win_rate([1, 0, 1, 0], [5, -5, 5, -5]) == pytest.approx(0.5)  # wins only by length
    assert stats.length_controlled_win_rate([1, 0.5, 0], [3, 3, 3]) == pytest.approx(0.5)  # no length variation
    assert stats.length_controlled_win_rate([1, 1], [4, -2]) == 1.0
    sep = stats.length_controlled_win_rate([1, 1, 0, 0], [2, 1, -1, -2])  # separated by length: finite, symmetric
    assert sep == pytest.approx(0.5, abs=1e-6)
    assert stats.length_controlled_win_rate([], []) is None


def test_distinct_token_share_hand_computation():
    from common.metrics import distinct_token_share

    assert distinct_token_share([5, 5, 5, 5]) == 0.25  # a run of one token: what a word count calls one word
    assert distinct_token_share([1, 2, 3, 2, 0]) == 0.8
    assert distinct_token_share(iter([7])) == 1.0 and distinct_token_share([]) == 1.0


def test_summarize_and_aggregate_per_user_and_group():
    items = [Item("p1", "u1", None, "g"), Item("p2", "u1", None, "g"), Item("p1", "u2", None, "h"),
             Item("p1", None, None, None)]
    rows = [{"outcome": o, "consistent": c} for o, c in [("win", True), ("invalid", None), ("tie", False),
                                                         ("loss", True)]]
    out = aggregate(items, rows, [3, 4, 5, 6], [1, 1, 1, 1], {"u1": True, "u2": False}, n_boot=100)
    u1 = out["per_user"]["u1"]
    assert (u1["win"], u1["n"], u1["invalid"], u1["win_rate"], u1["seen"], u1["group"]) == (1, 1, 1, 1.0, True, "g")
    assert u1["mean_words"] == {"run": 3.5, "baseline": 1.0}  # over both items, the invalid one included
    assert out["per_user"]["<none>"]["seen"] is False and "<none>" in out["per_user"]
    assert set(out["per_group"]) == {"g", "h"}  # an item without a group counts overall only
    assert out["overall"]["n"] == 3 and out["overall"]["win_rate"] == pytest.approx(0.5)
    assert out["position_consistency"] == pytest.approx(2 / 3)
    assert "mean_distinct_token_share" not in u1  # only when the shares are given
    shared = aggregate(items, rows, [3, 4, 5, 6], [1, 1, 1, 1], {}, n_boot=0, run_distinct=[0.5, 1.0, 0.25, 0.75],
                       baseline_distinct=[1.0, 1.0, 0.5, 0.5])
    assert shared["per_user"]["u1"]["mean_distinct_token_share"] == {"run": 0.75, "baseline": 1.0}
    assert shared["per_group"]["h"]["mean_distinct_token_share"] == {"run": 0.25, "baseline": 0.5}
    assert shared["overall"]["mean_distinct_token_share"] == {"run": 0.625, "baseline": 0.75}
    with pytest.raises(ValueError, match="one share per outcome"):
        aggregate(items, rows, [3, 4, 5, 6], [1, 1, 1, 1], {}, n_boot=0, run_distinct=[0.5], baseline_distinct=[1.0])


# ------------------------------------------------------------------------------------------------ verdicts, judges


def test_verdict_parsing_is_strict():
    assert parse_verdict("A is more helpful. [[A]]") == "A"
    assert parse_verdict("[[B]]") == "B" and parse_verdict("My verdict: [[C]]") == "tie"
    assert parse_verdict("[[A]] ... so, again, [[A]]") == "A"  # the same tag twice is one verdict
    for bad in ("Assistant A is better.", "[[A]] or [[B]]", "[[D]]", "[A]", "", None):
        assert parse_verdict(bad) == "invalid", bad


def test_both_orders_rule():
    assert combine_orders("A", "B") == ("win", True)  # run first: A; run second: B
    assert combine_orders("B", "A") == ("loss", True)
    assert combine_orders("tie", "tie") == ("tie", True)
    assert combine_orders("A", "A") == ("tie", False)  # position bias: a disagreement is a tie
    assert combine_orders("A", "tie") == ("tie", False)
    assert combine_orders("invalid", "B") == ("invalid", None)


def _gen(texts):
    return [Generated(t, [], True) for t in texts]


def test_a_judge_that_always_says_a_gives_ties_and_zero_consistency():
    items = [Item(f"p{i}", "u", None, None) for i in range(4)]
    run, base = _gen(["good one", "good two", "same", "good four"]), _gen(["bad", "bad", "same", "bad"])
    biased = AlwaysA()
    rows = judge_items(biased, items, run, base)
    assert [r["outcome"] for r in rows] == ["tie"] * 4
    assert len(biased.asked) == 6  # three differing items, both orders; the identical answers are not asked
    assert rows[2]["identical"] and rows[2]["verdicts"] == {}
    assert rows[0]["verdicts"] == {"run_as_a": "A", "run_as_b": "A"}
    out = aggregate(items, rows, [2, 2, 1, 2], [1, 1, 1, 1], {}, n_boot=10)
    assert out["position_consistency"] == 0.0 and out["overall"]["win_rate"] == 0.5
    fair = PrefersGood()
    rows = judge_items(fair, items, run, base)
    assert [r["outcome"] for r in rows] == ["win", "win", "tie", "win"]
    assert aggregate(items, rows, [2, 2, 1, 2], [1, 1, 1, 1], {}, n_boot=10)["position_consistency"] == 1.0


def test_length_rule_per_user_with_ties():
    judge = LengthJudge(prefer_short_users("prefer_short=b,c"))
    short, long = "one two", "one two three four five"
    got = [j.verdict for j in judge.judge([q("b", short, long), q("b", long, short), q("a", short, long),
                                           q(None, short, long), q("a", "x y", "z w"), q("c", long, short)])]
    assert got == ["A", "B", "B", "B", "tie", "B"]  # unknown users and user None prefer the longer answer
    assert judge.judge([q("b", short, long)])[0].detail == {"words_a": 2, "words_b": 5}
    assert not judge.position_sensitive


@pytest.mark.parametrize("spec, match", [("bogus:x", "unknown judge"), ("length", "unknown judge"),
                                         ("length:prefer_long=a", "prefer_short"),
                                         ("length:prefer_short=a,,b", "empty"), ("rm:", "nothing after"),
                                         ("openai:localhost:8000", "http")])
def test_bad_judge_specs(spec, match):
    with pytest.raises(JudgeSpecError, match=match):
        parse_judge_spec(spec)


def test_templates_and_template_files(tmp_path):
    for t in BUILTIN.values():  # the built-ins pass the checks a FILE must pass
        check_placeholders(t.system + t.user, t.name)
    assert BUILTIN["psoups"].needs_user_text and BUILTIN["prism"].needs_user_text
    assert not BUILTIN["mtbench"].needs_user_text
    system, user = BUILTIN["prism"].render("Q{x}?", "a {b}", "c", "a teacher in Lagos")
    assert "a teacher in Lagos" in user and "Q{x}?" in user and "a {b}" in user and "[[A]]" in system
    with pytest.raises(TemplateError, match="user_text"):
        BUILTIN["psoups"].render("q", "a", "b", None)
    good = tmp_path / "good.txt"
    good.write_text("As {user_text}: {prompt}\nA: {answer_a}\nB: {answer_b}\nJSON {{}}. Say [[A]], [[B]] or [[C]].")
    t = load_template(str(good))
    assert t.needs_user_text and t.render("q", "a", "b", "me")[1].startswith("As me: q")
    for text, match in [("{prompt} {answer_a} [[A]] [[B]]", r"missing placeholder\(s\) \{answer_b\}"),
                        ("{prompt} {answer_a} {answer_b} {answer} [[A]] [[B]]", r"unknown placeholder\(s\) \{answer\}"),
                        ("{prompt} {answer_a} {answer_b} } [[A]] [[B]]", "not a valid template"),
                        ("{prompt!r} {answer_a} {answer_b} [[A]] [[B]]", "format spec or conversion"),
                        ("{prompt} {answer_a} {answer_b} answer A or B", r"\[\[A\]\]")]:
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(TemplateError, match=match) as info:
            load_template(str(bad))
        assert str(bad) in str(info.value)
    with pytest.raises(TemplateError, match="neither a built-in"):
        load_template(str(tmp_path / "missing.txt"))


def test_rm_judge_gives_mirrored_verdicts_when_the_answers_swap(runs):
    from evaluation.judges import RewardModelJudge

    judge = RewardModelJudge(runs["rm"], "cpu")
    queries = [Query("Tell me about tea (7).", u, None, "Tea matter.",
                     "Tea matter for many reasons, and here are several details about tea worth knowing.", True, e)
               for u in ("a", "b", "unseen") for e in (True, False)]
    forward = judge.judge(queries)
    backward = judge.judge([x.swapped() for x in queries])
    mirror = {"A": "B", "B": "A", "tie": "tie"}
    for f, b in zip(forward, backward):
        assert b.verdict == mirror[f.verdict]
        assert b.detail["reward_a"] == pytest.approx(f.detail["reward_b"], abs=1e-5)
        assert b.detail["reward_b"] == pytest.approx(f.detail["reward_a"], abs=1e-5)
    direct = judge.reward.score([queries[0].prompt], [queries[0].answer_a], ["a"])
    assert forward[0].detail["reward_a"] == pytest.approx(float(direct[0]), abs=1e-5)  # scored for the query's user
    assert forward[4].detail["rm_user"] == "<generic>"
    assert forward[0].verdict == ("A" if forward[0].detail["reward_a"] > forward[0].detail["reward_b"] else "B")


# ------------------------------------------------------------------------------------------------ openai judge


def test_openai_judge_parses_counts_invalid_retries_and_caches(stub, tmp_path):
    from evaluation.openai_judge import OpenAIJudge

    stub["script"] = ["Both fine, but [[B]].", "I prefer the first one.", (500, ""), "[[A]]", "[[C]]"]
    judge = OpenAIJudge(stub["url"], "judge-model", load_template("mtbench"), cache_dir=tmp_path / "cache",
                        backoff_s=0.01)
    queries = [q("u", "first answer", "second answer", prompt=f"question {i}") for i in range(4)]
    got = judge.judge(queries)
    assert [j.verdict for j in got] == ["B", "invalid", "A", "tie"]  # the 500 was retried, the prose not guessed
    assert len(stub["requests"]) == 5 and judge.n_requests == 5
    body = stub["requests"][0]
    assert body["model"] == "judge-model" and body["temperature"] == 0
    assert body["messages"][0]["role"] == "system" and "question 0" in body["messages"][1]["content"]
    assert "first answer" in body["messages"][1]["content"]
    judge.close()
    again = OpenAIJudge(stub["url"], "judge-model", load_template("mtbench"), cache_dir=tmp_path / "cache")
    assert [j.verdict for j in again.judge(queries)] == ["B", "invalid", "A", "tie"]
    assert len(stub["requests"]) == 5 and again.n_cached == 4  # every reply from the cache, no request
    again.judge([queries[0].swapped()])  # another order is another question
    assert len(stub["requests"]) == 6
    again.close()
    other = OpenAIJudge(stub["url"], "another-model", load_template("mtbench"), cache_dir=tmp_path / "cache")
    other.judge(queries[:1])  # another judge model: not the cached reply
    assert len(stub["requests"]) == 7
    other.close()


def test_openai_judge_gives_up_after_bounded_retries(stub, tmp_path):
    from evaluation.openai_judge import OpenAIJudge

    stub["script"] = [(503, "")] * 3
    judge = OpenAIJudge(stub["url"], "m", load_template("mtbench"), cache_dir=tmp_path / "c", max_retries=2,
                        backoff_s=0.01)
    with pytest.raises(JudgeError, match="after 3 attempts"):
        judge.judge([q("u", "a", "b")])
    assert len(stub["requests"]) == 3
    stub["script"] = [(404, "")]
    with pytest.raises(JudgeError, match="m"):  # not transient: no retry
        judge.judge([q("u", "a", "b")])
    assert len(stub["requests"]) == 4
    judge.close()
    down = OpenAIJudge("http://127.0.0.1:9/v1", "m", load_template("mtbench"), max_retries=1, backoff_s=0.01,
                       timeout_s=2)  # nothing listens on port 9: connection refused, retried once
    with pytest.raises(JudgeError, match="after 2 attempts"):
        down.judge([q("u", "a", "b")])
    assert down.n_requests == 2


def test_openai_judge_through_the_pipeline_both_orders_and_cache(stub, runs, tmp_path):
    out = tmp_path / "wr"
    result = run_winrate(runs["pdpo"], runs["sft"], runs["prompts"], f"openai:{stub['url']}", out, n_boot=50,
                         max_new_tokens=6, judge_model="stub-judge", template="mtbench", report_to="none",
                         judge_options={"backoff_s": 0.01})
    lines = [json.loads(x) for x in (out / "judgments.jsonl").read_text().splitlines()]
    asked = [x for x in lines if not x["identical"]]
    assert asked, "the tiny runs should not answer everything alike"
    # both orders of every differing item; mtbench ignores the user, so two users' identical pairs are one question
    questions = {(x["prompt"], x["run_answer"], x["baseline_answer"]) for x in asked}
    assert len(stub["requests"]) == 2 * len(questions)
    assert result["judge_calls"] == {"n_requests": 2 * len(questions), "n_cached": 2 * (len(asked) - len(questions))}
    assert all(x["verdicts"] == {"run_as_a": "A", "run_as_b": "A"} and x["outcome"] == "tie" for x in asked)
    assert result["position_consistency"] == 0.0 and result["overall"]["win_rate"] == 0.5
    assert result["judge_model"] == "stub-judge" and result["template"] == "mtbench"
    assert (out / "judge_cache" / "verdicts.sqlite").exists()
    again = run_winrate(runs["pdpo"], runs["sft"], runs["prompts"], f"openai:{stub['url']}", out, n_boot=50,
                        max_new_tokens=6, judge_model="stub-judge", template="mtbench", report_to="none")
    assert len(stub["requests"]) == 2 * len(questions)  # the rerun is answered from the cache
    assert again["judge_calls"] == {"n_requests": 0, "n_cached": 2 * len(asked)}
    assert again["per_user"] == result["per_user"]  # deterministic: greedy answers, seeded bootstrap


def test_invalid_verdicts_are_excluded_from_n_and_reported(stub, runs, tmp_path):
    stub["default"] = "no idea"
    out = tmp_path / "wr"
    result = run_winrate(runs["pdpo"], runs["sft"], runs["prompts"], f"openai:{stub['url']}", out, n_boot=20,
                         max_new_tokens=6, judge_model="m", report_to="none")
    n_asked = runs["n_items"] - result["identical"]
    assert n_asked and stub["requests"]
    assert result["invalid"] == n_asked and result["n"] == result["identical"]  # only the identical pairs count
    assert "invalid verdict" in (out / "report.md").read_text()


# ------------------------------------------------------------------------------------------------ hf judge, CLI


def test_hf_judge_on_tiny_random_end_to_end(runs, tmp_path):
    out = tmp_path / "wr"
    result = run_winrate(runs["pdpo"], runs["sft"], runs["prompts"], "hf:tiny-random", out, n_boot=50,
                         max_new_tokens=6, template="mtbench", report_to="none")
    assert result["position_sensitive"] and result["judge_model"] == "tiny-random"
    lines = [json.loads(x) for x in (out / "judgments.jsonl").read_text().splitlines()]
    asked = [x for x in lines if not x["identical"]]
    assert asked and result["n_consistency"] == len(asked)
    for x in asked:
        assert set(x["verdicts"]) == {"run_as_a", "run_as_b"}
        d = x["detail"]["run_as_a"]
        assert x["verdicts"]["run_as_a"] == ("A" if d["logp_a"] > d["logp_b"] else "B")
        assert 0.0 < d["p_letters"] <= 1.0
    assert result["invalid"] == 0 and result["n"] == runs["n_items"]


def test_hf_judge_reads_the_letter_after_the_answer_start():
    """A batched, left-padded judge gives the letters the same log-probabilities as one query alone."""
    import torch

    from evaluation.hf_judge import HFJudge

    judge = HFJudge("tiny-random", load_template("mtbench"), "cpu", batch_size=4)
    queries = [q("u", "short", "a much longer answer " * 3), q("u", "x", "y")]
    batched = judge.judge(queries)
    alone = judge.judge(queries[1:])
    assert batched[1].detail["logp_a"] == pytest.approx(alone[0].detail["logp_a"], abs=1e-4)
    ids = judge._prompt_ids(queries[1])
    with torch.no_grad():
        logp = torch.log_softmax(judge.lm(torch.tensor([ids])).logits[0, -1], -1)
    assert alone[0].detail["logp_b"] == pytest.approx(float(logp[judge.letter_ids[1]]), abs=1e-4)
    assert judge.tokenizer.decode(ids[-2:]) == "[["


def _schema_ok(row):
    assert {"win", "tie", "loss", "n", "win_rate", "ci95"} <= set(row)
    assert row["n"] == row["win"] + row["tie"] + row["loss"]
    assert row["win_rate"] == pytest.approx((row["win"] + 0.5 * row["tie"]) / row["n"])
    assert row["ci95"][0] <= row["win_rate"] <= row["ci95"][1]


def test_cli_end_to_end_length_judge(runs, tmp_path, monkeypatch, capsys):
    import wandb

    inits = []

    class FakeRun:  # stands in for wandb: records what the stage logged, writes nothing
        summary = {}

        def log(self, *a, **k):
            inits.append(("log", a))

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: inits.append(kw) or FakeRun())
    out = tmp_path / "wr"
    argv = ["--run", str(runs["pdpo"]), "--baseline", str(runs["sft"]), "--prompts", str(runs["prompts"]),
            "--judge", "length:prefer_short=b,zz", "--out", str(out), "--n-boot", "200", "--max-new-tokens", "8",
            "--report-to", "wandb"]
    assert main(argv) == 0
    assert '"overall"' in capsys.readouterr().out
    w = json.loads((out / "winrate.json").read_text())
    assert {"run", "baseline", "judge", "n", "per_user", "per_group", "overall", "position_consistency"} <= set(w)
    assert w["judge"] == "length:prefer_short=b,zz" and w["position_consistency"] is None
    assert w["n"] == runs["n_items"] == w["n_items"]  # the duplicate record is one item
    assert set(w["per_user"]) == {"a", "b", "zz"} and set(w["per_group"]) == {"majority", "minority"}
    for row in [*w["per_user"].values(), *w["per_group"].values(), w["overall"]]:
        _schema_ok(row)
    assert w["per_user"]["a"]["seen"] and w["per_user"]["b"]["seen"] and not w["per_user"]["zz"]["seen"]
    assert w["per_user"]["b"]["group"] == "minority" and set(w["per_user"]["b"]["mean_words"]) == {"run", "baseline"}
    assert "lc_win_rate" not in w["overall"]  # the length rule is the length: nothing to control for
    lines = [json.loads(x) for x in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(lines) == runs["n_items"]
    for x in lines:  # every outcome follows the rule from the recorded word counts
        rw, bw = x["run_words"], x["baseline_words"]
        want = "tie" if rw == bw else ("win" if (rw < bw) == (x["user"] in ("b", "zz")) else "loss")
        assert x["outcome"] == want, x
    assert sum(x["outcome"] == "win" for x in lines if x["user"] == "b") == w["per_user"]["b"]["win"]
    b_lines = [x for x in lines if x["user"] == "b"]
    for side in ("run", "baseline"):  # each answer's distinct-token share, averaged per user
        assert all(0 < x[f"{side}_distinct_token_share"] <= 1 for x in lines)
        assert w["per_user"]["b"]["mean_distinct_token_share"][side] == pytest.approx(
            sum(x[f"{side}_distinct_token_share"] for x in b_lines) / len(b_lines))
    report = (out / "report.md").read_text()
    assert "## Per user" in report and "| zz | minority | False |" in report and "distinct (run)" in report
    assert (out / "plots" / "win_rate_per_user.png").stat().st_size > 0
    init = next(x for x in inits if isinstance(x, dict))
    assert init["job_type"] == "winrate" and init["group"] == runs["pdpo"].parent.name  # the experiment's group
    assert any(x[0] == "log" for x in inits if isinstance(x, tuple))
    quiet = tmp_path / "quiet"
    inits.clear()
    assert main(argv[:-2] + ["--out", str(quiet), "--report-to", "none", "--n-boot", "0"]) == 0
    assert not inits and not (quiet / "wandb").exists() and not (quiet / "metrics_log.jsonl").exists()
    assert json.loads((quiet / "winrate.json").read_text())["overall"]["ci95"] is None


def _with_rm_run(src: Path, dst: Path, rm_run: str) -> Path:
    """A copy of a policy run whose run.json says it was trained against `rm_run` (what train_ppo records)."""
    shutil.copytree(src, dst)
    info = json.loads((dst / "run.json").read_text())
    info["rm_run"] = rm_run
    (dst / "run.json").write_text(json.dumps(info))
    return dst


def test_rm_judge_refuses_the_rm_the_policy_was_trained_against(runs, tmp_path, capsys, monkeypatch):
    policy = _with_rm_run(runs["pdpo"], tmp_path / "ppo_like", str(runs["rm"].resolve()))
    monkeypatch.chdir(runs["rm"].parent)  # the judge named by a relative path is the same folder
    argv = ["--run", str(runs["sft"]), "--baseline", str(policy), "--prompts", str(runs["prompts"]),
            "--judge", "rm:rm", "--out", str(tmp_path / "wr"), "--n-boot", "20", "--max-new-tokens", "4",
            "--report-to", "none"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(runs["rm"].resolve()) in err and str(policy) in err
    assert "--allow-same-rm" in err and not (tmp_path / "wr").exists()
    assert main(argv + ["--allow-same-rm"]) == 0
    w = json.loads((tmp_path / "wr" / "winrate.json").read_text())
    assert w["judge"] == "rm:rm" and w["position_consistency"] is None and "lc_win_rate" in w["overall"]
    lines = [json.loads(x) for x in (tmp_path / "wr" / "judgments.jsonl").read_text().splitlines()]
    for x in lines:
        if not x["identical"]:  # the run's answer was A: a higher reward for A is a win
            d = x["detail"]["run_as_a"]
            assert x["outcome"] == ("win" if d["reward_a"] > d["reward_b"] else
                                    "loss" if d["reward_b"] > d["reward_a"] else "tie")


def test_cli_errors_are_one_line_and_exit_2(runs, tmp_path, capsys):
    base = ["--baseline", str(runs["sft"]), "--prompts", str(runs["prompts"]), "--out", str(tmp_path / "o")]
    bad_template = tmp_path / "t.txt"
    bad_template.write_text("Question {prompt}, answer {answer_a}. [[A]] or [[B]]?")
    cases = [
        (["--run", str(runs["pdpo"]), "--judge", "vibes:high"], "unknown judge"),
        (["--run", str(tmp_path / "nope"), "--judge", "length:prefer_short=b"], "--run"),
        (["--run", str(runs["rm"]), "--judge", "length:prefer_short=b"], "not a policy run"),
        (["--run", str(runs["pdpo"]), "--judge", "rm:" + str(runs["pdpo"])], "not a finished train_rm run"),
        (["--run", str(runs["pdpo"]), "--judge", "openai:http://127.0.0.1:9/v1", "--judge-model", "m",
          "--template", str(bad_template)], str(bad_template)),
        (["--run", str(runs["pdpo"]), "--judge", "openai:http://127.0.0.1:9/v1"], "--judge-model"),
        (["--run", str(runs["pdpo"]), "--judge", "openai:http://127.0.0.1:9/v1", "--judge-model", "m",
          "--template", "psoups"], "user_text"),
        (["--run", str(runs["pdpo"]), "--judge", "hf:" + str(tmp_path / "no_model")], "--judge hf:"),
        (["--run", str(runs["pdpo"]), "--judge", "length:prefer_short=b", "--template", "mtbench"], "--template"),
    ]
    for args, match in cases:
        assert main(base + args) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("winrate: error:") and match in err, (args, err)
    missing = tmp_path / "missing.jsonl"
    assert main(["--run", str(runs["pdpo"]), "--baseline", str(runs["sft"]), "--prompts", str(missing),
                 "--judge", "length:prefer_short=b", "--out", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(toy_rows(1)[0]) + "\n{not json\n")
    assert main(["--run", str(runs["pdpo"]), "--baseline", str(runs["sft"]), "--prompts", str(broken),
                 "--judge", "length:prefer_short=b", "--out", str(tmp_path / "o")]) == 2
    assert f"{broken}:2" in capsys.readouterr().err  # file and line
    assert not (tmp_path / "o").exists()  # nothing written for a refused call


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for opt in ("--run", "--baseline", "--prompts", "--judge", "--out", "--n-boot", "--max-new-tokens", "--sample",
                "--seed", "--judge-model", "--template", "--allow-same-rm", "--batch-size", "--cache-dir",
                "length:prefer_short", "rm:RUN_DIR", "openai:BASE_URL", "hf:MODEL", "psoups", "prism", "mtbench"):
        assert opt in text, opt


def test_sampled_answers_are_seeded(runs, tmp_path):
    kw = dict(n_boot=0, max_new_tokens=6, sample=True, report_to="none")
    a = run_winrate(runs["pdpo"], runs["sft"], runs["prompts"], "length:prefer_short=b", tmp_path / "a", seed=3, **kw)
    b = run_winrate(runs["pdpo"], runs["sft"], runs["prompts"], "length:prefer_short=b", tmp_path / "b", seed=3, **kw)
    assert (tmp_path / "a" / "judgments.jsonl").read_text() == (tmp_path / "b" / "judgments.jsonl").read_text()
    assert a["decoding"] == {"sample": True, "seed": 3, "max_new_tokens": 6} and a["per_user"] == b["per_user"]
