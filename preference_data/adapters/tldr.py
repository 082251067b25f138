"""OpenAI summarize_from_feedback `comparisons` (TL;DR / CNN-DM) -> records, and the seed's section 5.1
length-conflict simulation on those comparisons.

Input: one JSON object per line (a file holding one JSON list also works), exactly the public format:

    {"info": {"id", "post" | "article", "title", "subreddit" | "site"}, "split",
     "summaries": [{"text", "policy", "note"}, {...}], "choice": 0 | 1, "worker": str, "batch", "extra"}

Prompt (Reddit post):  "SUBREDDIT: r/<subreddit>\\nTITLE: <title>\\nPOST: <post>\\nTL;DR:"
Prompt (news article): "ARTICLE: <article>\\nTL;DR:" (with a "TITLE: <title>" line first when a title is given).
Missing subreddit / title lines are left out. `n_read` counts comparisons (lines).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any, Sequence

from preference_data.adapters.base import (AdapterReport, as_paths, get_id, get_str, iter_json_records,
                                           require_mapping, word_count)
from preference_data.records import DataError, PreferenceRecord

MAJORITY = "majority"
MINORITY = "minority"


def tldr_prompt(info: Any, where: str) -> str:
    info = require_mapping(info, where, "info")
    post = get_str(info, "post", where, label="info.post", required=False)
    article = get_str(info, "article", where, label="info.article", required=False)
    title = get_str(info, "title", where, label="info.title", required=False)
    title = title.strip() if title else ""
    if post is not None and post.strip():
        subreddit = get_str(info, "subreddit", where, label="info.subreddit", required=False)
        subreddit = (subreddit or "").strip()
        if subreddit.startswith("r/"):
            subreddit = subreddit[2:]
        lines = []
        if subreddit:
            lines.append(f"SUBREDDIT: r/{subreddit}")
        if title:
            lines.append(f"TITLE: {title}")
        lines += [f"POST: {post.strip()}", "TL;DR:"]
        return "\n".join(lines)
    if article is not None and article.strip():
        lines = [f"TITLE: {title}"] if title else []
        lines += [f"ARTICLE: {article.strip()}", "TL;DR:"]
        return "\n".join(lines)
    raise DataError(f"{where}: missing field 'info.post' (or 'info.article'), or it is empty")


def parse_comparison(obj: Any, where: str) -> tuple[str, list[str], int, str]:
    """(prompt, [summary 0, summary 1] stripped, choice, worker) of one comparison; DataError if malformed."""
    obj = require_mapping(obj, where)
    if "info" not in obj:
        raise DataError(f"{where}: missing field 'info'")
    prompt = tldr_prompt(obj["info"], where)
    summaries = obj.get("summaries")
    if not isinstance(summaries, list) or len(summaries) != 2:
        got = f"{len(summaries)} item(s)" if isinstance(summaries, list) else type(summaries).__name__
        raise DataError(f"{where}: field 'summaries' must be a list of 2 summaries, got {got}")
    texts = []
    for i, s in enumerate(summaries):
        s = require_mapping(s, where, f"summaries[{i}]")
        texts.append(get_str(s, "text", where, label=f"summaries[{i}].text").strip())
    choice = obj.get("choice")
    if isinstance(choice, bool) or choice not in (0, 1):
        raise DataError(f"{where}: field 'choice' must be 0 or 1, got {choice!r}")
    worker = get_id(obj, "worker", where)
    return prompt, texts, int(choice), worker


def _read_all(paths, report: AdapterReport) -> list[tuple[str, str, list[str], int, str]]:
    rows = []
    for path in as_paths(paths):
        for where, obj in iter_json_records(path):
            report.n_read += 1
            rows.append((where, *parse_comparison(obj, where)))
    return rows


def read_tldr(paths: Sequence[str], **options: Any) -> tuple[list[PreferenceRecord], AdapterReport]:
    """Real per-worker labels: chosen = summaries[choice], user_id = worker, group = None.

    Dropped: "identical_summaries" (same text after strip), "empty_summary".
    """
    if options:
        raise TypeError(f"read_tldr got unknown option(s): {', '.join(sorted(options))}")
    report = AdapterReport("tldr")
    records = []
    for where, prompt, texts, choice, worker in _read_all(paths, report):
        if not texts[0] or not texts[1]:
            report.drop("empty_summary")
            continue
        if texts[0] == texts[1]:
            report.drop("identical_summaries")
            continue
        records.append(PreferenceRecord(prompt, texts[choice], texts[1 - choice], worker))
    report.n_written = len(records)
    report.extra["n_users"] = len({r.user_id for r in records})
    return records, report


def rank_workers(workers: Sequence[str]) -> list[tuple[str, int]]:
    """(worker, annotation count), most annotations first, ties broken by worker id."""
    counts = Counter(workers)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def split_groups(n: int, minority_share: float, seed: int) -> set[int]:
    """Seeded choice of the minority among ranks 1..n: round(minority_share * n) of them (half up), at least 1."""
    if not 0.0 < minority_share < 1.0:
        raise ValueError(f"minority_share must be in (0, 1), got {minority_share}")
    k = min(n, max(1, math.floor(minority_share * n + 0.5)))
    return set(random.Random(seed).sample(range(1, n + 1), k))


def read_tldr_length(paths: Sequence[str], *, top_workers: int = 10, minority_share: float = 0.3, seed: int = 0,
                     keep_worker_ids: bool = False, others: str = "drop",
                     minority_ranks: Sequence[int] | None = None) -> tuple[list[PreferenceRecord], AdapterReport]:
    """The seed's controlled length-conflict simulation (section 5.1) on real comparisons.

    Workers are ranked by annotation count (ties: worker id); the top `top_workers` are kept and split, seeded,
    into a minority (`minority_share` of them, rounded half up, at least 1; or exactly `minority_ranks`, 1-based
    ranks, e.g. (4, 5, 6) as in the paper) who prefer the SHORTER summary by word count and a majority who
    prefer the longer one. Every pair of a kept worker is relabelled by length; pairs with equal word counts
    are dropped ("equal_length"). Users are renamed `user_1`..`user_N` in rank order (unless
    `keep_worker_ids`), with group "majority"/"minority". Other workers' pairs are dropped ("other_worker",
    `others="drop"`) or kept with their original label as the generic user (`others="generic"`: user_id and
    group None). `report.extra` holds `workers` (rank, worker, user_id, group, n_annotations), `mapping`
    (worker -> user_id) and `groups` (user_id -> group).
    """
    if top_workers < 1:
        raise ValueError(f"top_workers must be >= 1, got {top_workers}")
    if others not in ("drop", "generic"):
        raise ValueError(f"others must be 'drop' or 'generic', got {others!r}")
    report = AdapterReport("tldr-length")
    rows = _read_all(paths, report)
    ranked = rank_workers([r[4] for r in rows])[:top_workers]
    n = len(ranked)
    if minority_ranks is not None:
        minority = {int(r) for r in minority_ranks}
        bad = sorted(r for r in minority if not 1 <= r <= n)
        if bad:
            raise ValueError(f"minority_ranks {bad} outside 1..{n} (the kept workers)")
    else:
        minority = split_groups(n, minority_share, seed) if n else set()
    info: dict[str, tuple[str, str]] = {}  # worker -> (user_id, group)
    workers = []
    for rank, (worker, count) in enumerate(ranked, start=1):
        group = MINORITY if rank in minority else MAJORITY
        user_id = worker if keep_worker_ids else f"user_{rank}"
        info[worker] = (user_id, group)
        workers.append({"rank": rank, "worker": worker, "user_id": user_id, "group": group,
                        "n_annotations": count})

    records = []
    per_group = Counter()
    for where, prompt, texts, choice, worker in rows:
        if not texts[0] or not texts[1]:
            report.drop("empty_summary")
            continue
        if texts[0] == texts[1]:
            report.drop("identical_summaries")
            continue
        if worker not in info:
            if others == "drop":
                report.drop("other_worker")
            else:
                records.append(PreferenceRecord(prompt, texts[choice], texts[1 - choice], None))
                per_group["generic"] += 1
            continue
        user_id, group = info[worker]
        n0, n1 = word_count(texts[0]), word_count(texts[1])
        if n0 == n1:
            report.drop("equal_length")
            continue
        longer, shorter = (texts[0], texts[1]) if n0 > n1 else (texts[1], texts[0])
        chosen, rejected = (longer, shorter) if group == MAJORITY else (shorter, longer)
        records.append(PreferenceRecord(prompt, chosen, rejected, user_id, group=group))
        per_group[group] += 1
    report.n_written = len(records)
    report.extra.update({
        "workers": workers,
        "mapping": {w: v[0] for w, v in info.items()},
        "groups": {v[0]: v[1] for v in info.values()},
        "pairs_per_group": dict(per_group),
        "seed": seed,
    })
    return records, report
