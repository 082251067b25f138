"""Judges: who says which of two answers is better for a user.

Every judge takes `Query`s (a prompt, the user, answer A and answer B) and returns one `Judgment` per query: a
verdict "A", "B", "tie" or "invalid" plus what it was based on (`detail`, written to judgments.jsonl).
`position_sensitive` says whether the order of A and B could change the verdict; the caller then asks both orders
(`evaluation.winrate`).

Specs (`--judge`):
- `length:prefer_short=U1,U2,...`: the listed users prefer the answer with fewer words, everyone else the one with
  more; equal word counts tie. Position-insensitive.
- `rm:RUN_DIR`: a finished train_rm run scores both answers for the user (unseen users: the generic user 0); equal
  rewards tie. Position-insensitive.
- `openai:BASE_URL`: an OpenAI-compatible chat endpoint with `--judge-model` and `--template`
  (`evaluation.openai_judge`). Position-sensitive.
- `hf:MODEL`: a local causal LM (`common.models.load_causal_lm`: `tiny-random`, `smollm2-135m`, a folder) reading
  the verdict letter's log-probability (`evaluation.hf_judge`). Position-sensitive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

KINDS = ("length", "rm", "openai", "hf")
USAGE = "length:prefer_short=U1,U2,... | rm:RUN_DIR | openai:BASE_URL | hf:MODEL"


class JudgeSpecError(ValueError):
    """A --judge spec (or an option it needs) that cannot work; the message names the argument."""


class JudgeError(RuntimeError):
    """A judge failed while judging (an endpoint that stays down after the retries); cached replies are kept."""


@dataclass(frozen=True)
class Query:
    prompt: str
    user_id: str | None
    user_text: str | None
    answer_a: str
    answer_b: str
    ended_a: bool = True  # the answer ended with EOS (False: cut at max_new_tokens); the RM scores the two apart
    ended_b: bool = True

    def swapped(self) -> "Query":
        return Query(self.prompt, self.user_id, self.user_text, self.answer_b, self.answer_a, self.ended_b,
                     self.ended_a)


@dataclass
class Judgment:
    verdict: str  # "A" | "B" | "tie" | "invalid"
    detail: dict = field(default_factory=dict)


class Judge(Protocol):
    name: str  # the spec, as winrate.json reports it
    position_sensitive: bool

    def judge(self, queries: list[Query]) -> list[Judgment]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class JudgeSpec:
    kind: str
    arg: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}"


def parse_judge_spec(spec: str) -> JudgeSpec:
    """Split and check a --judge value (no file is read, no model loaded)."""
    kind, sep, arg = (spec or "").partition(":")
    if not sep or kind not in KINDS:
        raise JudgeSpecError(f"--judge {spec!r}: unknown judge (use {USAGE})")
    if not arg:
        raise JudgeSpecError(f"--judge {spec!r}: nothing after '{kind}:' (use {USAGE})")
    if kind == "length":
        prefer_short_users(arg)  # raises on a malformed list
    if kind == "openai" and not arg.startswith(("http://", "https://")):
        raise JudgeSpecError(f"--judge {spec!r}: BASE_URL must start with http:// or https:// "
                             "(e.g. openai:http://127.0.0.1:8000/v1)")
    return JudgeSpec(kind, arg)


def prefer_short_users(arg: str) -> frozenset[str]:
    key, sep, users = arg.partition("=")
    if key != "prefer_short" or not sep:
        raise JudgeSpecError(f"--judge length:{arg}: expected length:prefer_short=U1,U2,... (the users who prefer "
                             "the shorter answer)")
    names = [u.strip() for u in users.split(",")]
    if not users or any(not u for u in names):
        raise JudgeSpecError(f"--judge length:{arg}: empty user id in the list (write prefer_short=U1,U2)")
    return frozenset(names)


def words(text: str) -> int:
    """Whitespace-separated words: the length the demo reports, the length rule compares, the LC rate controls."""
    return len(text.split())


class LengthJudge:
    """The length-conflict task's ground truth: `prefer_short` users want fewer words, the others more."""

    position_sensitive = False

    def __init__(self, prefer_short: frozenset[str]):
        self.prefer_short = frozenset(prefer_short)
        self.name = "length:prefer_short=" + ",".join(sorted(self.prefer_short))

    def judge(self, queries: list[Query]) -> list[Judgment]:
        out = []
        for q in queries:
            wa, wb = words(q.answer_a), words(q.answer_b)
            if wa == wb:
                verdict = "tie"
            else:
                a_shorter = wa < wb
                verdict = "A" if a_shorter == (q.user_id in self.prefer_short) else "B"
            out.append(Judgment(verdict, {"words_a": wa, "words_b": wb}))
        return out

    def close(self) -> None:
        pass


