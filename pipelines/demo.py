"""`python -m pipelines.demo [--fast] [--out DIR]`: the whole pipeline on the embedded default, end to end.

On the length-conflict task (seed section 5.1: users user_4..user_6 prefer short answers, the other seven long
ones) with SmolLM2-135M: train_sft -> train_rm -> evaluate -> train_ppo (from pi_SFT) -> evaluate -> train_pdpo
(from pi_SFT) -> evaluate -> vanilla baselines (uniform user model, alpha = 1) for RM and DPO; then the reward
models on held-out pairs whose answers are 2-3x longer than any in training (`eval_long`), the policies' per-user
win rates against pi_SFT under the annotators' own rule (`winrate`), and compare. Prints the time of each stage and
the comparison tables, and writes one run folder per stage plus compare/report.md under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common.config import ConfigError, load_config
from common.trainer import TrainingError
from pipelines._cli import setup_logging
from preference_data.records import DataError

ROOT = Path(__file__).resolve().parents[1]
DATA_WITH_MEDIUM = False  # train on short < medium < long (see preference_data.length_conflict)
WINRATE_MAX_NEW_TOKENS = 96  # the long answers (at most 74 tokens) fit whole
LONG_SET_PROMPTS = 12  # of the 30 long-answer prompts: 120 pairs per reward model (fast: 4)

# (stage name, module, config file, extra overrides). Vanilla = the same code with the uniform user model.
# Policies (PPO, P-DPO, vanilla DPO) start from pi_SFT: `model.sft_run` is set to the sft stage's folder.
STAGES = [
    ("sft", "train_sft", "configs/demo/sft.yaml", []),
    ("rm", "train_rm", "configs/demo/rm.yaml", []),
    ("ppo", "train_ppo", "configs/demo/ppo.yaml", []),
    ("pdpo", "train_pdpo", "configs/demo/pdpo.yaml", []),
    # the vanilla baselines have fewer steps than the personalized models, for the 30-minute budget. The vanilla RM
    # (one pass per pair) at 30 steps preferred the long answer on 11 of 15 held-out prompts (mean margin 0.89), at
    # 45 on all 15 (2.28; runs/exp/rmvan45); vanilla DPO (nll_weight 1.0 then) at 45 steps did worse than at 30
    # (0.533 against 0.733 for the majority, margins 0.10-0.13: conflicting labels leave 0.4 of a clean signal)
    ("rm_vanilla", "train_rm", "configs/demo/rm.yaml", ["user_model.kind=uniform", "loss.alpha=1.0",
                                                        "train.max_steps=45"]),
    # (its 30 steps see 240 records: the reference log-probs are computed for those only)
    ("dpo_vanilla", "train_pdpo", "configs/demo/pdpo.yaml", ["user_model.kind=uniform", "loss.alpha=1.0",
                                                             "train.max_steps=30", "data.max_train_records=240"]),
]

FAST = {  # --fast: the same pipeline, fewer steps and a smaller held-out set (weaker effect allowed). The reference
    # log-probs of P-DPO are computed for every training record, so --fast keeps only the 96 its 12 steps can see.
    "train_sft": ["train.max_steps=12", "data.max_eval_records=50", "eval.n_generation_prompts=4"],
    "train_rm": ["train.max_steps=12", "data.max_eval_records=100"],
    "train_pdpo": ["train.max_steps=12", "data.max_eval_records=60", "data.max_train_records=96",
                   "eval.n_generation_prompts=4"],
    "train_ppo": ["train.max_steps=2", "ppo.rollout_batch_size=16", "eval.n_generation_prompts=4",
                  "data.max_eval_records=60"],
}


# After training: the routes' reward on the long-answer set (runs -> RUN/eval_long) and the policies' win rates
# against pi_SFT (runs -> RUN/winrate), both under the rule the demo's annotators follow.
EVAL_LONG_RUNS = ("rm", "rm_vanilla", "pdpo", "dpo_vanilla")
WINRATE_RUNS = ("pdpo", "ppo", "dpo_vanilla")
LENGTH_JUDGE = "length:prefer_short=" + ",".join(("user_4", "user_5", "user_6"))
POST_STAGES = ("eval_long", "winrate")


def parse_stages(text: str) -> list[str]:
    """--stages: comma-separated stage names, each one of STAGES or POST_STAGES (an unknown name is an error)."""
    known = [name for name, *_ in STAGES] + list(POST_STAGES)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown stage {', '.join(map(repr, unknown)) or '(none given)'}; "
                                         f"choose from {','.join(known)}")
    return names


def build_stage_configs(out: Path, fast: bool, model: str | None = None, extra: list[str] | None = None):
    data_dir = out / "data"
    configs = []
    for name, module, cfg_file, overrides in STAGES:
        ov = [f"output_dir={out / name}", f"data.train_path={data_dir / 'train.jsonl'}",
              f"data.eval_path={data_dir / 'eval.jsonl'}", f"wandb.group=demo-{out.name}"] + overrides
        if module == "train_ppo":
            ov.append(f"ppo.rm_run={out / 'rm'}")
        if module in ("train_ppo", "train_pdpo"):
            ov.append(f"model.sft_run={out / 'sft'}")
        if fast:
            ov += FAST[module]
        if model:
            ov.append(f"model.name={model}")
        ov += extra or []
        configs.append((name, module, load_config(ROOT / cfg_file, ov)))  # all validated before any training
    return configs


def run_demo(out: Path, fast: bool = False, model: str | None = None, extra: list[str] | None = None,
             stages: list[str] | None = None) -> dict:
    from preference_data.length_conflict import write_length_conflict, write_long_answer_set
    from pipelines import compare as compare_mod
    from pipelines import train_pdpo, train_ppo, train_rm, train_sft

    modules = {"train_sft": train_sft, "train_rm": train_rm, "train_pdpo": train_pdpo, "train_ppo": train_ppo}
    configs = build_stage_configs(out, fast, model, extra)
    seed = configs[0][2].seed
    post = [p for p in POST_STAGES if not stages or p in stages]
    if stages:
        configs = [c for c in configs if c[0] in stages]
    timings = {}
    t0 = time.time()
    summary = write_length_conflict(out / "data", seed=seed, n_eval_prompts=10 if fast else 15,
                                    with_medium=DATA_WITH_MEDIUM)
    long_summary = write_long_answer_set(out / "data_long", seed=seed, n_prompts=4 if fast else LONG_SET_PROMPTS)
    timings["data"] = time.time() - t0
    total = len(configs) + len(post) + 2
    print(f"[1/{total}] data: {summary['train']['records']} train / {summary['eval']['records']} held-out pairs, "
          f"{len(summary['users'])} users (minority {', '.join(summary['minority'])}); long-answer held-out set: "
          f"{long_summary['eval']['records']} pairs", flush=True)
    for k, (name, module, cfg) in enumerate(configs, start=2):
        if module == "train_sft":
            what = "one soft prompt for everyone: the generic user's"
        elif module == "train_ppo":  # no alpha: PPO's loss has no generic term (the RM's has)
            what = f"{cfg.user_model.kind} user model, {cfg.train.max_steps} iterations against {cfg.ppo.rm_run}"
        else:
            what = f"{cfg.user_model.kind} user model, alpha={cfg.loss.alpha}"
        print(f"[{k}/{total}] {name}: {module} ({what})", flush=True)
        t = time.time()
        modules[module].run(cfg)
        timings[name] = time.time() - t
        print(f"[{k}/{total}] {name}: done in {timings[name]:.0f} s", flush=True)
    k = len(configs) + 2
    for name in post:
        print(f"[{k}/{total}] {name}: " + {"eval_long": "reward models on answers 2-3x longer than in training",
                                            "winrate": f"win rates against pi_SFT ({LENGTH_JUDGE})"}[name], flush=True)
        t = time.time()
        (_eval_long if name == "eval_long" else _winrates)(out, fast)
        timings[name] = time.time() - t
        print(f"[{k}/{total}] {name}: done in {timings[name]:.0f} s", flush=True)
        k += 1
    print(f"[{total}/{total}] compare", flush=True)
    t = time.time()
    order = [n for n in ("rm", "rm_vanilla", "pdpo", "dpo_vanilla", "ppo") if (out / n / "metrics.json").exists()]
    comp = compare_mod.compare([out / n for n in order], out / "compare") if order else None
    timings["compare"] = time.time() - t
    timings["total"] = time.time() - t0
    (out / "compare").mkdir(parents=True, exist_ok=True)
    (out / "compare" / "timings.json").write_text(json.dumps(timings, indent=1))
    long = long_answer_table(out)
    if long:
        (out / "compare" / "long_answers.json").write_text(json.dumps(long, indent=1))
    return {"comparison": comp, "timings": timings, "long_answers": long}


def _eval_long(out: Path, fast: bool) -> None:
    """The routes' reward on the long-answer set: accuracy per group, responses scored whole."""
    from pipelines.evaluate import evaluate_run

    over = ["eval.n_generation_prompts=0", "report_to=none"]
    for name in EVAL_LONG_RUNS:
        if (out / name / "run.json").exists():
            evaluate_run(out / name, out / "data_long" / "eval.jsonl", out / name / "eval_long", over)


