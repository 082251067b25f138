"""Judge verdicts: strict parsing of an LLM judge's text, and the rule that turns the verdicts of both answer orders
into one outcome for the run.

A verdict is about positions: "A" (the first answer shown is better), "B" (the second), "tie", or "invalid". An
outcome is about the run: "win", "tie", "loss", "invalid" (see `evaluation.stats`).
"""

from __future__ import annotations

import re

VERDICTS = ("A", "B", "tie", "invalid")
_TAG = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_LABEL = {"A": "A", "B": "B", "C": "tie"}


def parse_verdict(text: str | None) -> str:
    """"A", "B" or "tie" when the text holds MT-Bench's verdict tags ("[[A]]", "[[B]]", "[[C]]" = tie) of exactly one
    kind (repeating the same tag is fine); "invalid" when it holds none, or tags that disagree ("[[A]] or [[B]]").
    Never guessed from prose: "Assistant A is better" without a tag is invalid."""
    found = {_LABEL[m] for m in _TAG.findall(text or "")}
    return found.pop() if len(found) == 1 else "invalid"


def outcome_of(verdict: str, run_is_a: bool) -> str:
    """The run's outcome for one verdict, given where the run's answer was shown."""
    if verdict not in VERDICTS:
        raise ValueError(f"unknown verdict {verdict!r} (expected one of {', '.join(VERDICTS)})")
    if verdict in ("tie", "invalid"):
        return verdict
    return "win" if (verdict == "A") == run_is_a else "loss"


def combine_orders(run_as_a: str, run_as_b: str) -> tuple[str, bool | None]:
    """(outcome, consistent) from the verdicts of both orders (the run's answer shown first, then second).

    MT-Bench's rule: the orders must agree on the run's outcome, a disagreement is a tie (a judge that always picks
    the first answer gives ties only). If either verdict is invalid, the item is invalid (`consistent` None: it
    says nothing about position bias)."""
    first, second = outcome_of(run_as_a, run_is_a=True), outcome_of(run_as_b, run_is_a=False)
    if "invalid" in (first, second):
        return "invalid", None
    return (first, True) if first == second else ("tie", False)
