"""`python -m pipelines.compare RUN_DIR [RUN_DIR ...] --out DIR`

One table and one set of plots across runs of any route: per-user and per-group accuracy (RM route and DPO route
side by side, with their vanilla baselines), generic-user accuracy, mean response length per user (reference/SFT,
vanilla DPO, P-DPO, PPO, generic user: the seed's Figure 3) and training cost. Writes report.md, comparison.json
and plots/*.png.

Each RUN_DIR's own metrics.json is read: a training run folder gives its end-of-training evaluation, an `evaluate`
output folder (RUN_DIR/eval by default) that evaluation. A `train_sft` run adds its policy's response length as the
reference. Runs are labelled by folder name, with as many parent folders as it takes to tell them apart
(`rm/eval`, `pdpo/eval`).

Win rates (`pipelines.winrate`) join the report where a folder has them: its own winrate.json (a winrate output
folder given directly; it may have no metrics.json), else FOLDER/winrate/winrate.json (the convention: `winrate
--out RUN_DIR/winrate`), else, for an evaluation folder inside a run (no run.json of its own, its parent has one:
RUN_DIR/eval), RUN_DIR/winrate/winrate.json. Shown per group with 95% intervals, the baseline and the judge.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from common import plots


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Folder names, lengthened by parent folders until no two runs share a label (every table is keyed by it)."""
    resolved = [Path(d).resolve() for d in run_dirs]
    for d in resolved:
        if resolved.count(d) > 1:
            raise ValueError(f"{d} is given more than once")
    depth = 1
    while True:
        labels = ["/".join(d.parts[-depth:]) for d in resolved]
        if len(set(labels)) == len(labels):
            return labels
        depth += 1


WINRATE_FILE = "winrate.json"


def find_winrate(folder: Path) -> Path | None:
    """The winrate.json that belongs to a compared folder (see the module doc for the convention), or None."""
    folder = Path(folder)
    candidates = [folder / WINRATE_FILE, folder / "winrate" / WINRATE_FILE]
    if not (folder / "run.json").exists() and (folder.parent / "run.json").exists():  # RUN_DIR/eval
        candidates.append(folder.parent / "winrate" / WINRATE_FILE)
    return next((c for c in candidates if c.is_file()), None)


