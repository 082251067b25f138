"""`python experiments/winrate_summary.py WINRATE_JSON [PPO_HISTORY_JSON]`: one experiment's lines for the notes.

Greedy words per group (run and baseline), the minority / majority ratio and the win rate per group, all read from
`pipelines.winrate`'s winrate.json; with a PPO run's ppo_history.json also the per-group reward, rollout words and KL
of every few iterations. Used by ppo_exp.sh and label_exp.sh.
"""

import json
import sys


def main(winrate_json: str, history_json: str | None = None) -> None:
    result = json.load(open(winrate_json))
    groups = result["per_group"]
    run = {g: v["mean_words"]["run"] for g, v in groups.items()}
    base = {g: v["mean_words"]["baseline"] for g, v in groups.items()}
    ratio = run["minority"] / run["majority"] if run.get("majority") and "minority" in run else None
    print("greedy words run", {g: round(v, 1) for g, v in run.items()}, "sft", {g: round(v, 1) for g, v in base.items()},
          "ratio", None if ratio is None else round(ratio, 3))
    print("win", {g: round(v["win_rate"], 3) for g, v in groups.items()})
    distinct = {u: v["mean_distinct_token_share"]["run"] for u, v in result["per_user"].items()
                if "mean_distinct_token_share" in v}
    if distinct:
        low = min(distinct, key=distinct.get)
        print("distinct-token share: lowest", low, round(distinct[low], 3), "users below 0.6",
              sorted(u for u, d in distinct.items() if d < 0.6))
    if history_json:
        h = json.load(open(history_json))["iterations"]
        q = max(1, len(h) // 4)  # the rollouts' mean reward is noisy: compare the first and last quarter of the run
        for g in h[0]["reward_group"]:
            first = [e["reward_group"][g] for e in h[:q] if g in e["reward_group"]]
            last = [e["reward_group"][g] for e in h[-q:] if g in e["reward_group"]]
            if first and last:
                print(f"reward {g}: first {q} iterations {sum(first) / len(first):.2f}, "
                      f"last {q} {sum(last) / len(last):.2f}")
        for e in h[::max(1, len(h) // 6)] + [h[-1]]:
            print(e["iteration"], "R", {g: round(v, 2) for g, v in e["reward_group"].items()},
                  "W", {g: round(v, 1) for g, v in e["response_words_group"].items()},
                  "KL", {g: round(v, 2) for g, v in e["kl_group"].items()})


if __name__ == "__main__":
    main(*sys.argv[1:3])
