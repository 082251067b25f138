"""Does the reward model grade the whole answer? Its score of pi_SFT's samples binned by length, per group, and of
degenerate answers against real short ones, for every user (issue 19, cause 1).

    python experiments/rm_length_profile.py --rm RUN_DIR/rm --sft RUN_DIR/sft --data RUN_DIR/data/eval.jsonl \
        --out OUT.json [--samples 4] [--max-new-tokens 96]

1. pi_SFT samples `--samples` answers (temperature 1) for every held-out prompt; the RM scores each of them for every
   user. Mean score per group and length bin (words): a reward that grades length rises bin by bin for the majority
   and falls for the minority.
2. Degenerate answers per prompt, scored for every user: the empty answer (EOS at once), one token repeated 20 and
   60 times ("ZZZZ..."), with and without EOS; against the real short answer of the corpus (the minority's chosen).
   Reported: per user, the share of prompts where the real short answer beats every degenerate one.
3. A passage loop per prompt: the real long answer's first 30 tokens, then its tokens 18-30 over and over, cut at
   `--max-new-tokens` without EOS (what PPO found for the majority); reported: per user, the share of prompts where
   the real long answer (the majority's chosen) beats it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policy.loading import generate_texts, load_policy_run  # noqa: E402
from policy.ppo.roles import load_reward_role  # noqa: E402
from preference_data import load_records  # noqa: E402

BINS = [(0, 5), (5, 10), (10, 20), (20, 35), (35, 50), (50, 70), (70, 10_000)]


def bin_of(words: int) -> str:
    for lo, hi in BINS:
        if lo <= words < hi:
            return f"{lo}-{hi - 1}" if hi < 10_000 else f"{lo}+"
    return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rm", required=True)
    ap.add_argument("--sft", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    records = load_records(a.data)
    groups = {r.user_id: r.group for r in records}
    users = sorted(groups, key=lambda u: int(u.split("_")[-1]) if u.split("_")[-1].isdigit() else u)
    prompts = list(dict.fromkeys(r.prompt for r in records))
    short = {r.prompt: r.chosen for r in records if r.group == "minority"}
    long = {r.prompt: r.chosen for r in records if r.group == "majority"}

    sft = load_policy_run(a.sft, "cpu")
    rows = [p for p in prompts for _ in range(a.samples)]
    gen = generate_texts(sft, rows, [None] * len(rows), max_new_tokens=a.max_new_tokens, do_sample=True,
                         seed=a.seed, batch_size=16)
    reward = load_reward_role(a.rm, "cpu")
    same_tokenizer = reward.shares_tokenizer(sft.tokenizer)
    del sft
    tok = reward.tokenizer
    eos = tok.eos_token_id

    # 1. pi_SFT's samples, every user (on the sampled token ids when the RM shares pi_SFT's tokenizer)
    by_bin: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for u in users:
        if same_tokenizer:
            scores = reward.score_ids(rows, [g.token_ids for g in gen], [u] * len(rows), batch_size=16)
        else:
            scores = reward.score(rows, [g.text for g in gen], [u] * len(rows), [g.finished for g in gen])
        for g, s in zip(gen, scores.tolist()):
            by_bin[groups[u]][bin_of(len(g.text.split()))].append(s)
    profile = {grp: {b: {"mean": sum(v) / len(v), "n": len(v)} for b, v in sorted(
        bins.items(), key=lambda kv: int(kv[0].split("-")[0].rstrip("+")))} for grp, bins in by_bin.items()}

    # 2. degenerate answers against the real short answer, per user
    z = tok("Z", add_special_tokens=False).input_ids[:1]
    kinds = {"empty": [eos], "Z x20 + EOS": z * 20 + [eos], "Z x60 (cut)": z * 60, "Z x60 + EOS": z * 60 + [eos]}
    degenerate: dict[str, dict] = {}
    long_ids = [tok(long[p], add_special_tokens=False).input_ids for p in prompts]
    loops = [(ids[:30] + ids[18:30] * a.max_new_tokens)[:a.max_new_tokens] for ids in long_ids]
    for u in users:
        real = reward.score(prompts, [short[p] for p in prompts], [u] * len(prompts))
        per_kind = {k: reward.score_ids(prompts, [ids] * len(prompts), [u] * len(prompts)) for k, ids in kinds.items()}
        worst = torch.stack(list(per_kind.values())).max(0).values
        degenerate[u] = {"group": groups[u], "real_short": float(real.mean()),
                         **{k: float(v.mean()) for k, v in per_kind.items()},
                         "real_short_beats_all_degenerate": float((real > worst).float().mean())}
        real_long = reward.score(prompts, [long[p] for p in prompts], [u] * len(prompts))
        loop = reward.score_ids(prompts, loops, [u] * len(prompts))
        degenerate[u].update({"real_long": float(real_long.mean()), "long loop (cut)": float(loop.mean()),
                              "real_long_beats_loop": float((real_long > loop).float().mean())})

    result = {"rm": a.rm, "sft": a.sft, "data": a.data, "samples": len(gen),
              "sample_words": sorted(len(g.text.split()) for g in gen), "profile": profile,
              "degenerate": degenerate}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    bins = [bin_of(lo) for lo, _ in BINS]
    print("mean RM score of pi_SFT samples by length (words), per group (n per bin in the json)")
    print(f"{'group':<10}" + "".join(f"{b:>9}" for b in bins))
    for grp, prof in profile.items():
        print(f"{grp:<10}" + "".join(f"{prof[b]['mean']:>9.2f}" if b in prof else f"{'-':>9}" for b in bins))
    print("\nper user: real short answer vs degenerate answers (mean scores), share of prompts where the real one wins")
    cols = ["real_short", *kinds, "real_short_beats_all_degenerate", "real_long", "long loop (cut)",
            "real_long_beats_loop"]
    print(f"{'user':<9}{'group':<10}" + "".join(f"{c[:14]:>16}" for c in cols))
    for u, d in degenerate.items():
        print(f"{u:<9}{d['group']:<10}" + "".join(f"{d[c]:>16.2f}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
