"""PRISM (Kirk et al. 2024) `survey.jsonl` + `conversations.jsonl` -> records (seed section 5.3).

conversations.jsonl: {"conversation_id", "user_id", "conversation_history": [{"turn": int, "role": "user" |
"model", "content": str, "if_chosen": bool, "model_name", "score", "within_turn_id", ...}, ...], ...}.
At each turn the user writes one message and rates several model responses; the chosen one continues the
conversation. Every turn with exactly one chosen response (identical duplicates count as one) and at least one
non-chosen response gives one comparison per non-chosen response.

prompt: the user's message at that turn; with `with_context=True`, the earlier turns too (each earlier user
message and its chosen response) as "User: ...\\n\\nAssistant: ...\\n\\nUser: <this turn>".

survey.jsonl: {"user_id", "self_description", "order_stated_prefs", "age", "gender", "education",
"employment_status", "marital_status", "english_proficiency", ...}. With `with_user_text=True` (default) each
record's user_text is one compact sentence from the demographics, self description and the top three stated
preferences (missing values and "Prefer not to say" are left out). Records of users absent from the survey get
user_text None (counted in `extra["users_without_survey"]`).

Files are told apart by content (a record with `conversation_history` is a conversation, others survey rows),
so they may be given in any order. `n_read` counts conversations; drops count turns ("no_user_message",
"no_chosen", "several_chosen", "no_rejected") or pairs ("identical_responses", "empty_text").
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from preference_data.adapters.base import (AdapterReport, as_paths, format_dialogue, get_id, get_str,
                                           iter_json_records, require_mapping)
from preference_data.records import DataError, PreferenceRecord

DEMOGRAPHICS = (
    ("age", "Age"),
    ("gender", "Gender"),
    ("education", "Education"),
    ("employment_status", "Employment"),
    ("marital_status", "Marital status"),
    ("english_proficiency", "English proficiency"),
)
_MODEL_ROLES = ("model", "assistant")


def _present(value: Any) -> str | None:
    """A survey answer worth writing, or None (missing, NaN, empty, "Prefer not to say")."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    text = str(value).strip()
    if not text or text.lower() in ("prefer not to say", "nan", "none", "null"):
        return None
    return text


def _sentence(label: str, value: str) -> str:
    value = value.strip()
    return f"{label}: {value}" + ("" if value.endswith((".", "!", "?")) else ".")


def top_stated_prefs(order: Any, k: int = 3) -> list[str]:
    """The k most important stated preferences: `order_stated_prefs` is {aspect: rank (1 = first)} in the
    public file (a ranked list is also accepted); "other" and unranked aspects are skipped."""
    if isinstance(order, Mapping):
        ranked = []
        for name, rank in order.items():
            try:
                rank = float(rank)
            except (TypeError, ValueError):
                continue
            if math.isnan(rank) or str(name).lower() == "other":
                continue
            ranked.append((rank, str(name)))
        return [name for _, name in sorted(ranked)[:k]]
    if isinstance(order, (list, tuple)):
        return [str(x) for x in order if _present(x) and str(x).lower() != "other"][:k]
    return []


def prism_user_text(survey: Mapping) -> str | None:
    parts = []
    for key, label in DEMOGRAPHICS:
        value = _present(survey.get(key))
        if value:
            parts.append(_sentence(label, value))
    desc = _present(survey.get("self_description"))
    if desc:
        parts.append(_sentence("Self-description", " ".join(desc.split())))
    prefs = top_stated_prefs(survey.get("order_stated_prefs"))
    if prefs:
        parts.append(_sentence("Most important in AI responses", ", ".join(prefs)))
    return " ".join(parts) or None


