"""`python -m pipelines.label_pairs --policy RUN_DIR --rm RUN_DIR --prompts FILE --out FILE [--samples N]`

The RM route without PPO: preference pairs labelled by a personalized reward model, for `train_pdpo`.

For each distinct prompt of FILE (contract records; chosen / rejected are ignored), the policy run (normally
pi_SFT) samples N answers once, as the generic user; the RM of a finished `train_rm` run scores every answer for
every user of FILE it knows; each user gets (its best answer, its worst answer) for that prompt
(`reward.labelling.best_worst_pairs`). Users the RM has not seen are skipped (named in the log). Empty answers,
and answers that did not end with EOS within --max-new-tokens (unless --allow-unfinished), never enter a pair.

Writes FILE (contract records: prompt, user_id, group, user_text, chosen, rejected) and FILE's `.summary.json`
(pairs per user, mean words of chosen and rejected per group, the RM's mean margin). Then
`python -m pipelines.train_pdpo --config ... data.train_path=FILE` trains the personalized policy on them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.config import ConfigError
from preference_data import DataError

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.label_pairs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, metavar="RUN_DIR", help="policy run that samples (train_sft, ...)")
    p.add_argument("--rm", required=True, metavar="RUN_DIR", help="finished train_rm run that labels")
    p.add_argument("--prompts", required=True, metavar="FILE", help="contract records: their prompts and users")
    p.add_argument("--out", required=True, metavar="FILE", help="output JSONL of labelled pairs")
    p.add_argument("--samples", type=int, default=8, metavar="N", help="answers sampled per prompt (default 8)")
    p.add_argument("--max-prompts", type=int, default=None, metavar="N",
                   help="use the first N distinct prompts of FILE (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=96, metavar="N", help="answer length limit (default 96)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--min-margin", type=float, default=0.0,
                   help="no pair for a user whose best and worst answer the RM scores within this (default 0)")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="let answers cut at --max-new-tokens (no EOS) enter pairs, scored as cut")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="generation and scoring batch size (default 32)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    return p


def label_pairs(policy_run: str | Path, rm_run: str | Path, prompts_file: str | Path, out: str | Path, *,
                samples: int = 8, max_prompts: int | None = None, max_new_tokens: int = 96,
                temperature: float = 1.0, min_margin: float = 0.0, allow_unfinished: bool = False, seed: int = 0,
                batch_size: int = 32, device: str | None = None) -> dict:
    """Sample, score for every user, write the best-vs-worst pairs; returns the summary (also written)."""
    from policy.loading import generate_texts, load_policy_run
    from policy.ppo.roles import load_reward_role
    from preference_data.io import load_records, write_jsonl
    from reward.labelling import best_worst_pairs

    if samples < 2:
        raise ValueError(f"--samples must be >= 2 (a pair needs two answers), got {samples}")
    records = load_records(prompts_file)
    prompts = list(dict.fromkeys(r.prompt for r in records))[:max_prompts]
    users: dict[str, tuple[str | None, str | None]] = {}  # user id -> (group, user_text), first seen
    for r in records:
        if r.user_id is not None and r.user_id not in users:
            users[r.user_id] = (r.group, r.user_text)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reward = load_reward_role(rm_run, dev)
    unknown = [u for u in users if u not in reward.vocab]
    if unknown:
        log.warning("the RM of %s has not seen %d user(s) of %s; no pairs for them: %s", rm_run, len(unknown),
                    prompts_file, ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else ""))
    users = {u: v for u, v in users.items() if u in reward.vocab}
    if not users or not prompts:
        raise DataError(f"{prompts_file}: no prompt with a user the RM of {rm_run} knows")
    policy = load_policy_run(policy_run, dev)

    rows = [p for p in prompts for _ in range(samples)]
    answers = generate_texts(policy, rows, [None] * len(rows), max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=temperature, seed=seed, batch_size=batch_size)
    user_ids = list(users)
    out_records, margins = [], defaultdict(list)
    words = defaultdict(lambda: {"chosen": [], "rejected": []})
    for i, prompt in enumerate(tqdm(prompts, desc="label", dynamic_ncols=True)):
        got = answers[i * samples:(i + 1) * samples]
        texts = [g.text for g in got]
        valid = torch.tensor([(g.finished or allow_unfinished) and bool(g.text.strip()) for g in got])
        n = len(texts)
        scores = reward.score([prompt] * (n * len(user_ids)), texts * len(user_ids),
                              [u for u in user_ids for _ in range(n)], ended=[g.finished for g in got] * len(user_ids),
                              user_texts=[users[u][1] for u in user_ids for _ in range(n)],
                              batch_size=batch_size).view(len(user_ids), n)
        for u, pair in zip(user_ids, best_worst_pairs(scores, min_margin, valid)):
            if pair is None or texts[pair.chosen] == texts[pair.rejected]:
                continue
            group, text = users[u]
            out_records.append({"prompt": prompt, "user_id": u, "group": group, "user_text": text,
                                "chosen": texts[pair.chosen], "rejected": texts[pair.rejected]})
            margins[u].append(pair.margin)
            words[group or "(none)"]["chosen"].append(len(texts[pair.chosen].split()))
            words[group or "(none)"]["rejected"].append(len(texts[pair.rejected].split()))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    write_jsonl(out_records, tmp)
    tmp.replace(out)  # atomic: a killed run leaves the old file or none, never half a file
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    summary = {
        "policy": str(policy_run), "rm": str(rm_run), "prompts": len(prompts), "samples_per_prompt": samples,
        "temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed, "pairs": len(out_records),
        "ended_share": mean([float(g.finished) for g in answers]),
        "pairs_per_user": {u: len(m) for u, m in margins.items()},
        "mean_margin_per_user": {u: mean(m) for u, m in margins.items()},
        "mean_words_per_group": {g: {k: mean(v) for k, v in d.items()} for g, d in words.items()},
        "skipped_users": unknown,
    }
    Path(str(out) + ".summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    from pipelines._cli import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        summary = label_pairs(args.policy, args.rm, args.prompts, args.out, samples=args.samples,
                              max_prompts=args.max_prompts, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, min_margin=args.min_margin,
                              allow_unfinished=args.allow_unfinished, seed=args.seed,
                              batch_size=args.batch_size, device=args.device)
    except (ConfigError, DataError, ValueError, FileNotFoundError) as exc:
        print(f"label_pairs: error: {exc}", file=sys.stderr)
        return 2
    print(f"label_pairs: {summary['pairs']} pairs from {summary['prompts']} prompts x {summary['samples_per_prompt']} "
          f"samples -> {args.out}")
    for g, d in sorted(summary["mean_words_per_group"].items()):
        print(f"  {g}: chosen {d['chosen']:.1f} words, rejected {d['rejected']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
