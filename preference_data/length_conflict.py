"""The embedded length-conflict task (seed section 5.1), built from a corpus shipped with the package.

Every corpus item is a prompt with a one-sentence "short" answer and a 3-4 sentence "long" answer (about 5x
the words). Users `user_1` .. `user_10` annotate the same prompts; the minority (`user_4`, `user_5`, `user_6`)
always prefers the short answer, the majority the long one, so the data contains conflicting preferences that a
single (non-personalised) reward cannot satisfy. No download: the corpus is `assets/length_conflict_corpus.jsonl`.

The split is by prompt: held-out eval prompts never appear in training.

Two options make the task test *length* rather than two fixed lengths:
- `with_medium=True` adds a third answer per prompt, the long answer's first sentence (8-34 words, median 18), and
  trains on every pair of the three: each user's preference is then graded (short < medium < long), not a step
  between "about 9 words" and "about 50 words". Held-out records stay short vs long.
- `long_answer_records()` builds a held-out set from a second corpus whose answers are 2-3x longer (short 10-30
  words, long 80-150; `assets/length_conflict_long_answers.jsonl`, 30 prompts none of which is in the main
  corpus): a model that learned "about 9 words wins" instead of "shorter wins" fails it.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from preference_data.io import write_jsonl
from preference_data.records import DataError, PreferenceRecord

MINORITY_USERS = ("user_4", "user_5", "user_6")
DEFAULT_USERS = tuple(f"user_{i}" for i in range(1, 11))

CORPUS_PATH = Path(__file__).parent / "assets" / "length_conflict_corpus.jsonl"
LONG_ANSWERS_PATH = Path(__file__).parent / "assets" / "length_conflict_long_answers.jsonl"
_CORPUS_FIELDS = ("prompt", "short", "long")


def load_corpus(path: str | os.PathLike | None = None) -> list[dict]:
    """The corpus items, in file order: dicts with "prompt", "short", "long" (and "topic").

    Raises DataError naming file and line for a malformed item or a repeated prompt.
    """
    path = Path(path) if path is not None else CORPUS_PATH
    if not path.exists():
        raise DataError(f"{path}: length-conflict corpus not found")
    items: list[dict] = []
    seen: dict[str, int] = {}
    with path.open("r", encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            for key in _CORPUS_FIELDS:
                value = obj.get(key)
                if not isinstance(value, str) or not value.strip():
                    raise DataError(f"{path}:{lineno}: field '{key}' must be a non-empty string")
            if obj["short"] == obj["long"]:
                raise DataError(f"{path}:{lineno}: fields 'short' and 'long' are identical")
            if obj["prompt"] in seen:
                raise DataError(f"{path}:{lineno}: prompt repeats line {seen[obj['prompt']]}")
            seen[obj["prompt"]] = lineno
            items.append(obj)
    return items


def _record(item: dict, user: str, minority: frozenset[str], shorter: str = "short",
            longer: str = "long") -> PreferenceRecord:
    """The minority prefers the shorter of two answers, the majority the longer."""
    short, long = item[shorter], item[longer]
    if user in minority:
        return PreferenceRecord(item["prompt"], short, long, user, None, "minority")
    return PreferenceRecord(item["prompt"], long, short, user, None, "majority")


def medium_answer(long: str) -> str:
    """The long answer's first sentence: a complete answer of middle length (the corpus's long answers open with
    the answer itself, then add detail)."""
    first = re.split(r"(?<=[.!?])\s+", long.strip(), maxsplit=1)[0]
    return first if first != long.strip() else long.strip()


# (shorter, longer) answer pairs of one prompt: the classic pair, and with the medium answer all three
PAIRS = (("short", "long"),)
PAIRS_WITH_MEDIUM = (("short", "long"), ("short", "medium"), ("medium", "long"))


def _check_users(users: Sequence[str], minority: Sequence[str]) -> tuple[tuple[str, ...], frozenset[str]]:
    if isinstance(users, str) or isinstance(minority, str):
        raise ValueError("users and minority must be sequences of user ids, not a single string")
    users = tuple(users)
    if not users:
        raise ValueError("users must not be empty")
    bad = [u for u in users if not isinstance(u, str) or not u.strip()]
    if bad:
        raise ValueError(f"user ids must be non-empty strings, got {bad!r}")
    dup = sorted(u for u, n in Counter(users).items() if n > 1)
    if dup:
        raise ValueError(f"users contains duplicates: {dup}")
    missing = [u for u in minority if u not in users]
    if missing:
        raise ValueError(f"minority users {missing} are not among users {list(users)}")
    return users, frozenset(minority)


def make_length_conflict(
    n_train_prompts: int | None = None,
    n_eval_prompts: int = 30,
    users: Sequence[str] = DEFAULT_USERS,
    minority: Sequence[str] = MINORITY_USERS,
    pairs_per_user: int | None = None,
    seed: int = 0,
    corpus: list[dict] | None = None,
    with_medium: bool = False,
) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """(train, eval) records of the length-conflict task.

    The corpus prompts are shuffled with `seed`; the first `n_eval_prompts` are held out for eval and the next
    `n_train_prompts` (default: all the rest) are for training, so no prompt is in both and the eval prompts do
    not depend on `n_train_prompts`. Each user annotates every training prompt, or with `pairs_per_user` a seeded
    random subset of that many; every user annotates every eval prompt. Minority users choose the short answer
    (group "minority"), the others the long one (group "majority"). Both lists are shuffled with `seed`.
    `with_medium` trains on the three pairs of short, medium (the long answer's first sentence) and long answers
    per (prompt, user) instead of one; held-out records are short vs long either way.
    """
    users, minority_set = _check_users(users, minority)
    items = load_corpus() if corpus is None else list(corpus)
    if isinstance(n_eval_prompts, bool) or not isinstance(n_eval_prompts, int) or n_eval_prompts < 0:
        raise ValueError(f"n_eval_prompts must be an integer >= 0, got {n_eval_prompts!r}")
    available = len(items) - n_eval_prompts
    if available < 1:
        raise ValueError(f"n_eval_prompts={n_eval_prompts} leaves no training prompts: the corpus has "
                         f"{len(items)} prompts")
    if n_train_prompts is None:
        n_train_prompts = available
    elif isinstance(n_train_prompts, bool) or not isinstance(n_train_prompts, int) or n_train_prompts < 1:
        raise ValueError(f"n_train_prompts must be an integer >= 1 (or None for all), got {n_train_prompts!r}")
    elif n_train_prompts > available:
        raise ValueError(f"requested {n_train_prompts} train + {n_eval_prompts} eval prompts, but the corpus has "
                         f"only {len(items)} prompts")
    if pairs_per_user is not None:
        if isinstance(pairs_per_user, bool) or not isinstance(pairs_per_user, int) or pairs_per_user < 1:
            raise ValueError(f"pairs_per_user must be an integer >= 1 (or None for all), got {pairs_per_user!r}")
        if pairs_per_user > n_train_prompts:
            raise ValueError(f"pairs_per_user={pairs_per_user} exceeds the {n_train_prompts} training prompts")

    rng = random.Random(seed)
    order = list(range(len(items)))
    rng.shuffle(order)
    eval_items = [items[i] for i in order[:n_eval_prompts]]
    train_items = [items[i] for i in order[n_eval_prompts:n_eval_prompts + n_train_prompts]]

    pairs = PAIRS_WITH_MEDIUM if with_medium else PAIRS
    if with_medium:
        train_items = [{**item, "medium": medium_answer(item["long"])} for item in train_items]
    train: list[PreferenceRecord] = []
    for user in users:
        chosen_items = train_items
        if pairs_per_user is not None:
            # Per-user stream (str seeds are stable across runs), so one user's subset does not depend on others.
            chosen_items = random.Random(f"length-conflict:{seed}:{user}").sample(train_items, pairs_per_user)
        train.extend(_record(item, user, minority_set, a, b) for item in chosen_items for a, b in pairs)
    evals = [_record(item, user, minority_set) for user in users for item in eval_items]
    rng.shuffle(train)
    random.Random(f"length-conflict-eval:{seed}").shuffle(evals)  # its own stream: the same with or without medium
    return train, evals


def long_answer_records(users: Sequence[str] = DEFAULT_USERS, minority: Sequence[str] = MINORITY_USERS,
                        seed: int = 0, corpus: list[dict] | None = None,
                        n_prompts: int | None = None) -> list[PreferenceRecord]:
    """Held-out records of every user on every prompt of the long-answer corpus (short 10-30 words, long 80-150;
    no prompt of the main corpus), shuffled with `seed`; `n_prompts` keeps the first N prompts of the file."""
    users, minority_set = _check_users(users, minority)
    items = load_corpus(LONG_ANSWERS_PATH) if corpus is None else list(corpus)
    if n_prompts is not None:
        if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or not 1 <= n_prompts <= len(items):
            raise ValueError(f"n_prompts must be an integer in [1, {len(items)}], got {n_prompts!r}")
        items = items[:n_prompts]
    records = [_record(item, user, minority_set) for user in users for item in items]
    random.Random(seed).shuffle(records)
    return records


def write_long_answer_set(out_dir: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """Write `eval.jsonl` of `long_answer_records(**kwargs)` into `out_dir`; return a summary."""
    records = long_answer_records(**kwargs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: output must be a folder, found a file")
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(records, out / "eval.jsonl")
    return {"eval": _summary(records), "minority": [u for u in kwargs.get("users", DEFAULT_USERS)
                                                    if u in set(kwargs.get("minority", MINORITY_USERS))]}


def _summary(records: list[PreferenceRecord]) -> dict[str, Any]:
    return {
        "records": len(records),
        "prompts": len({r.prompt for r in records}),
        "groups": dict(sorted(Counter(r.group for r in records).items())),
    }


def write_length_conflict(out_dir: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """Write `train.jsonl` and `eval.jsonl` of `make_length_conflict(**kwargs)` into `out_dir`; return a summary."""
    train, evals = make_length_conflict(**kwargs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: output must be a folder, found a file")
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(evals, out / "eval.jsonl")
    users = list(kwargs.get("users", DEFAULT_USERS))
    minority = [u for u in users if u in set(kwargs.get("minority", MINORITY_USERS))]
    return {
        "train": _summary(train),
        "eval": _summary(evals),
        "users": users,
        "minority": minority,
        "seed": kwargs.get("seed", 0),
    }