def _turns(history: Any, where: str) -> list[tuple[int, list[Mapping]]]:
    """conversation_history grouped by turn, in order of first appearance."""
    if not isinstance(history, list):
        raise DataError(f"{where}: field 'conversation_history' must be a list, got {type(history).__name__}")
    groups: dict[int, list[Mapping]] = {}
    current = -1
    for i, entry in enumerate(history):
        label = f"conversation_history[{i}]"
        entry = require_mapping(entry, where, label)
        role = get_str(entry, "role", where, label=f"{label}.role").strip().lower()
        get_str(entry, "content", where, label=f"{label}.content")
        if "turn" in entry and entry["turn"] is not None:
            turn = entry["turn"]
            if isinstance(turn, bool) or not isinstance(turn, int):
                raise DataError(f"{where}: field '{label}.turn' must be an integer, got {turn!r}")
        else:  # no turn numbers: a user message opens the next turn
            turn = current + 1 if role == "user" else max(current, 0)
        current = turn
        if role not in ("user",) + _MODEL_ROLES:
            raise DataError(f"{where}: field '{label}.role' must be 'user' or 'model', got {role!r}")
        if role in _MODEL_ROLES and not isinstance(entry.get("if_chosen"), bool):
            raise DataError(f"{where}: field '{label}.if_chosen' must be true or false, "
                            f"got {entry.get('if_chosen')!r}")
        groups.setdefault(turn, []).append(entry)
    return list(groups.items())


def read_prism(paths: Sequence[str], *, with_user_text: bool = True,
               with_context: bool = False) -> tuple[list[PreferenceRecord], AdapterReport]:
    report = AdapterReport("prism")
    surveys: dict[str, Mapping] = {}
    conversations: list[tuple[str, Mapping]] = []
    for path in as_paths(paths):
        for where, obj in iter_json_records(path):
            obj = require_mapping(obj, where)
            if "conversation_history" in obj:
                conversations.append((where, obj))
            else:
                surveys[get_id(obj, "user_id", where)] = obj
    if with_user_text and not surveys:
        raise DataError("prism: no survey records (survey.jsonl) among the inputs; give it, "
                        "or turn user text off (with_user_text=False / --no-user-text)")
    texts: dict[str, str | None] = {}
    records = []
    n_turns = 0
    users_without_survey = set()
    for where, conv in conversations:
        report.n_read += 1
        user_id = get_id(conv, "user_id", where)
        user_text = None
        if with_user_text:
            if user_id not in surveys:
                users_without_survey.add(user_id)
            elif user_id not in texts:
                texts[user_id] = prism_user_text(surveys[user_id])
            user_text = texts.get(user_id)
        context: list[tuple[str, str]] = []
        for _turn, entries in _turns(conv.get("conversation_history"), where):
            n_turns += 1
            users = [e["content"].strip() for e in entries if e["role"].strip().lower() == "user"]
            models = [e for e in entries if e["role"].strip().lower() in _MODEL_ROLES]
            chosen = list(dict.fromkeys(e["content"].strip() for e in models if e["if_chosen"]))
            rejected = [e["content"].strip() for e in models if not e["if_chosen"]]
            message = "\n\n".join(u for u in users if u)
            if not message:
                report.drop("no_user_message")
                continue
            if len(chosen) == 1:
                turns = context + [("user", message)] if with_context else [("user", message)]
                prompt = format_dialogue(turns)
                if with_context and context:
                    report.related_prompts[prompt] = format_dialogue(context[:1])
                if not rejected:
                    report.drop("no_rejected")
                for rej in rejected:
                    if not chosen[0] or not rej:
                        report.drop("empty_text")
                    elif rej == chosen[0]:
                        report.drop("identical_responses")
                    else:
                        records.append(PreferenceRecord(prompt, chosen[0], rej, user_id, user_text))
                context += [("user", message), ("assistant", chosen[0])]
            else:
                report.drop("no_chosen" if not chosen else "several_chosen")
                context.append(("user", message))
    report.n_written = len(records)
    report.extra.update({
        "n_users": len({r.user_id for r in records}),
        "n_survey_users": len(surveys),
        "n_turns": n_turns,
        "users_without_survey": len(users_without_survey),
    })
    return records, report
