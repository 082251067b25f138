"""What a PPO run's answers look like, beside its win rates: greedy answers cut by the window, per group (from
`pipelines.winrate`'s judgments), and the distinct-token share of every user's answers on `evaluate`'s prompts.

    python experiments/ppo_answer_stats.py RUN [RUN ...]     # each RUN has metrics.json and winrate/judgments.jsonl
"""

from __future__ import annotations

import json
import sys


def main(runs: list[str]) -> int:
    for run in runs:
        generation = json.load(open(f"{run}/metrics.json"))["generation"]
        judged = [json.loads(line) for line in open(f"{run}/winrate/judgments.jsonl")]
        groups = sorted({j["group"] for j in judged})
        cut = {g: sum(1 for j in judged if j["group"] == g and not j["run_finished"]) for g in groups}
        n = {g: sum(1 for j in judged if j["group"] == g) for g in groups}
        group_of = {j["user"]: j["group"] for j in judged}
        share = generation["distinct_token_share"]
        print(run)
        print("  greedy answers cut by the window: " + ", ".join(f"{g} {cut[g]} of {n[g]}" for g in groups))
        for g in groups:
            users = {u: v for u, v in share.items() if group_of.get(u) == g}
            low = min(users, key=users.get)
            print(f"  distinct-token share, {g}: mean {sum(users.values()) / len(users):.2f}, lowest {low} "
                  f"{users[low]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]) if len(sys.argv) > 1 else print(__doc__) or 2)
