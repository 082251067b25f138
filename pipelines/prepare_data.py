"""Turn a public per-annotator preference file into contract records (JSONL), optionally with a held-out split.

    python -m pipelines.prepare_data SOURCE --input FILE [--input FILE ...] --out OUT.jsonl
        [--eval-out EVAL.jsonl --eval-fraction 0.2] [--seed 0] [source options]

    python -m pipelines.prepare_data length-conflict --out DIR [--seed 0] [--medium-answers]
    python -m pipelines.prepare_data length-conflict --corpus long-answers --out DIR   # held-out only

Prints how many input units were read, how many records were written and how many were dropped, per reason.
Malformed input stops it with a one-line error naming the file, line/row and field, and exit code 2.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import sys
from pathlib import Path
from typing import Mapping, Sequence

from preference_data.io import write_jsonl
from preference_data.records import DataError, PreferenceRecord

SOURCES = {
    "tldr": "OpenAI summarize_from_feedback comparisons (JSON lines), real per-worker labels",
    "tldr-length": "the same comparisons relabelled by summary length for the top workers (seed section 5.1)",
    "psoups": "P-SOUPS pairs; the profile (P1A..P3B) is the user, from a 'profile' field or the file name",
    "prism": "PRISM survey.jsonl + conversations.jsonl (give both with --input)",
    "mtbench-human": "MT-Bench human judgments: human_gpt_comparison.zip (or the CSV inside)",
    "summary-prefs": "MTurk biography-summary preferences CSV with worker demographics",
    "length-conflict": "the embedded length-conflict task (preference_data.length_conflict); --out is a folder",
}

# CLI option dest -> adapter keyword (they are the same names; listed for the "does not apply" check).
SOURCE_OPTIONS = ("top_workers", "minority_share", "minority_ranks", "keep_worker_ids", "others",
                  "with_user_text", "with_context", "keep_rejected", "include_turn2")


def _ranks(text: str) -> list[int]:
    try:
        ranks = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ranks like 4,5,6, got {text!r}") from None
    if not ranks:
        raise argparse.ArgumentTypeError("expected at least one rank")
    return ranks


def build_parser() -> argparse.ArgumentParser:
    epilog = "sources:\n" + "\n".join(f"  {k:<16} {v}" for k, v in SOURCES.items())
    p = argparse.ArgumentParser(
        prog="python -m pipelines.prepare_data",
        description="Turn a public per-annotator preference file into contract comparison records "
                    "(JSON lines: prompt, chosen, rejected, user_id, user_text, group).",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", choices=list(SOURCES), help="one of: " + ", ".join(SOURCES))
    p.add_argument("--input", "-i", action="append", default=[], metavar="FILE",
                   help="input file; repeat for several files (all are read into one output)")
    p.add_argument("--out", "-o", required=True, metavar="OUT",
                   help="output JSONL file (for length-conflict: the output folder)")
    p.add_argument("--eval-out", metavar="EVAL", help="also write a held-out JSONL, split by prompt "
                   "(no prompt in both files)")
    p.add_argument("--eval-fraction", type=float, default=0.2, metavar="F",
                   help="fraction of distinct prompts held out with --eval-out (default: 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split and of the tldr-length "
                   "majority/minority draw (default: 0)")
    p.add_argument("--report-json", metavar="FILE", help="also write the adapter report (counts, drops, "
                   "tldr-length's worker -> user mapping and groups) as JSON")

    g = p.add_argument_group("source options (only where they apply)")
    S = argparse.SUPPRESS
    g.add_argument("--eval-prompts", type=int, default=15, metavar="N",
                   help="length-conflict: held-out prompts (default: 15, as the demo)")
    g.add_argument("--medium-answers", action="store_true",
                   help="length-conflict: also train on pairs with a medium answer (the long answer's first "
                        "sentence): short < medium < long, a graded preference instead of two fixed lengths "
                        "(the demo's data)")
    g.add_argument("--corpus", choices=["main", "long-answers"], default="main",
                   help="length-conflict: `long-answers` writes only DIR/eval.jsonl, every user on 30 prompts "
                        "that are not in the main corpus, with answers 2-3x longer than its (short 10-30 words, "
                        "long 80-150): checks that a model ranks length, not two fixed lengths")
    g.add_argument("--top-workers", type=int, default=S, metavar="N",
                   help="tldr-length: keep the N workers with the most annotations (default: 10)")
    g.add_argument("--minority-share", type=float, default=S, metavar="F",
                   help="tldr-length: share of kept workers drawn (seeded) into the minority that prefers "
                        "the shorter summary; rounded half up, at least 1 (default: 0.3)")
    g.add_argument("--minority-ranks", type=_ranks, default=S, metavar="R,R,..",
                   help="tldr-length: make exactly these 1-based ranks the minority instead of drawing them "
                        "(4,5,6 reproduces the seed's workers 4, 5, 6)")
    g.add_argument("--keep-worker-ids", action="store_true", default=S,
                   help="tldr-length: keep the source worker ids instead of user_1..user_N")
    g.add_argument("--others", choices=("drop", "generic"), default=S,
                   help="tldr-length: drop the other workers' pairs (default) or keep them with their real "
                        "label as the generic user (user_id null)")
    g.add_argument("--no-user-text", dest="with_user_text", action="store_false", default=S,
                   help="prism, summary-prefs: leave user_text null")
    g.add_argument("--with-context", action="store_true", default=S,
                   help="prism: put the earlier turns of the conversation into the prompt")
    g.add_argument("--keep-rejected", action="store_true", default=S,
                   help="summary-prefs: keep assignments the requester rejected (dropped by default)")
    g.add_argument("--no-turn2", dest="include_turn2", action="store_false", default=S,
                   help="mtbench-human: drop judgments of the second turn")
    return p


def split_by_prompt(records: Sequence[PreferenceRecord], fraction: float, seed: int,
                    related: Mapping[str, str] | None = None) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """(train, eval): a seeded `fraction` of the distinct prompts (at least 1, at most all but 1) goes to eval
    with all of its records, so no prompt is in both. `related` (an adapter's `related_prompts`: a later turn's
    prompt -> its conversation's first message) ties prompts together: they count as one and go to one side."""
    prompts = list(dict.fromkeys(r.prompt for r in records))
    root = {p: p for p in prompts}

    def find(p: str) -> str:
        while root[p] != p:
            p = root[p]
        return p

    for later, first in (related or {}).items():
        if later in root:
            root.setdefault(first, first)
            a, b = find(later), find(first)
            if a != b:
                root[a] = b
    units = list(dict.fromkeys(find(p) for p in prompts))  # one per conversation; a prompt alone is its own
    if len(units) < 2:
        raise DataError(f"cannot split by prompt: only {len(units)} distinct prompt(s) or conversation(s)")
    random.Random(seed).shuffle(units)
    n_eval = min(len(units) - 1, max(1, round(fraction * len(units))))
    held = set(units[:n_eval])
    is_held = {p: find(p) in held for p in prompts}
    return [r for r in records if not is_held[r.prompt]], [r for r in records if is_held[r.prompt]]


def _describe(records: Sequence[PreferenceRecord]) -> str:
    users = {r.user_id for r in records if r.user_id is not None}
    generic = sum(r.user_id is None for r in records)
    text = f"{len(records)} records, {len({r.prompt for r in records})} prompts, {len(users)} users"
    return text + (f" (+{generic} generic-user records)" if generic else "")


def _run_length_conflict(args) -> int:
    if args.input:
        raise DataError("length-conflict builds its own data: it takes no --input")
    try:  # imported lazily: only this source needs it
        from preference_data.length_conflict import write_length_conflict
    except ImportError as exc:
        raise DataError(f"length-conflict needs preference_data.length_conflict.write_length_conflict ({exc})") from None

    if args.corpus == "long-answers":
        from preference_data.length_conflict import write_long_answer_set

        result = write_long_answer_set(args.out, seed=args.seed)
    else:
        result = write_length_conflict(args.out, seed=args.seed, n_eval_prompts=args.eval_prompts,
                                       with_medium=args.medium_answers)
    print(f"length-conflict: wrote {args.out}" + (f": {result}" if result is not None else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {k: getattr(args, k) for k in SOURCE_OPTIONS if hasattr(args, k)}
    if args.source == "length-conflict":
        if given:
            parser.error(f"option(s) {', '.join('--' + k.replace('_', '-') for k in given)} do not apply "
                         "to length-conflict")
        try:
            return _run_length_conflict(args)
        except (DataError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    from preference_data.adapters import get_adapter

    adapter = get_adapter(args.source)
    accepted = inspect.signature(adapter).parameters
    wrong = [k for k in given if k not in accepted]
    if wrong:
        flags = {"with_user_text": "--no-user-text", "include_turn2": "--no-turn2"}
        names = ", ".join(flags.get(k, "--" + k.replace("_", "-")) for k in wrong)
        parser.error(f"option(s) {names} do not apply to source {args.source}")
    if not args.input:
        parser.error(f"source {args.source} needs at least one --input FILE")
    if args.eval_out and not 0.0 < args.eval_fraction < 1.0:
        parser.error(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    if "top_workers" in given and given["top_workers"] < 1:
        parser.error("--top-workers must be at least 1")
    if "minority_share" in given and not 0.0 < given["minority_share"] < 1.0:
        parser.error(f"--minority-share must be in (0, 1), got {given['minority_share']}")
    options = dict(given)
    if "seed" in accepted:
        options["seed"] = args.seed

    try:
        records, report = adapter(args.input, **options)
        if not records:
            raise DataError(f"{', '.join(args.input)}: no comparison records left ({report.summary()})")
        print(f"{args.source}: read {report.n_read}, wrote {report.n_written}, dropped {report.n_dropped}")
        for reason, n in sorted(report.dropped.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  dropped {n:>6}  {reason}")
        if args.source == "tldr-length":
            for w in report.extra["workers"]:
                print(f"  {w['user_id']:<10} {w['group']:<9} worker {w['worker']} "
                      f"({w['n_annotations']} annotations)")
            print(f"  pairs per group: {report.extra['pairs_per_group']}")
        if args.eval_out:
            train, held = split_by_prompt(records, args.eval_fraction, args.seed, report.related_prompts)
            write_jsonl(train, args.out)
            write_jsonl(held, args.eval_out)
            print(f"wrote {args.out}: {_describe(train)}")
            print(f"wrote {args.eval_out}: {_describe(held)}")
        else:
            write_jsonl(records, args.out)
            print(f"wrote {args.out}: {_describe(records)}")
        if args.report_json:
            path = Path(args.report_json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"source": args.source, "inputs": args.input, "n_read": report.n_read,
                                        "n_written": report.n_written, "dropped": report.dropped,
                                        "extra": report.extra}, indent=1, ensure_ascii=False))
    except (DataError, ValueError) as exc:  # DataError: bad input; ValueError: bad option values
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
