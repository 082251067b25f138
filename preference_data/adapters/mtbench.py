"""MT-Bench pairwise human judgments, per judge -> records.

Input: `human_gpt_comparison.zip` (the one CSV inside is read with the csv module) or that CSV itself. The
human columns are used: `judge_x` (the user), `winner_x` ("model_a" | "model_b" | "tie..."), `turn_x` (1 or 2:
which answer was judged) and `conversation_a_x` / `conversation_b_x`, each a Python-literal list of
(content, role) tuples, e.g. "[('question', 'user'), ('answer', 'assistant'), ...]" (parsed with
ast.literal_eval; a JSON list of {"role", "content"} objects is also accepted).

chosen / rejected: the two models' assistant replies at the judged turn.
prompt, turn 1: the first user question.
prompt, turn 2: "User: <q1>\\n\\nAssistant: <a1>\\n\\nUser: <q2>" when both models gave the same first answer;
otherwise (nearly always: each model saw its own first answer) "User: <q1>\\n\\nUser: <q2>". Putting one
model's first answer into the shared prompt would leak the label (the judged reply continues it), so it is
left out. `include_turn2=False` drops turn-2 judgments instead ("turn2_skipped").

Dropped: "tie", "identical_responses", "duplicate" (the CSV repeats each human judgment once per merged GPT-4
verdict: exact duplicate records are kept once), "turn2_skipped". `n_read` counts CSV rows.
"""

from __future__ import annotations

import ast
import json
from typing import Any, Sequence

from preference_data.adapters.base import AdapterReport, as_paths, dedupe, format_dialogue, iter_csv_rows
from preference_data.records import DataError, PreferenceRecord

COLUMNS = ("judge_x", "winner_x", "conversation_a_x", "conversation_b_x", "turn_x")


def parse_conversation(text: str, where: str, column: str) -> list[tuple[str, str]]:
    """[(role, content), ...] from the serialized conversation cell; never evaluates code."""
    value: Any = None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise DataError(f"{where}: column '{column}' is not a list of (content, role) turns "
                            f"(starts {text[:60]!r})") from None
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: column '{column}' must hold a list of turns, got {type(value).__name__}")
    turns = []
    for i, t in enumerate(value):
        if isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str):
            role, content = t["role"], t["content"]
        elif isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, str) for x in t):
            content, role = t
            if content in ("user", "assistant") and role not in ("user", "assistant"):
                content, role = role, content  # (role, content) order
        else:
            raise DataError(f"{where}: column '{column}' turn {i} must be (content, role), got {t!r:.80}")
        role = role.strip().lower()
        if role not in ("user", "assistant"):
            raise DataError(f"{where}: column '{column}' turn {i} has role {role!r}, expected user/assistant")
        turns.append((role, content))
    return turns


def _split(turns: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    return ([c.strip() for r, c in turns if r == "user"], [c.strip() for r, c in turns if r == "assistant"])


def read_mtbench_human(paths: Sequence[str], *, include_turn2: bool = True) -> tuple[list[PreferenceRecord], AdapterReport]:
    report = AdapterReport("mtbench-human")
    records = []
    for path in as_paths(paths):
        for where, row in iter_csv_rows(path, COLUMNS):
            report.n_read += 1
            judge = (row["judge_x"] or "").strip()
            if not judge:
                raise DataError(f"{where}: column 'judge_x' is empty")
            winner = (row["winner_x"] or "").strip().lower()
            if winner.startswith("tie"):
                report.drop("tie")
                continue
            if winner not in ("model_a", "model_b"):
                raise DataError(f"{where}: column 'winner_x' must be model_a, model_b or tie, got {winner!r}")
            try:
                turn = int(float(row["turn_x"]))
            except ValueError:
                turn = 0
            if turn not in (1, 2):
                raise DataError(f"{where}: column 'turn_x' must be 1 or 2, got {row['turn_x']!r}")
            if turn == 2 and not include_turn2:
                report.drop("turn2_skipped")
                continue
            qa, aa = _split(parse_conversation(row["conversation_a_x"], where, "conversation_a_x"))
            qb, ab = _split(parse_conversation(row["conversation_b_x"], where, "conversation_b_x"))
            for col, q, a in (("conversation_a_x", qa, aa), ("conversation_b_x", qb, ab)):
                if len(q) < turn or len(a) < turn:
                    raise DataError(f"{where}: column '{col}' has {len(q)} user / {len(a)} assistant turn(s), "
                                    f"turn_x is {turn}")
            if turn == 1:
                prompt = qa[0]
            elif aa[0] == ab[0]:
                prompt = format_dialogue([("user", qa[0]), ("assistant", aa[0]), ("user", qa[1])])
            else:
                prompt = format_dialogue([("user", qa[0]), ("user", qa[1])])
            if turn == 2:
                report.related_prompts[prompt] = qa[0]
            reply_a, reply_b = aa[turn - 1], ab[turn - 1]
            chosen, rejected = (reply_a, reply_b) if winner == "model_a" else (reply_b, reply_a)
            if not prompt or not chosen or not rejected:
                report.drop("empty_text")
                continue
            if chosen == rejected:
                report.drop("identical_responses")
                continue
            records.append(PreferenceRecord(prompt, chosen, rejected, judge))
    records = dedupe(records, report)
    report.n_written = len(records)
    report.extra["n_users"] = len({r.user_id for r in records})
    return records, report


read_mtbench = read_mtbench_human
