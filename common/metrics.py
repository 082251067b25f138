"""Per-user / per-group reward accuracy in the contract's metrics.json schema. Pure functions over margins."""

from __future__ import annotations

from collections import defaultdict

import torch

from preference_data.records import PreferenceRecord
from preference_data.vocab import UserVocab

NO_USER = "<none>"


def distinct_token_share(token_ids) -> float:
    """Distinct tokens / tokens of one answer (distinct-1; 1.0 for an empty one): a word count can be fooled by a
    run of one token ("ZZZZ..." is one word), this share cannot. It falls with length even for real text (the
    demo's real 50-word answers: about 0.8), so compare answers of similar length."""
    ids = list(token_ids)
    return len(set(ids)) / len(ids) if ids else 1.0


def user_key(record: PreferenceRecord) -> str:
    return record.user_id if record.user_id is not None else NO_USER


def accuracy_metrics(route: str, records: list[PreferenceRecord], vocab: UserVocab, margins: torch.Tensor,
                     generic_margins: torch.Tensor | None = None, response_words: dict[str, float] | None = None,
                     ) -> dict:
    """`margins[i] > 0` means pair i was ranked right for its user; `generic_margins` scores every pair as user 0.

    Ties (margin exactly 0) count as wrong: a model that cannot tell the responses apart is not right.
    """
    if len(records) != len(margins):
        raise ValueError(f"{len(records)} records but {len(margins)} margins")
    pairs = _judged(margins)
    per_user: dict[str, list] = defaultdict(list)
    per_group: dict[str, list] = defaultdict(list)
    groups: dict[str, str | None] = {}
    has_text: dict[str, bool] = {}
    for rec, (ok, m) in zip(records, pairs):
        key = user_key(rec)
        per_user[key].append((ok, m))
        groups.setdefault(key, rec.group)
        has_text[key] = has_text.get(key, False) or bool(rec.user_text)
        if rec.group is not None:
            per_group[rec.group].append((ok, m))
    generic_pairs = _judged(generic_margins) if generic_margins is not None else None
    out = {
        "route": route,
        "overall": _acc(pairs),
        "generic": _acc(generic_pairs) if generic_pairs is not None else None,
        "per_user": {},
        "per_group": {g: _acc(v) for g, v in sorted(per_group.items())},
    }
    for key in sorted(per_user, key=_natural):
        seen = key in vocab
        out["per_user"][key] = {**_acc(per_user[key]), "seen": seen, "group": groups[key],
                                "has_text": has_text[key],
                                "mean_response_words": (response_words or {}).get(key)}
    # Seen vs unseen users (unseen are scored with the generic embedding + their text, if any).
    by_seen: dict[str, list] = defaultdict(list)
    for rec, (ok, m) in zip(records, pairs):
        seen = rec.user_id is not None and rec.user_id in vocab
        tag = ("seen" if seen else "unseen") + ("_with_text" if rec.user_text else "_without_text")
        by_seen[tag].append((ok, m))
        by_seen["seen" if seen else "unseen"].append((ok, m))
    out["per_seen"] = {k: _acc(v) for k, v in sorted(by_seen.items())}
    if generic_margins is not None:
        gen_groups: dict[str, list] = defaultdict(list)
        for rec, pair in zip(records, generic_pairs):
            if rec.group is not None:
                gen_groups[rec.group].append(pair)
        out["generic_per_group"] = {g: _acc(v) for g, v in sorted(gen_groups.items())}
    return out


def _judged(margins: torch.Tensor) -> list[tuple[bool, float]]:
    """(ranked right, margin) per pair; a tie (margin exactly 0) is wrong."""
    return list(zip((margins > 0).tolist(), margins.float().tolist()))


def _acc(pairs: list[tuple[bool, float]]) -> dict:
    """Accuracy of (correct, margin) pairs and their mean margin (TRL's `rewards/margins`): how sure the model is,
    which accuracy alone hides (a user ranked right by a hair gives PPO almost nothing to learn from)."""
    n = len(pairs)
    if not n:
        return {"accuracy": None, "n": 0, "mean_margin": None}
    return {"accuracy": sum(ok for ok, _ in pairs) / n, "n": n, "mean_margin": sum(m for _, m in pairs) / n}


def _natural(key: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def words(text: str) -> int:
    return len(text.split())