def _winrates(out: Path, fast: bool) -> None:
    """Per-user win rates of the policies against pi_SFT on the held-out prompts, judged by the length rule."""
    from evaluation.winrate import run_winrate

    for name in WINRATE_RUNS:
        if (out / name / "run.json").exists() and (out / "sft" / "run.json").exists():
            run_winrate(out / name, out / "sft", out / "data" / "eval.jsonl", LENGTH_JUDGE, out / name / "winrate",
                        n_boot=1000, max_new_tokens=WINRATE_MAX_NEW_TOKENS, seed=0)


def long_answer_table(out: Path) -> dict:
    """{run: {group: accuracy, "generic": accuracy}} of the eval_long folders under `out`."""
    table = {}
    for name in EVAL_LONG_RUNS:
        path = out / name / "eval_long" / "metrics.json"
        if path.exists():
            m = json.loads(path.read_text())
            table[name] = {**{g: v["accuracy"] for g, v in m["per_group"].items()},
                           "generic": (m.get("generic") or {}).get("accuracy")}
    return table


def print_summary(result: dict, out: Path) -> None:
    comp, timings = result["comparison"], result["timings"]
    if comp is None:  # e.g. --stages sft: no run that ranks pairs yet
        print("\nNo run under --out has metrics.json yet: nothing to compare.")
    else:
        print_tables(comp)
    long = result.get("long_answers") or {}
    if long:
        print("\nHeld-out pairs with answers 2-3x longer than in training (short 10-30 words, long 80-150), "
              "accuracy per group")
        cols = list(long)
        print(f"{'group':<12}" + "".join(f"{c:>13}" for c in cols))
        for g in ("majority", "minority", "generic"):
            print(f"{g:<12}" + "".join(f"{_f(long[c].get(g)):>13}" for c in cols))
    print("\nStage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    if comp is not None:
        print(f"\nReport: {out / 'compare' / 'report.md'}")


def print_win_rates(comp: dict) -> None:
    details = comp.get("win_rate") or {}
    if not details:
        return
    first = next(iter(details.values()))
    print(f"\nWin rate against pi_SFT per group (judge {first.get('judge')}; ties count half; 95% interval)")
    cols = list(details)
    print(f"{'group':<12}" + "".join(f"{c:>22}" for c in cols))
    for g in comp["win_rate_per_group"]:
        cells = []
        for lab in cols:
            v = details[lab]["overall"] if g == "all users" else details[lab]["per_group"].get(g)
            ci = (v or {}).get("ci95")
            cells.append("-" if not v or v.get("win_rate") is None else
                         f"{v['win_rate']:.3f}" + (f" [{ci[0]:.2f},{ci[1]:.2f}]" if ci else ""))
        print(f"{g:<12}" + "".join(f"{c:>22}" for c in cells))
    lows = {lab: d.get("lowest_distinct_token_share") for lab, d in details.items()}
    if any(lows.values()):  # a long loop wins under the length rule: are the judged answers text?
        cells = [f"{low['user']} {low['share']:.2f}" if low else "-" for low in (lows[c] for c in cols)]
        print(f"{'distinct min':<12}" + "".join(f"{c:>22}" for c in cells) +
              "   (judged answers' distinct-token share, lowest user)")


def print_tables(comp: dict) -> None:
    labels = list(comp["generic_accuracy"])  # the runs that rank pairs
    print("\nHeld-out accuracy per group (r(x,y_w,u) > r(x,y_l,u); DPO: implicit reward), then the mean margin "
          "(chosen minus rejected)")
    print(f"{'group':<12}" + "".join(f"{l:>13}" for l in labels))
    for g, vals in comp["per_group_accuracy"].items():
        print(f"{g:<12}" + "".join(f"{_f(vals.get(l)):>13}" for l in labels))
    print(f"{'generic u0':<12}" + "".join(f"{_f(comp['generic_accuracy'].get(l)):>13}" for l in labels))
    margins = comp.get("per_group_mean_margin") or {}
    for g, vals in margins.items():  # RM: reward units; DPO / PPO: beta * log-ratio (compare within a route)
        print(f"{'margin ' + g[:5]:<12}" + "".join(f"{_f(vals.get(l), 2):>13}" for l in labels))
    if comp["response_words_by_group"]:
        print("\nMean greedy response length (words)")
        cols = sorted({c for v in comp["response_words_by_group"].values() for c in v})
        print(f"{'run':<16}" + "".join(f"{c:>14}" for c in cols))
        for run, vals in comp["response_words_by_group"].items():
            print(f"{run:<16}" + "".join(f"{_f(vals.get(c), 1):>14}" for c in cols))
    if comp.get("response_tokens_and_distinct_by_group"):
        deg = comp["response_tokens_and_distinct_by_group"]
        print("\nTokens per response / distinct-token share (a run of one token is one 'word': this shows it)")
        cols = sorted({c for v in deg.values() for c in v})
        print(f"{'run':<16}" + "".join(f"{c:>14}" for c in cols))
        for run, vals in deg.items():
            print(f"{run:<16}" + "".join(f"{vals.get(c, '-'):>14}" for c in cols))
    print_win_rates(comp)


def _f(x, d=3):
    return "-" if x is None else f"{x:.{d}f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true",
                        help="smaller settings (about 8 minutes on 2 cores, weaker effect)")
    parser.add_argument("--out", default=None,
                        help="output folder (default runs/demo, with --fast runs/demo_fast: a run folder resumes only "
                             "the run that wrote it)")
    parser.add_argument("--model", default=None, help="model.name for every stage (default: the configs' smollm2-135m)")
    parser.add_argument("--stages", type=parse_stages, metavar="A,B,...",
                        help="run only these stages, comma-separated: " + ",".join(n for n, *_ in STAGES) +
                             " (the others' folders under --out are used as they are)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="applied to every stage")
    args = parser.parse_args(argv)
    setup_logging()
    out = Path(args.out or ("runs/demo_fast" if args.fast else "runs/demo"))
    try:
        result = run_demo(out, args.fast, args.model, args.overrides, args.stages)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"demo: training stopped: {exc}", file=sys.stderr)
        return 1
    print_summary(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
