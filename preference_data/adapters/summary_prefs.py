"""MTurk biography-summary preferences (Batch_4248487_batch_results_reviewed.csv) -> records.

One row per assignment: `WorkerId` (the user), `Input.person`, `Input.biography`, `Input.summary_A`,
`Input.summary_B`, the one-hot answer `Answer.summary_preference.{a,b,non}` ("True"/"False"), one-hot
demographics `Answer.gender.*`, `Answer.race.*`, `Answer.age.*` and the requester's review: `Approve` ("x")
/ `Reject` (the rejection reason) and `AssignmentStatus` ("Submitted" | "Approved" | "Rejected").

prompt: "Summarize the following biography of <person>.\\n\\n<biography>\\n\\nSummary:"
user_text (`with_user_text=True`, default): e.g. "Gender: female. Age: older than 30. Race: White." One text
per worker: a worker's most frequent non-empty answer over their written records (some workers answered
differently, or not at all, across assignments).

Dropped: "rejected_assignment" (a non-empty `Reject` or status "Rejected"; `keep_rejected=True` keeps them),
"tie" (the "non" answer), "no_answer" (no preference ticked), "identical_summaries". `n_read` counts rows.
"""

from __future__ import annotations

from typing import Sequence

from preference_data.adapters.base import AdapterReport, as_paths, iter_csv_rows, most_common_first
from preference_data.records import DataError, PreferenceRecord

PREF = "Answer.summary_preference."
COLUMNS = ("WorkerId", "Input.person", "Input.biography", "Input.summary_A", "Input.summary_B",
           PREF + "a", PREF + "b", PREF + "non")
# How the one-hot column suffixes read in the user text (others: underscores become spaces).
_NAMES = {
    "age": {"younger": "younger than 30", "30": "30", "older": "older than 30"},
    "race": {"american_indian": "American Indian", "asian": "Asian", "black": "Black", "hispanic": "Hispanic",
             "white": "White"},
}
_TRUE = {"true", "1", "yes", "on", "x"}
_FALSE = {"false", "0", "no", "off", ""}


def _flag(row: dict, column: str, where: str) -> bool:
    value = (row.get(column) or "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise DataError(f"{where}: column '{column}' must be True or False, got {row.get(column)!r}")


def _demographics(row: dict, where: str) -> str | None:
    parts = []
    for key, label in (("gender", "Gender"), ("age", "Age"), ("race", "Race")):
        prefix = f"Answer.{key}."
        ticked = [c[len(prefix):] for c in row if c and c.startswith(prefix) and _flag(row, c, where)]
        if ticked:
            names = [_NAMES.get(key, {}).get(s, s.replace("_", " ")) for s in ticked]
            parts.append(f"{label}: {', '.join(names)}.")
    return " ".join(parts) or None


def summary_prompt(person: str, biography: str) -> str:
    return f"Summarize the following biography of {person.strip()}.\n\n{biography.strip()}\n\nSummary:"


def read_summary_prefs(paths: Sequence[str], *, with_user_text: bool = True,
                       keep_rejected: bool = False) -> tuple[list[PreferenceRecord], AdapterReport]:
    report = AdapterReport("summary-prefs")
    rows = []  # (prompt, chosen, rejected, worker, user text of this row)
    for path in as_paths(paths):
        for where, row in iter_csv_rows(path, COLUMNS):
            report.n_read += 1
            worker = (row["WorkerId"] or "").strip()
            if not worker:
                raise DataError(f"{where}: column 'WorkerId' is empty")
            status = (row.get("AssignmentStatus") or "").strip().lower()
            if not keep_rejected and ((row.get("Reject") or "").strip() or status == "rejected"):
                report.drop("rejected_assignment")
                continue
            a, b, non = (_flag(row, PREF + k, where) for k in ("a", "b", "non"))
            if a + b + non > 1:
                raise DataError(f"{where}: columns '{PREF}{{a,b,non}}' must be one-hot, got several ticked")
            if non:
                report.drop("tie")
                continue
            if not (a or b):
                report.drop("no_answer")
                continue
            person = (row["Input.person"] or "").strip()
            bio = (row["Input.biography"] or "").strip()
            sa, sb = (row["Input.summary_A"] or "").strip(), (row["Input.summary_B"] or "").strip()
            if not bio or not sa or not sb:
                report.drop("empty_text")
                continue
            if sa == sb:
                report.drop("identical_summaries")
                continue
            chosen, rejected = (sa, sb) if a else (sb, sa)
            text = _demographics(row, where) if with_user_text else None
            rows.append((summary_prompt(person or "a person", bio), chosen, rejected, worker, text))
    per_worker: dict[str, list[str]] = {}
    for *_, worker, text in rows:
        per_worker.setdefault(worker, [])
        if text:
            per_worker[worker].append(text)
    worker_text = {w: most_common_first(t) for w, t in per_worker.items()}
    records = [PreferenceRecord(p, c, r, w, worker_text[w] if with_user_text else None) for p, c, r, w, _ in rows]
    report.n_written = len(records)
    report.extra.update({
        "n_users": len(per_worker),
        "users_with_text": sum(1 for t in worker_text.values() if t),
        "users_with_varying_answers": sum(1 for t in per_worker.values() if len(set(t)) > 1),
    })
    return records, report
