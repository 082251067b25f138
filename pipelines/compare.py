"""`python -m pipelines.compare RUN_DIR [RUN_DIR ...] --out DIR`

One table and one set of plots across runs of any route: per-user and per-group accuracy (RM route and DPO route
side by side, with their vanilla baselines), generic-user accuracy, mean response length per user (reference/SFT,
vanilla DPO, P-DPO, PPO, generic user: the seed's Figure 3) and training cost. Writes report.md, comparison.json
and plots/*.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from common import plots


def load_run_summary(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.exists():
        raise FileNotFoundError(f"{run_dir}: no metrics.json (evaluate the run first)")
    metrics = json.loads(metrics_path.read_text())
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    return {"label": run_dir.name, "dir": str(run_dir), "route": metrics.get("route") or info.get("route"),
            "user_model": (info.get("user_model") or {}).get("kind"), "metrics": metrics, "info": info}


def build_comparison(runs: list[dict]) -> dict:
    users: list[str] = []
    for r in runs:
        users += [u for u in r["metrics"].get("per_user", {}) if u not in users]
    table = {u: {r["label"]: r["metrics"]["per_user"].get(u, {}).get("accuracy") for r in runs} for u in users}
    groups = sorted({g for r in runs for g in r["metrics"].get("per_group", {})})
    per_group = {g: {r["label"]: r["metrics"]["per_group"].get(g, {}).get("accuracy") for r in runs} for g in groups}
    margin = {g: {r["label"]: r["metrics"]["per_group"].get(g, {}).get("mean_margin") for r in runs} for g in groups}
    generic = {r["label"]: (r["metrics"].get("generic") or {}).get("accuracy") for r in runs}
    lengths: dict[str, dict[str, float]] = {}
    reference_words = None
    for r in runs:
        gen = r["metrics"].get("generation")
        if not gen:
            continue
        for label, words in gen["users"].items():
            if label == "<reference>":
                reference_words = words
                continue
            lengths.setdefault(r["label"], {})[label] = words
    length_by_group = {r["label"]: r["metrics"]["generation"].get("per_group", {})
                       for r in runs if r["metrics"].get("generation")}
    for r in runs:
        gen = r["metrics"].get("generation")
        if gen and "<generic>" in gen["users"]:
            length_by_group.setdefault(r["label"], {})["generic user"] = gen["users"]["<generic>"]
        if gen and "<reference>" in gen["users"]:
            length_by_group.setdefault("reference (SFT)", {})["all users"] = gen["users"]["<reference>"]
    degeneracy = {}  # run -> "group: tokens / distinct-1" (words alone cannot tell "." from "BBBBBBBB")
    for r in runs:
        gen = r["metrics"].get("generation") or {}
        toks, distinct = gen.get("response_tokens_per_group"), gen.get("distinct_token_share_per_group")
        if toks and distinct:
            degeneracy[r["label"]] = {g: f"{toks[g]:.1f} / {distinct.get(g, float('nan')):.2f}" for g in toks}
    cost = {}
    for r in runs:
        t = r["metrics"].get("training") or {}
        cost[r["label"]] = {"route": r["route"], "user_model": r["user_model"], "train_wall_s": t.get("train_wall_s"),
                            "tokens_per_s": t.get("tokens_per_s"),
                            "trainable_parameters": t.get("trainable_parameters"),
                            "user_model_parameters": t.get("user_model_parameters"),
                            "llm_parameters": t.get("llm_parameters")}
    return {"runs": [{k: r[k] for k in ("label", "dir", "route", "user_model")} for r in runs],
            "per_user_accuracy": table, "per_group_accuracy": per_group, "per_group_mean_margin": margin,
            "generic_accuracy": generic,
            "response_words": lengths, "response_words_by_group": length_by_group,
            "reference_response_words": reference_words, "response_tokens_and_distinct_by_group": degeneracy,
            "cost": cost}


def _fmt(x, d=3):
    return "-" if x is None else (f"{x:.{d}f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x))


def _md_table(rows: dict[str, dict], cols: list[str], first: str, digits: int = 3) -> list[str]:
    out = [f"| {first} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key, vals in rows.items():
        out.append(f"| {key} | " + " | ".join(_fmt(vals.get(c), digits) for c in cols) + " |")
    return out


def write_report(comp: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    labels = [r["label"] for r in comp["runs"]]
    series_user = {lab: {u: v.get(lab) for u, v in comp["per_user_accuracy"].items()} for lab in labels}
    pngs = [plots.grouped_bars(series_user, out / "plots" / "accuracy_per_user.png",
                               "held-out accuracy per user", "accuracy", (0, 1.05))]
    series_group = {lab: {g: v.get(lab) for g, v in comp["per_group_accuracy"].items()} for lab in labels}
    if comp["per_group_accuracy"]:
        pngs.append(plots.grouped_bars(series_group, out / "plots" / "accuracy_per_group.png",
                                       "held-out accuracy per group", "accuracy", (0, 1.05)))
    if comp["response_words"]:
        ref = comp.get("reference_response_words")
        pngs.append(plots.grouped_bars(comp["response_words"], out / "plots" / "response_words_per_user.png",
                                       "mean greedy response length per user", "words",
                                       hlines={"reference (SFT)": ref} if ref is not None else None))
        pngs.append(plots.grouped_bars(comp["response_words_by_group"], out / "plots" / "response_words_per_group.png",
                                       "mean greedy response length per group", "words"))
    lines = ["# Comparison", "", "Runs: " + ", ".join(f"`{r['label']}` ({r['route']}, {r['user_model']})"
                                                         for r in comp["runs"]), "",
             "## Accuracy per group (held-out pairs)", ""]
    lines += _md_table(comp["per_group_accuracy"], labels, "group")
    lines += ["", "Every pair scored as the generic user 0: " +
              ", ".join(f"{k} {_fmt(v)}" for k, v in comp["generic_accuracy"].items()), ""]
    if any(v is not None for row in comp.get("per_group_mean_margin", {}).values() for v in row.values()):
        lines += ["Mean margin per group (chosen minus rejected: RM reward for the RM route, beta * log-ratio for "
                  "the DPO and PPO routes, so compare within a route): how sure each model is, which accuracy "
                  "hides.", ""]
        lines += _md_table(comp["per_group_mean_margin"], labels, "group") + [""]
    lines += ["## Accuracy per user", ""]
    lines += _md_table(comp["per_user_accuracy"], labels, "user")
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
    comp = build_comparison([load_run_summary(Path(d)) for d in run_dirs])
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
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    print((Path(args.out) / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
