"""Per-user win rates of one policy run against another under a judge: `run_winrate`, what `pipelines.winrate` and
the demo call.

1. Items: every distinct (prompt, user) of the prompts file (contract records; chosen / rejected are not used).
2. Answers: both runs answer every item as that item's user (`policy.loading`: batched, one prefix per row; a run
   without user conditioning answers alike for everyone; greedy unless `sample`).
3. Judging: identical answers tie without asking the judge; otherwise the judge sees the run's answer as A and, if
   it is position-sensitive, again as B, and both orders must agree (else a tie; `evaluation.verdicts`).
4. Statistics per user, per group and overall (`evaluation.stats`), written as winrate.json, judgments.jsonl,
   report.md and plots/win_rate_per_user.png, and logged to wandb in the run's experiment group.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from common import plots
from common.metrics import NO_USER, distinct_token_share
from evaluation import stats
from evaluation.judges import Judge, JudgeSpec, JudgeSpecError, Query, build_judge, parse_judge_spec, words
from evaluation.verdicts import combine_orders, outcome_of
from preference_data import DataError, load_records

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    prompt: str
    user_id: str | None
    user_text: str | None
    group: str | None

    @property
    def user(self) -> str:
        """The user's key in winrate.json (records without a user: `<none>`, as in evaluate's metrics.json)."""
        return self.user_id if self.user_id is not None else NO_USER


def collect_items(records) -> list[Item]:
    """One item per distinct (prompt, user), in order of first appearance; a duplicate's other fields are those of
    the first record."""
    items: dict[tuple[str, str | None], Item] = {}
    for r in records:
        items.setdefault((r.prompt, r.user_id), Item(r.prompt, r.user_id, r.user_text, r.group))
    return list(items.values())


# ------------------------------------------------------------------------------------------------ checks


def check_policy_run(run_dir: str | Path, arg: str) -> dict:
    """run.json of a finished policy run, or an error naming the argument and the folder (reads no model)."""
    from policy.loading import policy_route

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{arg} {run_dir}: no such folder")
    if not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"{arg} {run_dir}: not a finished run (no run.json)")
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except ValueError as exc:
        raise ValueError(f"{arg} {run_dir}: unreadable run.json ({exc})") from None
    try:
        policy_route(info)
    except ValueError as exc:
        raise ValueError(f"{arg} {run_dir}: {exc}") from None
    if not (run_dir / "checkpoint" / "user_model.json").exists():
        raise FileNotFoundError(f"{arg} {run_dir}: run has no final checkpoint/ (did training finish?)")
    return info


def check_not_own_rm(spec: JudgeSpec, runs: dict[str, tuple[Path, dict]], allow_same_rm: bool) -> None:
    """Refuse `rm:RUN_DIR` when a compared policy was trained against that very RM (PPO's run.json `rm_run`): it
    would measure how far the policy optimised (or hacked) its own reward, not what the users prefer."""
    if spec.kind != "rm" or allow_same_rm:
        return
    judge_rm = Path(spec.arg).resolve()
    for arg, (run_dir, info) in runs.items():
        rm_run = info.get("rm_run")
        if rm_run and Path(rm_run).resolve() == judge_rm:
            raise JudgeSpecError(f"--judge rm:{spec.arg}: {judge_rm} is the reward model that {arg} {run_dir} was "
                                 "trained against (its run.json rm_run); a policy judged by its own RM scores how "
                                 "well it optimised that RM, not the users' preferences. Use another RM run, or pass "
                                 "--allow-same-rm to do it anyway")


def _check_user_texts(judge: Judge, items: list[Item], prompts: str) -> None:
    template = getattr(judge, "template", None)
    if template is not None and template.needs_user_text:
        lacking = sorted({it.user for it in items if not it.user_text})
        if lacking:
            raise DataError(f"{prompts}: template {template.name!r} needs each user's user_text, and "
                            f"{len(lacking)} user(s) have none (first: {lacking[0]}); use --template mtbench or add "
                            "user_text to the records")


# ------------------------------------------------------------------------------------------------ steps


def generate_answers(run_dir: Path, items: list[Item], *, device=None, max_new_tokens: int = 64, sample: bool = False,
                     seed: int = 0, batch_size: int = 16) -> tuple[list, dict]:
    """(one `policy.loading.Generated` per item, facts about the run: route, personalized, seen users). The model is
    freed before returning, so that the other run and the judge need not share memory with it."""
    from policy.loading import generate_texts, load_policy_run

    run = load_policy_run(run_dir, device)
    t0 = time.time()
    answers = generate_texts(run, [it.prompt for it in items], [it.user_id for it in items],
                             [it.user_text for it in items], max_new_tokens=max_new_tokens, do_sample=sample,
                             seed=seed if sample else None, batch_size=batch_size)
    facts = {"route": run.route, "personalized": run.personalized,
             "seen": {it.user: run.knows(it.user_id) for it in items}, "generation_s": time.time() - t0}
    del run
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return answers, facts


def judge_items(judge: Judge, items: list[Item], run_answers: list, baseline_answers: list) -> list[dict]:
    """One judgment row per item: the verdict of each order asked, the run's outcome and, for a position-sensitive
    judge, whether the two orders agreed. `*_answers` are `Generated`s (text, finished)."""
    rows, queries, asked = [], [], []
    for i, (it, ra, ba) in enumerate(zip(items, run_answers, baseline_answers)):
        rows.append({"identical": ra.text == ba.text})
        if not rows[-1]["identical"]:  # identical answers are a tie for any judge: nothing to ask
            queries.append(Query(it.prompt, it.user_id, it.user_text, ra.text, ba.text, ra.finished, ba.finished))
            asked.append(i)
    both = judge.position_sensitive
    judgments = judge.judge(queries + ([q.swapped() for q in queries] if both else []))
    if len(judgments) != len(queries) * (2 if both else 1):
        raise RuntimeError(f"judge {judge.name} returned {len(judgments)} judgments for "
                           f"{len(queries) * (2 if both else 1)} queries")
    first, second = judgments[:len(queries)], judgments[len(queries):]
    for k, i in enumerate(asked):
        row = rows[i]
        row["verdicts"] = {"run_as_a": first[k].verdict}
        row["detail"] = {"run_as_a": first[k].detail}
        if both:
            row["verdicts"]["run_as_b"] = second[k].verdict
            row["detail"]["run_as_b"] = second[k].detail
            row["outcome"], row["consistent"] = combine_orders(first[k].verdict, second[k].verdict)
        else:
            row["outcome"], row["consistent"] = outcome_of(first[k].verdict, run_is_a=True), None
    for row in rows:
        if row["identical"]:
            row.update(verdicts={}, detail={}, outcome="tie", consistent=None)
    return rows


def aggregate(items: list[Item], rows: list[dict], run_words: list[int], baseline_words: list[int],
              seen: dict[str, bool], *, n_boot: int = 1000, seed: int = 0, length_controlled: bool = True,
              run_distinct: list[float] | None = None, baseline_distinct: list[float] | None = None) -> dict:
    """per_user / per_group / overall rows (`stats.summarize`) and the position-consistency rate. Each interval
    resamples the items of its own subset (a group's within the group). `*_distinct`: each answer's
    distinct-token share, averaged in every row when given."""
    outcomes = [r["outcome"] for r in rows]
    shares = run_distinct is not None and baseline_distinct is not None
    if shares and not len(run_distinct) == len(baseline_distinct) == len(rows):
        raise ValueError("run_distinct and baseline_distinct need one share per outcome")

    def summary(idx: list[int]) -> dict:
        return stats.summarize([outcomes[i] for i in idx], [run_words[i] for i in idx],
                               [baseline_words[i] for i in idx], n_boot=n_boot, seed=seed,
                               length_controlled=length_controlled,
                               run_distinct=[run_distinct[i] for i in idx] if shares else None,
                               baseline_distinct=[baseline_distinct[i] for i in idx] if shares else None)

    by_user: dict[str, list[int]] = {}
    by_group: dict[str, list[int]] = {}
    group_of: dict[str, str | None] = {}
    for i, it in enumerate(items):
        by_user.setdefault(it.user, []).append(i)
        if it.group is not None:
            by_group.setdefault(it.group, []).append(i)
        if group_of.get(it.user) is None:
            group_of[it.user] = it.group
    per_user = {}
    for user in sorted(by_user, key=plots.natural_key):
        per_user[user] = {**summary(by_user[user]), "group": group_of[user], "seen": seen.get(user, False)}
    per_group = {g: summary(by_group[g]) for g in sorted(by_group, key=plots.natural_key)}
    consistency = [r["consistent"] for r in rows if r["consistent"] is not None]
    return {"per_user": per_user, "per_group": per_group, "overall": summary(list(range(len(items)))),
            "position_consistency": stats.consistency_rate(consistency), "n_consistency": len(consistency)}


# ------------------------------------------------------------------------------------------------ entry point


def run_winrate(run: str | Path, baseline: str | Path, prompts: str | Path, judge_spec: str, out: str | Path, *,
                n_boot: int = 1000, max_new_tokens: int = 64, sample: bool = False, seed: int = 0,
                judge_model: str | None = None, template: str | None = None, allow_same_rm: bool = False,
                batch_size: int = 16, cache_dir: str | Path | None = None, device: str | None = None,
                report_to: str | None = None, judge_options: dict | None = None) -> dict:
    """Win rates of `run` against `baseline` on the (prompt, user) items of `prompts`, judged by `judge_spec`;
    writes winrate.json, judgments.jsonl, report.md and plots/ into `out` and returns winrate.json's dict.

    Every argument is checked (runs, prompts, judge spec, template, own-RM rule) before any policy is loaded.
    `cache_dir`: the openai judge's reply cache (default OUT/judge_cache). `device`: None = each policy run's own
    `train.device`, judges on CUDA when available. `report_to`: "wandb" | "none" | None (the run's config);
    wandb logs in the run's experiment group. `judge_options`: OpenAIJudge settings (max_tokens, timeout_s,
    max_retries, backoff_s)."""
    t0 = time.time()
    run, baseline, out = Path(run), Path(baseline), Path(out)
    for name, value, low in (("n_boot", n_boot, 0), ("max_new_tokens", max_new_tokens, 1),
                             ("batch_size", batch_size, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    spec = parse_judge_spec(judge_spec)
    runs = {"--run": (run, check_policy_run(run, "--run")),
            "--baseline": (baseline, check_policy_run(baseline, "--baseline"))}
    check_not_own_rm(spec, runs, allow_same_rm)
    records = load_records(prompts)
    if not records:
        raise DataError(f"{prompts}: no records")
    items = collect_items(records)
    judge_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    judge = build_judge(spec, device=judge_device, judge_model=judge_model, template=template,
                        cache_dir=Path(cache_dir) if cache_dir else out / "judge_cache", batch_size=batch_size,
                        **(judge_options or {}))
    try:
        _check_user_texts(judge, items, str(prompts))
        out.mkdir(parents=True, exist_ok=True)
        gen = dict(device=device, max_new_tokens=max_new_tokens, sample=sample, seed=seed, batch_size=batch_size)
        log.info("winrate: %d (prompt, user) items; generating with %s and %s", len(items), run, baseline)
        run_answers, run_facts = generate_answers(run, items, **gen)
        base_answers, base_facts = generate_answers(baseline, items, **gen)
        t_judge = time.time()
        rows = judge_items(judge, items, run_answers, base_answers)
        judge_s = time.time() - t_judge
        judge_counts = {k: getattr(judge, k) for k in ("n_requests", "n_cached") if hasattr(judge, k)}
    finally:
        judge.close()
    run_words = [words(a.text) for a in run_answers]
    base_words = [words(a.text) for a in base_answers]
    run_distinct = [distinct_token_share(a.token_ids) for a in run_answers]
    base_distinct = [distinct_token_share(a.token_ids) for a in base_answers]
    length_controlled = spec.kind != "length"
    result = {"run": str(run), "baseline": str(baseline), "judge": str(spec), "n": 0,
              **aggregate(items, rows, run_words, base_words, run_facts["seen"], n_boot=n_boot, seed=seed,
                          length_controlled=length_controlled, run_distinct=run_distinct,
                          baseline_distinct=base_distinct)}
    result["n"] = result["overall"]["n"]
    result.update({
        # what judged: the endpoint's model, the hf model, or the RM run's folder
        "judge_model": {"openai": judge_model, "hf": spec.arg, "rm": str(Path(spec.arg).resolve())}.get(spec.kind),
        "template": getattr(getattr(judge, "template", None), "name", None),
        "position_sensitive": judge.position_sensitive, "length_controlled": length_controlled,
        "prompts": str(prompts), "n_items": len(items), "invalid": result["overall"]["invalid"],
        "identical": sum(r["identical"] for r in rows),
        "decoding": {"sample": sample, "seed": seed if sample else None, "max_new_tokens": max_new_tokens},
        "routes": {"run": run_facts["route"], "baseline": base_facts["route"]},
        "personalized": {"run": run_facts["personalized"], "baseline": base_facts["personalized"]},
        "bootstrap": {"n_boot": n_boot, "seed": seed, "level": 0.95, "method": "percentile, items resampled"},
        "judge_calls": judge_counts,
        "wall_s": {"total": time.time() - t0, "generation_run": run_facts["generation_s"],
                   "generation_baseline": base_facts["generation_s"], "judging": judge_s},
    })
    _write_outputs(out, result, items, rows, run_answers, base_answers, (run_words, base_words),
                   (run_distinct, base_distinct))
    _log_to_tracker(run, out, result, report_to)
    return result


def _write_outputs(out: Path, result: dict, items, rows, run_answers, base_answers, words_of, distinct_of) -> None:
    """`words_of`, `distinct_of`: (run's, baseline's) per-item word counts and distinct-token shares."""
    from evaluation.report import write_report
    from preference_data.io import write_jsonl

    write_jsonl(({"prompt": it.prompt, "user": it.user, "user_id": it.user_id, "user_text": it.user_text,
                  "group": it.group, "seen": result["per_user"][it.user]["seen"],
                  "run_answer": ra.text, "baseline_answer": ba.text, "run_finished": ra.finished,
                  "baseline_finished": ba.finished, "run_words": rw, "baseline_words": bw,
                  "run_distinct_token_share": rd, "baseline_distinct_token_share": bd,
                  "identical": row["identical"], "verdicts": row["verdicts"], "outcome": row["outcome"],
                  "consistent": row["consistent"], "detail": row["detail"]}
                 for it, ra, ba, rw, bw, rd, bd, row in zip(items, run_answers, base_answers, *words_of, *distinct_of,
                                                            rows)),
                out / "judgments.jsonl")
    png = plots.win_rate_per_user(result["per_user"], out / "plots" / "win_rate_per_user.png",
                                  f"{Path(result['run']).name} vs {Path(result['baseline']).name} ({result['judge']})")
    tmp = out / "winrate.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "winrate.json")
    write_report(result, out / "report.md", png)


def _log_to_tracker(run: Path, out: Path, result: dict, report_to: str | None) -> None:
    """wandb (offline unless the run's config says otherwise) in the run's experiment group, job_type "winrate";
    with report_to = none nothing is logged anywhere (winrate.json is the record)."""
    from common.run import load_run_config
    from common.tracking import Tracker

    cfg = load_run_config(run)
    name = f"winrate:{run.name}-vs-{Path(result['baseline']).name}"
    cfg = replace(cfg, report_to=report_to or cfg.report_to, wandb=replace(cfg.wandb, name=name))
    if cfg.report_to == "none":
        return
    tracker = Tracker(cfg, out, job_type="winrate")
    flat = {"winrate/overall": result["overall"]["win_rate"], "winrate/n": result["n"],
            "winrate/invalid": result["invalid"], "winrate/position_consistency": result["position_consistency"]}
    if result["length_controlled"]:
        flat["winrate/lc/overall"] = result["overall"].get("lc_win_rate")
    for g, v in result["per_group"].items():
        flat[f"winrate/group/{g}"] = v["win_rate"]
        if result["length_controlled"]:
            flat[f"winrate/lc/group/{g}"] = v.get("lc_win_rate")
    for u, v in result["per_user"].items():
        flat[f"winrate/user/{u}"] = v["win_rate"]
    flat = {k: v for k, v in flat.items() if v is not None}
    tracker.log(flat)
    tracker.summary(flat)
    columns = ["user", "group", "seen", "win", "tie", "loss", "n", "invalid", "win_rate", "ci_low", "ci_high",
               "words_run", "words_baseline", "distinct_run", "distinct_baseline"]
    table = [[u, v["group"], v["seen"], v["win"], v["tie"], v["loss"], v["n"], v["invalid"], v["win_rate"],
              *(v["ci95"] or [None, None]), v["mean_words"]["run"], v["mean_words"]["baseline"],
              *[v.get("mean_distinct_token_share", {}).get(k) for k in ("run", "baseline")]]
             for u, v in result["per_user"].items()]
    tracker.log_table("winrate/per_user", columns, table)
    tracker.log_bar("winrate/per_user_chart", [r[0] for r in table], [r[8] if r[8] is not None else 0.0 for r in table],
                    f"win rate per user vs {Path(result['baseline']).name}")
    tracker.finish()
