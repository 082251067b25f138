"""Does a new minority user adapted from 8 comparisons answer like the minority, with real text? (issue 24)

    python experiments/check_adapt_demo.py --run RUN_DIR/pdpo --data RUN_DIR/data [--source-user user_5] [--k 8]
        [--steps 50] [--lr 0.05] [--out DIR] [--threads N]

Takes the first k training comparisons of a trained minority user (`--source-user`, default user_5), relabels them
as a new user, and adapts that user on a *copy* of the P-DPO run (`--out`, default RUN_DIR/../adapt_check; the run
itself is not touched) with `pipelines.adapt_user`, i.e. with the run's own objective (for the demo's P-DPO run:
alpha 0.75, beta 0.1, nll_weight 0.5). Then decodes the held-out prompts of DATA/eval.jsonl greedily and prints,
per label, mean words / tokens / distinct-token share (a run of one token is one "word": the share shows it):

- the new user after adaptation, against the majority users, the trained minority users and the generic user (the
  new user before adaptation: a new row starts at the generic embedding);
- the new user fitted on the same k comparisons with the objective adapt_user used before issue 24 (the DPO term
  for the user alone, no NLL term): the same function with `alpha=1, nll_weight=0`, on a scratch row never saved.

Pass: distinct-token share >= 0.6 and words <= 0.5 x the majority's. Writes OUT/check_adapt_demo.json (every
answer included). Costs two fits and (labels x prompts) greedy answers on CPU: minutes on SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.run_users import RunAdapter, objective_closure  # noqa: E402
from pipelines.adapt_user import adapt_user  # noqa: E402
from policy.generation import generate_per_user  # noqa: E402
from preference_data import load_records  # noqa: E402
from user_models.adaptation import fit_user_embedding  # noqa: E402

NEW = "new_minority"
OLD = "new_minority (pre-issue-24 objective: no NLL, user term only)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the demo's P-DPO run folder (RUN_DIR/pdpo)")
    ap.add_argument("--data", required=True, help="the demo's data folder (train.jsonl, eval.jsonl)")
    ap.add_argument("--source-user", default="user_5", help="trained minority user whose comparisons are reused")
    ap.add_argument("--k", type=int, default=8, help="comparisons of the new user (default 8)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--out", help="the adapted copy of the run (default: RUN_DIR/../adapt_check)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="default: the run's eval.max_new_tokens")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    run, data = Path(args.run), Path(args.data)
    out = Path(args.out) if args.out else run.parent / "adapt_check"
    t0 = time.time()

    train = load_records(data / "train.jsonl")
    shots = [replace(r, user_id=NEW) for r in train if r.user_id == args.source_user][:args.k]
    if len(shots) < args.k:
        raise SystemExit(f"{data / 'train.jsonl'}: only {len(shots)} comparisons of {args.source_user}")
    held = load_records(data / "eval.jsonl")
    prompts = list(dict.fromkeys(r.prompt for r in held))
    groups = {r.user_id: r.group for r in train + held if r.user_id}

    summary = adapt_user(run, shots, NEW, steps=args.steps, lr=args.lr, out=out)
    ad = RunAdapter(out)
    if ad.route != "dpo":
        raise SystemExit(f"{run}: a {ad.route} run; this check is for the demo's P-DPO run")

    # The same k comparisons fitted with what adapt_user minimised before issue 24, on a row that is never saved.
    old_idx = ad.scratch_user()
    pairs = ad.encode(shots, old_idx, "shots")
    old_loss = replace(ad.loss_cfg, alpha=1.0, nll_weight=0.0)
    closure = objective_closure(ad.model, ad.route, old_loss, pairs, ad.pad_id, ad.batch_size, ad.fixed)
    old_fit = fit_user_embedding(ad.user_model, old_idx, closure, steps=args.steps, lr=args.lr, freeze=[ad.model])

    majority = sorted((u for u in ad.vocab.ids if groups.get(u) == "majority"), key=ad.vocab.index)
    minority = sorted((u for u in ad.vocab.ids if groups.get(u) == "minority"), key=ad.vocab.index)
    users = {NEW: ad.vocab.index(NEW), OLD: old_idx, "<generic> (= the new user before)": 0,
             **{u: ad.vocab.index(u) for u in majority + minority}}
    max_new = args.max_new_tokens or ad.cfg.eval.max_new_tokens
    gen = generate_per_user(ad.model, ad.encoder, prompts, users, max_new, ad.pad_id, batch_size=16,
                            include_reference=False)

    def mean(labels, key):
        return sum(gen[key][u] for u in labels) / len(labels)

    rows = [(NEW, [NEW]), (OLD, [OLD]), ("<generic> (= the new user before)", ["<generic> (= the new user before)"]),
            (f"majority ({len(majority)} users)", majority), (f"minority ({len(minority)} trained users)", minority)]
    table = {label: {"words": mean(us, "users"), "tokens": mean(us, "response_tokens"),
                     "distinct_token_share": mean(us, "distinct_token_share")} for label, us in rows}
    major_words = table[rows[3][0]]["words"]
    for label in (NEW, OLD):
        table[label]["words_vs_majority"] = table[label]["words"] / major_words
    new = table[NEW]
    passed = new["distinct_token_share"] >= 0.6 and new["words_vs_majority"] <= 0.5

    print(f"\nrun {run} (copy adapted: {out}); new user = {args.k} training comparisons of {args.source_user}; "
          f"{len(prompts)} held-out prompts, greedy, {max_new} new tokens at most")
    print(f"adaptation ({summary['route']} objective of the run: alpha {ad.loss_cfg.alpha}, beta {ad.loss_cfg.beta}, "
          f"nll_weight {ad.loss_cfg.nll_weight}): loss {summary['initial_loss']:.4f} -> {summary['final_loss']:.4f}, "
          f"accuracy on the k pairs {summary['train_accuracy_generic']} -> {summary['train_accuracy_adapted']}, "
          f"{summary['wall_s']:.0f} s")
    print(f"pre-issue-24 objective on the same pairs: loss {old_fit.losses[0]:.4f} -> {old_fit.final_loss:.4f}")
    print(f"\n{'':66s}{'words':>8s}{'tokens':>8s}{'distinct':>10s}{'x major':>9s}")
    for label, _ in rows:
        t = table[label]
        ratio = f"{t['words_vs_majority']:9.2f}" if "words_vs_majority" in t else ""
        print(f"{label:66s}{t['words']:8.1f}{t['tokens']:8.1f}{t['distinct_token_share']:10.2f}{ratio}")
    for label in (NEW, OLD):
        print(f"\n{label}, first answers:")
        for ex in gen["texts"][label][:3]:
            print(f"  {ex['prompt'][:60]!r} -> {ex['response'][:120]!r}")
    print(f"\ncheck (distinct-token share >= 0.6 and words <= 0.5 x majority): {'PASS' if passed else 'FAIL'}; "
          f"{time.time() - t0:.0f} s")
    (out / "check_adapt_demo.json").write_text(json.dumps(
        {"run": str(run), "source_user": args.source_user, "k": args.k, "steps": args.steps, "lr": args.lr,
         "summary": summary, "old_objective_fit": old_fit.to_dict(), "table": table, "passed": passed,
         "texts": gen["texts"]}, indent=1))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