class RewardModelJudge:
    """A personalized RM as the judge: r(x, A, u) against r(x, B, u) for the query's user, each answer scored with
    its own EOS state (as PPO scored it)."""

    position_sensitive = False

    def __init__(self, rm_run: str | Path, device, batch_size: int = 16):
        from policy.ppo.roles import load_reward_role

        self.rm_run = Path(rm_run)
        self.name = f"rm:{rm_run}"
        self.reward = load_reward_role(self.rm_run, device)
        self.batch_size = batch_size

    def judge(self, queries: list[Query]) -> list[Judgment]:
        if not queries:
            return []
        n = len(queries)
        # A and B of every query in one call: rows 0..n-1 are the A answers, n..2n-1 the B answers
        scores = self.reward.score([q.prompt for q in queries] * 2,
                                   [q.answer_a for q in queries] + [q.answer_b for q in queries],
                                   [q.user_id for q in queries] * 2,
                                   ended=[q.ended_a for q in queries] + [q.ended_b for q in queries],
                                   user_texts=[q.user_text for q in queries] * 2, batch_size=self.batch_size).tolist()
        out = []
        for i, q in enumerate(queries):
            ra, rb = scores[i], scores[n + i]
            verdict = "A" if ra > rb else "B" if rb > ra else "tie"
            out.append(Judgment(verdict, {"reward_a": ra, "reward_b": rb,
                                          "rm_user": q.user_id if q.user_id in self.reward.vocab else "<generic>"}))
        return out

    def close(self) -> None:
        pass


def check_rm_judge_run(rm_run: str) -> Path:
    """The folder of a finished train_rm run, or JudgeSpecError naming --judge (reads no model)."""
    from reward.model import rm_run_problem

    problem = rm_run_problem(rm_run)
    if problem:
        raise JudgeSpecError(f"--judge rm:{rm_run}: {problem}")
    return Path(rm_run)


def build_judge(spec: JudgeSpec, *, device, judge_model: str | None = None, template: str | None = None,
                cache_dir: str | Path | None = None, batch_size: int = 16, **openai_options) -> Judge:
    """The judge of a parsed spec, with everything it needs loaded (an RM, an LM, an HTTP client)."""
    if spec.kind in ("length", "rm") and (judge_model or template):
        raise JudgeSpecError(f"--judge {spec}: --judge-model and --template are for the openai: and hf: judges")
    if spec.kind == "length":
        return LengthJudge(prefer_short_users(spec.arg))
    if spec.kind == "rm":
        return RewardModelJudge(check_rm_judge_run(spec.arg), device, batch_size)
    from evaluation.templates import load_template

    tmpl = load_template(template or "mtbench")
    if spec.kind == "openai":
        from evaluation.openai_judge import OpenAIJudge

        if not judge_model:
            raise JudgeSpecError(f"--judge {spec}: --judge-model NAME is required (the endpoint's model name)")
        return OpenAIJudge(spec.arg, judge_model, tmpl, cache_dir=cache_dir, **openai_options)
    from evaluation.hf_judge import HFJudge

    if judge_model:
        raise JudgeSpecError(f"--judge {spec}: the model is named in the spec (hf:MODEL); drop --judge-model")
    return HFJudge(spec.arg, tmpl, device, batch_size=batch_size)
