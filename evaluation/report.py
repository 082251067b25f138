"""report.md of a win-rate evaluation: what was compared and how, then per-group and per-user tables."""

from __future__ import annotations

from pathlib import Path

LC_NOTE = ("Length-controlled win rate (LC, a side metric after AlpacaEval's idea): a logistic regression of the "
           "outcome (win 1, tie 0.5, loss 0) on the run's word count minus the baseline's, divided by its standard "
           "deviation (not centred), with a weak ridge (0.1) on the slope; LC is its prediction for two answers of "
           "equal length, sigmoid(intercept). It separates \"better\" from \"longer\" only as far as a single linear "
           "length term can, and it is noisy for a handful of items.")


def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ci(ci) -> str:
    return "-" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _row(label: str, v: dict, lc: bool, extra: list[str] = ()) -> str:
    cells = [label, *extra, str(v["win"]), str(v["tie"]), str(v["loss"]), str(v["n"]), str(v["invalid"]),
             _fmt(v["win_rate"]), _ci(v["ci95"])]
    if lc:
        cells.append(_fmt(v.get("lc_win_rate")))
    cells += [_fmt(v["mean_words"]["run"], 1), _fmt(v["mean_words"]["baseline"], 1)]
    if "mean_distinct_token_share" in v:
        cells += [_fmt(v["mean_distinct_token_share"]["run"], 2), _fmt(v["mean_distinct_token_share"]["baseline"], 2)]
    return "| " + " | ".join(cells) + " |"


def _header(first: list[str], lc: bool, distinct: bool) -> list[str]:
    cols = first + ["win", "tie", "loss", "n", "invalid", "win rate", "95% CI"] + (["LC win rate"] if lc else []) + \
        ["words (run)", "words (baseline)"] + (["distinct (run)", "distinct (baseline)"] if distinct else [])
    return ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]


def write_report(result: dict, path: Path, plot: Path | None = None) -> Path:
    lc = result["length_controlled"]
    distinct = "mean_distinct_token_share" in result["overall"]
    judge = f"`{result['judge']}`"
    if result["judge"].startswith("rm:"):
        judge += f" (RM run `{result['judge_model']}`)"
    elif result["judge"].startswith("openai:"):
        judge += f", model `{result['judge_model']}`"
    if result.get("template"):
        judge += f", template `{result['template']}`"
    dec = result["decoding"]
    decoding = (f"sampled (seed {dec['seed']})" if dec["sample"] else "greedy") + \
        f", at most {dec['max_new_tokens']} new tokens"
    o = result["overall"]
    lines = [f"# Win rate of `{result['run']}` against `{result['baseline']}`", "",
             f"Judge: {judge}. Prompts: `{result['prompts']}`, {result['n_items']} distinct (prompt, user) items; "
             f"both runs answer each item as its user ({decoding}; routes {result['routes']['run']} / "
             f"{result['routes']['baseline']}, user-conditioned: {result['personalized']['run']} / "
             f"{result['personalized']['baseline']}).", "",
             f"**Overall win rate {_fmt(o['win_rate'])}** {_ci(o['ci95'])} over n = {o['n']} "
             f"(win / tie / loss: {o['win']} / {o['tie']} / {o['loss']})" +
             (f"; length-controlled {_fmt(o.get('lc_win_rate'))}" if lc else "") + ".", "",
             "Win rate = (win + tie / 2) / n, from the run's side (0.5: no difference). 95% CI: percentile bootstrap "
             f"over items ({result['bootstrap']['n_boot']} resamples, seed {result['bootstrap']['seed']}); a group's "
             "interval resamples within the group, a user's within the user.", ""]
    if result["identical"]:
        lines += [f"{result['identical']} item(s) got the same answer from both runs: counted as ties, the judge was "
                  "not asked.", ""]
    if result["position_sensitive"]:
        lines += [f"The judge is position-sensitive: each item was judged with the run's answer first and second; "
                  f"a disagreement counts as a tie. Position consistency (both orders agree): "
                  f"{_fmt(result['position_consistency'])} over {result['n_consistency']} item(s).", ""]
    if result["invalid"]:
        lines += [f"**{result['invalid']} item(s) had an invalid verdict** (no parsable [[A]] / [[B]] / [[C]] in at "
                  "least one order): they are excluded from n and counted in the `invalid` column, never guessed. "
                  "judgments.jsonl has the judge's replies.", ""]
    if result.get("judge_calls"):
        calls = result["judge_calls"]
        lines += [f"Judge requests sent: {calls.get('n_requests', 0)} (retries included); replies read from the "
                  f"cache: {calls.get('n_cached', 0)}.", ""]
    lines += ["## Per group", ""]
    if result["per_group"]:
        lines += _header(["group"], lc, distinct) + [_row(g, v, lc) for g, v in result["per_group"].items()]
    else:
        lines += ["The records carry no `group`."]
    lines += ["", "## Per user", "", "`seen`: the user is in the run's users.json (trained on); an unseen user is "
              "answered as the generic user 0.", ""]
    lines += _header(["user", "group", "seen"], lc, distinct)
    lines += [_row(u, v, lc, [str(v["group"] or "-"), str(v["seen"])]) for u, v in result["per_user"].items()]
    lines += [""]
    if lc:
        lines += [LC_NOTE, ""]
    lines += ["Mean words are over all of the subset's items (invalid ones too); every item's answers, verdicts and "
              "outcome are in judgments.jsonl.", ""]
    if distinct:
        lines += ["Distinct: the mean share of distinct tokens in an answer (distinct-1, EOS included): a judge that "
                  "counts words prefers a long loop, so a low share beside a high win rate is a degenerate win. It "
                  "falls with length even for real text (about 0.8 for the length-conflict data's real 50-word "
                  "answers), so compare answers of similar length.", ""]
    if plot is not None:
        lines += [f"![win rate per user](plots/{Path(plot).name})", ""]
    path.write_text("\n".join(lines))
    return path
