"""Per-user / per-group reward accuracy in the contract's metrics.json schema. Pure functions over margins."""

from __future__ import annotations

from collections import defaultdict

import torch

from preference_data.records import PreferenceRecord
from preference_data.vocab import UserVocab

NO_USER = "<none>"


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
    correct = (margins > 0).tolist()
    per_user: dict[str, list] = defaultdict(list)
    per_group: dict[str, list] = defaultdict(list)
    groups: dict[str, str | None] = {}
    has_text: dict[str, bool] = {}
    for rec, ok in zip(records, correct):
        key = user_key(rec)
        per_user[key].append(ok)
        groups.setdefault(key, rec.group)
        has_text[key] = has_text.get(key, False) or bool(rec.user_text)
        if rec.group is not None:
            per_group[rec.group].append(ok)
    out = {
        "route": route,
        "overall": _acc(correct),
        "generic": _acc((generic_margins > 0).tolist()) if generic_margins is not None else None,
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
    for rec, ok in zip(records, correct):
        seen = rec.user_id is not None and rec.user_id in vocab
        tag = ("seen" if seen else "unseen") + ("_with_text" if rec.user_text else "_without_text")
        by_seen[tag].append(ok)
        by_seen["seen" if seen else "unseen"].append(ok)
    out["per_seen"] = {k: _acc(v) for k, v in sorted(by_seen.items())}
    if generic_margins is not None:
        gen_groups: dict[str, list] = defaultdict(list)
        for rec, ok in zip(records, (generic_margins > 0).tolist()):
            if rec.group is not None:
                gen_groups[rec.group].append(ok)
        out["generic_per_group"] = {g: _acc(v) for g, v in sorted(gen_groups.items())}
    return out


def _acc(values: list) -> dict:
    n = len(values)
    return {"accuracy": (sum(values) / n) if n else None, "n": n}


def _natural(key: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def words(text: str) -> int:
    return len(text.split())