def load_run_summary(run_dir: Path, label: str | None = None) -> dict:
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    winrate_path = find_winrate(run_dir)
    if not metrics_path.exists() and winrate_path is None:
        raise FileNotFoundError(f"{run_dir}: no metrics.json (evaluate the run first) and no winrate.json")
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    winrate = None
    if winrate_path is not None:
        try:
            winrate = json.loads(winrate_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{winrate_path}: not valid JSON ({exc})") from None
        winrate["source"] = str(winrate_path)
    return {"label": label or run_dir.name, "dir": str(run_dir), "route": metrics.get("route") or info.get("route"),
            "user_model": (info.get("user_model") or {}).get("kind"), "metrics": metrics, "info": info,
            "winrate": winrate}


def _win_rates(runs: list[dict]) -> tuple[dict, dict]:
    """({label: what the run was compared with, its overall and per-group rows}, {group: {label: win rate}})."""
    details, per_group = {}, {}
    for r in runs:
        w = r.get("winrate")
        if not w:
            continue
        keep = ("win_rate", "ci95", "n", "lc_win_rate")
        overall = w.get("overall") or {}
        details[r["label"]] = {"baseline": w.get("baseline"), "judge": w.get("judge"), "source": w.get("source"),
                               "position_consistency": w.get("position_consistency"),
                               "overall": {k: overall.get(k) for k in keep if k in overall},
                               "per_group": {g: {k: v.get(k) for k in keep if k in v}
                                             for g, v in (w.get("per_group") or {}).items()}}
        shares = {u: (v.get("mean_distinct_token_share") or {}).get("run") for u, v in (w.get("per_user") or {}).items()}
        shares = {u: x for u, x in shares.items() if x is not None}
        if shares:  # a word-counting judge prefers a long loop: the judged answers' least varied user says if it won one
            low = min(shares, key=shares.get)
            details[r["label"]]["lowest_distinct_token_share"] = {"user": low, "share": shares[low]}
        for g, v in [*(w.get("per_group") or {}).items(), ("all users", overall)]:
            per_group.setdefault(g, {})[r["label"]] = v.get("win_rate")
    return details, per_group


def _reference_words(r: dict) -> float | None:
    """Mean response words of the policy every personalized one starts from: a `train_sft` run's own policy, or the
    reference an evaluated policy run decoded next to its users."""
    gen = r["metrics"].get("generation") or {}
    if r["route"] == "sft":
        return (gen.get("mean_response_words") or {}).get("<sft>")
    return (gen.get("users") or {}).get("<reference>")


def build_comparison(runs: list[dict]) -> dict:
    scored = [r for r in runs if "per_user" in r["metrics"]]  # a train_sft run ranks no pairs
    users: list[str] = []
    for r in scored:
        users += [u for u in r["metrics"]["per_user"] if u not in users]
    table = {u: {r["label"]: r["metrics"]["per_user"].get(u, {}).get("accuracy") for r in scored} for u in users}
    groups = sorted({g for r in scored for g in r["metrics"].get("per_group", {})})
    per_group = {g: {r["label"]: r["metrics"]["per_group"].get(g, {}).get("accuracy") for r in scored}
                 for g in groups}
    margin = {g: {r["label"]: r["metrics"]["per_group"].get(g, {}).get("mean_margin") for r in scored}
              for g in groups}
    generic = {r["label"]: (r["metrics"].get("generic") or {}).get("accuracy") for r in scored}
    lengths: dict[str, dict[str, float]] = {}
    length_by_group: dict[str, dict[str, float]] = {}
    for r in scored:
        gen = r["metrics"].get("generation")
        if not gen:
            continue
        lengths[r["label"]] = {u: w for u, w in gen.get("users", {}).items() if u != "<reference>"}
        length_by_group[r["label"]] = dict(gen.get("per_group", {}))
        if "<generic>" in gen.get("users", {}):
            length_by_group[r["label"]]["generic user"] = gen["users"]["<generic>"]
    # Runs from different SFT policies (or decoded differently) have different references: one row each then.
    references = {r["label"]: w for r in runs if (w := _reference_words(r)) is not None}
    same = len({round(w, 3) for w in references.values()}) <= 1
    reference_words = next(iter(references.values()), None) if same else None
    for lab, w in references.items():
        length_by_group.setdefault("reference (SFT)" if same else f"reference of {lab}", {})["all users"] = w
    degeneracy = {}  # run -> "group: tokens / distinct-1" (words alone cannot tell "." from "BBBBBBBB")
    for r in runs:
        gen = r["metrics"].get("generation") or {}
        toks, distinct = gen.get("response_tokens_per_group"), gen.get("distinct_token_share_per_group")
        if toks and distinct:
            degeneracy[r["label"]] = {g: f"{toks[g]:.1f} / {distinct.get(g, float('nan')):.2f}" for g in toks}
    cost = {}
    for r in runs:
        if not r["metrics"]:  # a winrate output folder given on its own: no training to report
            continue
        t = r["metrics"].get("training") or {}
        cost[r["label"]] = {"route": r["route"], "user_model": r["user_model"], "train_wall_s": t.get("train_wall_s"),
                            "tokens_per_s": t.get("tokens_per_s"),
                            "trainable_parameters": t.get("trainable_parameters"),
                            "user_model_parameters": t.get("user_model_parameters"),
                            "llm_parameters": t.get("llm_parameters")}
    win_rate, win_rate_per_group = _win_rates(runs)
    return {"runs": [{k: r[k] for k in ("label", "dir", "route", "user_model")} for r in runs],
            "per_user_accuracy": table, "per_group_accuracy": per_group, "per_group_mean_margin": margin,
            "generic_accuracy": generic,
            "response_words": lengths, "response_words_by_group": length_by_group,
            "reference_response_words": reference_words, "reference_response_words_by_run": references,
            "response_tokens_and_distinct_by_group": degeneracy,
            "cost": cost, "win_rate": win_rate, "win_rate_per_group": win_rate_per_group}


def _fmt(x, d=3):
    return "-" if x is None else (f"{x:.{d}f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x))


def _md_table(rows: dict[str, dict], cols: list[str], first: str, digits: int = 3) -> list[str]:
    out = [f"| {first} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key, vals in rows.items():
        out.append(f"| {key} | " + " | ".join(_fmt(vals.get(c), digits) for c in cols) + " |")
    return out


def _win_rate_section(comp: dict) -> list[str]:
    """Win rate per group (95% interval) of each run that has a winrate.json, and what it was compared with."""
    details = comp.get("win_rate") or {}
    if not details:
        return []
    cols = list(details)
    rows = {}
    for g, vals in comp["win_rate_per_group"].items():
        row = {}
        for lab in cols:
            v = details[lab]["overall"] if g == "all users" else details[lab]["per_group"].get(g)
            ci = (v or {}).get("ci95")
            row[lab] = None if not v or v.get("win_rate") is None else \
                f"{v['win_rate']:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
        rows[g] = row
    lines = ["", "## Win rate against a baseline (pipelines.winrate)", "",
             "(win + tie / 2) / n per group with its 95% bootstrap interval; 0.5 is no difference.", ""]
    lines += _md_table(rows, cols, "group")
    lines += [""] + [f"- `{lab}`: against `{d['baseline']}`, judge `{d['judge']}`" +
                     (f", position consistency {d['position_consistency']:.3f}"
                      if d.get("position_consistency") is not None else "") +
                     (f"; judged answers' distinct-token share, lowest user {low['user']} {low['share']:.3f}"
                      if (low := d.get("lowest_distinct_token_share")) else "") + f" (`{d['source']}`)"
                     for lab, d in details.items()]
    return lines


def write_report(comp: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    labels = list(comp["generic_accuracy"])  # the runs that rank pairs (not a train_sft run)
    series_user = {lab: {u: v.get(lab) for u, v in comp["per_user_accuracy"].items()} for lab in labels}
    pngs = [plots.grouped_bars(series_user, out / "plots" / "accuracy_per_user.png",
                               "held-out accuracy per user", "accuracy", (0, 1.05))]
    series_group = {lab: {g: v.get(lab) for g, v in comp["per_group_accuracy"].items()} for lab in labels}
    if comp["per_group_accuracy"]:
        pngs.append(plots.grouped_bars(series_group, out / "plots" / "accuracy_per_group.png",
                                       "held-out accuracy per group", "accuracy", (0, 1.05)))
    if comp["response_words"]:
        refs = {row: v["all users"] for row, v in comp["response_words_by_group"].items()
                if row.startswith("reference")}
        pngs.append(plots.grouped_bars(comp["response_words"], out / "plots" / "response_words_per_user.png",
                                       "mean greedy response length per user", "words", hlines=refs or None))
        pngs.append(plots.grouped_bars(comp["response_words_by_group"], out / "plots" / "response_words_per_group.png",
                                       "mean greedy response length per group", "words"))
    if comp.get("win_rate_per_group"):
        series_wr = {lab: {g: v.get(lab) for g, v in comp["win_rate_per_group"].items()} for lab in comp["win_rate"]}
        pngs.append(plots.grouped_bars(series_wr, out / "plots" / "win_rate_per_group.png",
                                       "win rate against each run's baseline, per group", "win rate", (0, 1.05),
                                       hlines={"no difference": 0.5}))
    lines = ["# Comparison", "", "Runs: " + ", ".join(f"`{r['label']}` ({r['route']}, {r['user_model']})"
                                                         if r["route"] else f"`{r['label']}` (win rates only)"
                                                         for r in comp["runs"]), "",
             "## Accuracy per group (held-out pairs)", ""]
    if comp["per_group_accuracy"]:
        lines += _md_table(comp["per_group_accuracy"], labels, "group") + [""]
    else:
        lines += ["The records carry no `group`.", ""]
    lines += ["Every pair scored as the generic user 0: " +
              ", ".join(f"{k} {_fmt(v)}" for k, v in comp["generic_accuracy"].items()), ""]
    if any(v is not None for row in comp.get("per_group_mean_margin", {}).values() for v in row.values()):
        lines += ["Mean margin per group (chosen minus rejected: RM reward for the RM route, beta * log-ratio for "
                  "the DPO and PPO routes, so compare within a route): how sure each model is, which accuracy "
                  "hides.", ""]
        lines += _md_table(comp["per_group_mean_margin"], labels, "group") + [""]
    lines += ["## Accuracy per user", ""]
    lines += _md_table(comp["per_user_accuracy"], labels, "user")
    lines += _win_rate_section(comp)
    if comp["response_words_by_group"]:
        cols = sorted({c for v in comp["response_words_by_group"].values() for c in v})
        lines += ["", "## Mean response length (words, greedy, held-out prompts)", ""]
        lines += _md_table(comp["response_words_by_group"], cols, "run", 1)
    if comp.get("response_tokens_and_distinct_by_group"):
        deg = comp["response_tokens_and_distinct_by_group"]
        cols = sorted({c for v in deg.values() for c in v})
        lines += ["", "Tokens per response / share of distinct tokens per response (distinct-1; a degenerate run of "
                  "one token scores near 0, an answer near 1):", ""]
        lines += _md_table(deg, cols, "run")
    lines += ["", "## Training cost", "", "| run | route | user model | wall s | tokens/s | trainable params | "
              "user-model params | LLM params |", "|---|---|---|---|---|---|---|---|"]
    for lab, c in comp["cost"].items():
        lines.append(f"| {lab} | {c['route']} | {c['user_model']} | {_fmt(c['train_wall_s'], 0)} | "
                     f"{_fmt(c['tokens_per_s'], 0)} | {_fmt(c['trainable_parameters'])} | "
                     f"{_fmt(c['user_model_parameters'])} | {_fmt(c['llm_parameters'])} |")
    lines += [""] + [f"![{p.stem}](plots/{p.name})" for p in pngs]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    tmp = out / "comparison.json.tmp"
    tmp.write_text(json.dumps(comp, indent=1))
    os.replace(tmp, out / "comparison.json")
    return out / "report.md"


def compare(run_dirs: list[str | Path], out: str | Path) -> dict:
    comp = build_comparison([load_run_summary(Path(d), label)
                             for d, label in zip(run_dirs, run_labels([Path(d) for d in run_dirs]))])
    write_report(comp, Path(out))
    return comp


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (each with metrics.json)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        compare(args.runs, args.out)
    except (FileNotFoundError, json.JSONDecodeError, ValueError) as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    print((Path(args.out) / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
