"""Adapters: public per-annotator preference files -> contract records.

Each adapter is `read_<source>(paths, **options) -> (list[PreferenceRecord], AdapterReport)`; `ADAPTERS` maps
the source names used by `python -m pipelines.prepare_data SOURCE` to them:

    tldr           OpenAI summarize_from_feedback comparisons, real per-worker labels
    tldr-length    the same comparisons relabelled by length: the seed's section 5.1 simulation
    psoups         P-SOUPS pairs, one user per preference profile P1A..P3B
    prism          PRISM survey.jsonl + conversations.jsonl, user text from the survey
    mtbench-human  MT-Bench human pairwise judgments (human_gpt_comparison.zip), one user per judge
    summary-prefs  MTurk biography-summary preferences with worker demographics as user text
"""

from __future__ import annotations

from typing import Callable

from preference_data.adapters.base import AdapterReport
from preference_data.adapters.mtbench import read_mtbench, read_mtbench_human
from preference_data.adapters.prism import read_prism
from preference_data.adapters.psoups import read_psoups
from preference_data.adapters.summary_prefs import read_summary_prefs
from preference_data.adapters.tldr import read_tldr, read_tldr_length

ADAPTERS: dict[str, Callable] = {
    "tldr": read_tldr,
    "tldr-length": read_tldr_length,
    "psoups": read_psoups,
    "prism": read_prism,
    "mtbench-human": read_mtbench_human,
    "summary-prefs": read_summary_prefs,
}


def get_adapter(source: str) -> Callable:
    try:
        return ADAPTERS[source]
    except KeyError:
        raise ValueError(f"unknown source {source!r}; known: {', '.join(ADAPTERS)}") from None


__all__ = ["ADAPTERS", "AdapterReport", "get_adapter", "read_tldr", "read_tldr_length", "read_psoups",
           "read_prism", "read_mtbench", "read_mtbench_human", "read_summary_prefs"]
