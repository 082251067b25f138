"""`python -m pipelines.winrate --run RUN_DIR --baseline RUN_DIR --prompts FILE --judge SPEC --out DIR`

Per-user win rates of one policy run against another. For every distinct (prompt, user) of FILE (contract records;
chosen / rejected are ignored) both runs answer as that user (greedy unless --sample; a run without user
conditioning answers alike for everyone), a judge compares the two answers for the user, and the win rate
(win + tie / 2) / n is reported per user, per group and overall with 95% bootstrap intervals. Policy runs: train_sft,
train_pdpo (P-DPO or vanilla DPO), train_ppo.

Judges (--judge):
  length:prefer_short=U1,U2,...  the listed users prefer fewer words, everyone else more; equal counts tie
  rm:RUN_DIR                     a finished train_rm run scores both answers for the user; refused when it is the
                                 RM a compared PPO run was trained against (unless --allow-same-rm)
  openai:BASE_URL                an OpenAI-compatible endpoint with --judge-model and --template; key from
                                 OPENAI_API_KEY (a dummy key when unset); replies cached in --cache-dir
  hf:MODEL                       a local causal LM (tiny-random, smollm2-135m, a folder) with --template, reading
                                 the log-probabilities of the verdict letters A / B
The openai and hf judges judge both orders (a disagreement is a tie) and report their position consistency;
invalid verdicts are counted and left out of n. Two identical answers tie without asking the judge. Except for the
length rule, report.md adds a length-controlled win rate (the win rate a logistic fit on the word-count difference
predicts for equally long answers, after AlpacaEval).

Writes DIR/winrate.json, DIR/judgments.jsonl, DIR/report.md, DIR/plots/win_rate_per_user.png; wandb (offline by
default) in the run's experiment group. `compare` shows the win rates of RUN_DIR/winrate/ next to the run's
accuracy: use --out RUN_DIR/winrate for that.
"""

from __future__ import annotations

import argparse
import json
import sys

from common.config import ConfigError
from evaluation.judges import JudgeError
from preference_data import DataError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.winrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, metavar="RUN_DIR",
                   help="policy run folder to evaluate (train_sft, train_pdpo, train_ppo)")
    p.add_argument("--baseline", required=True, metavar="RUN_DIR", help="policy run folder it is compared against")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="contract records (JSONL / JSON / Parquet): prompt, user_id, group, user_text; duplicates of "
                        "(prompt, user) are judged once")
    p.add_argument("--judge", required=True, metavar="SPEC",
                   help="length:prefer_short=U1,U2 | rm:RUN_DIR | openai:BASE_URL | hf:MODEL (see above)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (convention: RUN_DIR/winrate, which compare reads)")
    p.add_argument("--judge-model", metavar="NAME", help="openai judge: the endpoint's model name (required there)")
    p.add_argument("--template", metavar="NAME|FILE",
                   help="openai / hf judge prompt: psoups (states the user's preference from user_text), prism "
                        "(role-plays the user's profile from user_text), mtbench (neutral; default), or a text FILE "
                        "with {prompt}, {answer_a}, {answer_b} and optionally {user_text} that asks for [[A]] / [[B]] "
                        "/ [[C]]")
    p.add_argument("--n-boot", type=int, default=1000, metavar="N",
                   help="bootstrap resamples for the 95%% intervals (0: none; default 1000)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="answer length limit (default 64)")
    p.add_argument("--sample", action="store_true", help="sample the answers (temperature 1) instead of greedy")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of sampling (with --sample) and of the bootstrap (default 0)")
    p.add_argument("--allow-same-rm", action="store_true", help="let rm:RUN_DIR judge a policy trained against it")
    p.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="rows per generation / judge batch (default 16)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="openai judge reply cache (SQLite; default OUT/judge_cache); share it between evaluations to "
                        "never pay twice for the same judgment")
    p.add_argument("--judge-max-tokens", type=int, default=512, metavar="N",
                   help="openai judge: reply length limit (default 512)")
    p.add_argument("--judge-retries", type=int, default=5, metavar="N",
                   help="openai judge: retries of a request after a 5xx, 429, timeout or connection error, with "
                        "exponential backoff from 1 s (default 5)")
    p.add_argument("--judge-timeout", type=float, default=120.0, metavar="S",
                   help="openai judge: seconds per request (default 120)")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="default: each run's train.device for the policies; the judges on CUDA when available")
    p.add_argument("--report-to", choices=["wandb", "none"],
                   help="default: the --run's config (report_to); none logs nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipelines._cli import setup_logging

    setup_logging()
    for flag, value, low in (("--n-boot", args.n_boot, 0), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--batch-size", args.batch_size, 1), ("--judge-max-tokens", args.judge_max_tokens, 1),
                             ("--judge-retries", args.judge_retries, 0)):
        if value < low:
            print(f"winrate: error: {flag} must be >= {low}, got {value}", file=sys.stderr)
            return 2
    from evaluation.winrate import run_winrate

    try:
        result = run_winrate(args.run, args.baseline, args.prompts, args.judge, args.out, n_boot=args.n_boot,
                             max_new_tokens=args.max_new_tokens, sample=args.sample, seed=args.seed,
                             judge_model=args.judge_model, template=args.template, allow_same_rm=args.allow_same_rm,
                             batch_size=args.batch_size, cache_dir=args.cache_dir, device=args.device,
                             report_to=args.report_to,
                             judge_options={"max_tokens": args.judge_max_tokens, "max_retries": args.judge_retries,
                                            "timeout_s": args.judge_timeout})
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"winrate: error: {exc}", file=sys.stderr)
        return 2
    except JudgeError as exc:  # the endpoint stayed down: the replies so far are cached, a rerun continues
        print(f"winrate: judge failed: {exc}", file=sys.stderr)
        return 1
    summary = {k: {"win_rate": v["win_rate"], "ci95": v["ci95"], "n": v["n"]}
               for k, v in [("overall", result["overall"]), *result["per_group"].items()]}
    print(json.dumps({"judge": result["judge"], "win_rate": summary,
                      "position_consistency": result["position_consistency"], "invalid": result["invalid"],
                      "report": f"{args.out}/report.md"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
