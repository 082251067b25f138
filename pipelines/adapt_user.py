"""`python -m pipelines.adapt_user --run RUN_DIR --data new_user.jsonl --user-id NAME [--steps 50 --lr 0.05
--overwrite --out DIR]`

Adds one new user to a finished run by fitting *only that user's embedding* on a few of their comparisons: the
LLM, its LoRA adapters, the heads, the generic embedding e_0 / the cluster centres and every other user's row stay
frozen and bit-identical. Individual user model: the user's offset row o_i; cluster user model: the user's weight
logits a_i (w_i = softmax(a_i) on the simplex). The uniform user model is refused (nothing user-specific).

Loss: the run's own training objective, for the new user's pairs: an RM run's personalized Bradley-Terry
objective, a P-DPO run's objective (loss.alpha, loss.beta, loss.loss_type, loss.nll_weight, ...), and for a PPO run
the DPO loss on the implicit reward of the PPO optimum, beta = ppo.kl_coef. See docs/adapt_user.md.

The records used are those whose user_id is NAME (or all records when none carries a user_id). The user is
appended to users.json and to the user table (existing indices unchanged); checkpoint/user_model.* and users.json
are each rewritten atomically (temp file, then rename; the weights first). Adapting a user who already exists is
refused unless --overwrite, which refits that row from the generic init. With --out the run folder is copied there
first and the original is left untouched.

`--curve` runs the k-shot learning curve instead (nothing is written to the run): for each held-out user, fit a
fresh row on their first k comparisons (k in --ks, k = 0 is the generic user) and score their remaining ones (or
their comparisons in --test-data); writes curve.json, curve.md and curve.png into --out (default
RUN_DIR/adapt_curve/).

The machinery (loading a run for adaptation, the objective closure, the lock, the atomic save) is
`common.run_users`; this stage wires it.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch

from common import run_users
from common.config import Config, ConfigError, load_config
from common.run import seed_everything
from common.run_users import (AdaptError, RunAdapter, accuracy, check_adaptable, copy_run, run_lock,
                              select_user_records, write_json_atomic)
from preference_data import DataError, UserVocab, load_records
from preference_data.records import PreferenceRecord

log = logging.getLogger(__name__)

DEFAULT_KS = (0, 2, 4, 8, 16)

__all__ = ["AdaptError", "RunAdapter", "adapt_user", "learning_curve", "main", "run_lock"]


def _configure(cfg: Config) -> None:
    """What a stage sets for its process: torch threads (`train.num_threads`) and the seeds."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.seed)


def _read(data: str | Path | list, cfg: Config) -> tuple[str, list[PreferenceRecord]]:
    if isinstance(data, list):
        return "<records>", data
    return str(data), load_records(data, on_error=cfg.data.on_error)


# ------------------------------------------------------------------------------------------------- adapt one user


def adapt_user(run_dir: str | Path, data: str | Path | list, user_id: str, steps: int = 50, lr: float = 0.05,
               overwrite: bool = False, out: str | Path | None = None, batch_size: int = 16, l2: float = 0.0,
               device: str | None = None, overrides: list[str] | None = None) -> dict:
    """Fit user `user_id`'s row on their comparisons in `data` (a file or a list of records) and save it into the
    run, or into a copy of it at `out`. Returns the summary of `common.run_users.adapt_user`."""
    run_dir = Path(run_dir)
    if not user_id or not str(user_id).strip():
        raise AdaptError("--user-id must be a non-empty string")
    check_adaptable(run_dir)
    cfg = load_config(run_dir / "config.yaml", overrides)
    _configure(cfg)
    # Everything that can be refused is checked before --out copies the run.
    if user_id in UserVocab.load(run_dir / "users.json") and not overwrite:
        raise AdaptError(f"user {user_id!r} already exists in {run_dir / 'users.json'}; pass --overwrite to refit "
                         "its row from the generic init")
    source, records = _read(data, cfg)
    records = select_user_records(records, user_id, source)
    if not records:
        raise AdaptError(f"{source}: no comparisons to adapt user {user_id!r} on")
    target = Path(out) if out is not None else run_dir
    if target.resolve() != run_dir.resolve():
        with run_lock(run_dir):  # not in the middle of an in-place adapt_user's renames
            copy_run(run_dir, target)
    return run_users.adapt_user(target, records, user_id, steps=steps, lr=lr, overwrite=overwrite, l2=l2,
                                batch_size=batch_size, device=device, overrides=overrides, source=source)


# ----------------------------------------------------------------------------------------------- learning curve


def _records_by_user(records: list[PreferenceRecord]) -> dict[str, list[PreferenceRecord]]:
    by_user: dict[str, list[PreferenceRecord]] = {}
    for r in records:
        if r.user_id is not None:
            by_user.setdefault(r.user_id, []).append(r)
    return by_user


def learning_curve(run_dir: str | Path, data: str | Path | list, users: list[str] | None = None,
                   ks: tuple[int, ...] | list[int] = DEFAULT_KS, out: str | Path | None = None, steps: int = 50,
                   lr: float = 0.05, repeats: int = 1, seed: int = 0, batch_size: int = 16, l2: float = 0.0,
                   device: str | None = None, overrides: list[str] | None = None,
                   test_data: str | Path | list | None = None) -> dict:
    """k-shot curve: for each user, fit a fresh row (from the generic init) on their first k comparisons and
    score held-out ones; k = 0 is the generic user. Nothing is written to the run folder.

    Test pairs: without `test_data`, each user's comparisons in `data` after the first max(ks); with `test_data`,
    all of that user's comparisons there (e.g. prompts never seen in training). Either way every k of a user is
    scored on the same pairs, so the points of a curve are comparable. With `repeats` > 1, repeat r > 0 shuffles
    the user's comparisons in `data` (seed + r) before taking the first k.

    `users`: user ids in `data` (default: every user in `data` who is not in the run's users.json, i.e. held out
    from training). Writes curve.json, curve.md and curve.png into `out` (default RUN_DIR/adapt_curve)."""
    run_dir = Path(run_dir)
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 0:
        raise AdaptError(f"--ks must be non-negative integers, got {ks}")
    check_adaptable(run_dir)
    cfg = load_config(run_dir / "config.yaml", overrides)
    _configure(cfg)
    source, records = _read(data, cfg)
    by_user = _records_by_user(records)
    test_source, test_by_user = None, None
    if test_data is not None:
        test_source, test_records = _read(test_data, cfg)
        test_by_user = _records_by_user(test_records)
    vocab = UserVocab.load(run_dir / "users.json")
    if users:
        missing = [u for u in users if u not in by_user]
        if missing:
            raise AdaptError(f"{source}: no records for user(s) {missing}")
    else:
        users = [u for u in by_user if u not in vocab]
        if not users:
            raise AdaptError(f"{source}: every user in the file was seen in training; hold some users out of "
                             "training (see docs/adapt_user.md) or name them with --users")
    seen = [u for u in users if u in vocab]
    if seen:
        log.warning("users %s were seen in training: their comparisons already shaped e_0 and the LoRA, so their "
                    "curve is optimistic", seen)
    k_max = ks[-1]
    usable = []
    for u in users:
        if test_by_user is None and len(by_user[u]) <= k_max:
            log.warning("user %r has %d comparisons, needs > max k = %d: skipped", u, len(by_user[u]), k_max)
        elif test_by_user is not None and len(by_user[u]) < k_max:
            log.warning("user %r has %d comparisons, needs max k = %d: skipped", u, len(by_user[u]), k_max)
        elif test_by_user is not None and not test_by_user.get(u):
            log.warning("user %r has no comparisons in %s: skipped", u, test_source)
        else:
            usable.append(u)
    if not usable:
        raise AdaptError(f"no user has enough comparisons for max k = {k_max}"
                         + (f" and test pairs in {test_source}" if test_source else ""))
    out = Path(out) if out is not None else run_dir / "adapt_curve"
    out.mkdir(parents=True, exist_ok=True)

    ad = RunAdapter(run_dir, device, overrides, batch_size)
    idx = ad.scratch_user()
    rows = []
    t0 = time.time()
    for u in usable:
        group = by_user[u][0].group
        test_pairs = ad.encode(test_by_user[u], idx, test_source) if test_by_user is not None else None
        for rep in range(max(1, repeats)):
            order = list(by_user[u])
            if rep > 0:
                random.Random(seed + rep).shuffle(order)
            train_pairs = ad.encode(order[:k_max], idx, source)
            if test_by_user is None:
                test_pairs = ad.encode(order[k_max:], idx, source)
            for k in ks:
                res = ad.fit(idx, train_pairs[:k], steps, lr, l2)
                acc = accuracy(ad.margins(test_pairs, as_generic=(k == 0)))
                rows.append({"user": u, "group": group, "seen_in_training": u in vocab, "repeat": rep, "k": k,
                             "accuracy": acc, "n_test": len(test_pairs),
                             "final_loss": res.final_loss if k else None, "fit_s": res.wall_s})
                log.info("curve: user %s repeat %d k=%d accuracy %.3f (%d test pairs, fit %.1f s)", u, rep, k, acc,
                         len(test_pairs), res.wall_s)
    result = {"run": str(run_dir), "route": ad.route, "kind": ad.user_model.kind, "data": source,
              "test_data": test_source, "ks": ks, "steps": steps, "lr": lr, "l2": l2, "repeats": max(1, repeats),
              "rows": rows, "mean": _mean_by(rows, ks), "per_group": {}, "wall_s": time.time() - t0}
    groups = sorted({r["group"] for r in rows if r["group"] is not None})
    for g in groups:
        result["per_group"][g] = _mean_by([r for r in rows if r["group"] == g], ks)
    _write_curve(out, result)
    return result


def _mean_by(rows: list[dict], ks: list[int]) -> dict:
    """{k: mean accuracy over users (each user's repeats averaged first)}."""
    out = {}
    for k in ks:
        per_user: dict[str, list] = {}
        for r in rows:
            if r["k"] == k and r["accuracy"] is not None:
                per_user.setdefault(r["user"], []).append(r["accuracy"])
        vals = [sum(v) / len(v) for v in per_user.values()]
        out[str(k)] = sum(vals) / len(vals) if vals else None
    return out


def _write_curve(out: Path, result: dict) -> None:
    write_json_atomic(out / "curve.json", result)
    ks = result["ks"]
    users = list(dict.fromkeys(r["user"] for r in result["rows"]))
    acc: dict[tuple[str, int], list] = {}
    for r in result["rows"]:
        acc.setdefault((r["user"], r["k"]), []).append(r["accuracy"])
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    groups = {r["user"]: r["group"] for r in result["rows"]}
    n_test = {r["user"]: r["n_test"] for r in result["rows"]}
    lines = [f"# k-shot user adaptation curve of `{result['run']}` ({result['route']} route, "
             f"{result['kind']} user model)", "",
             f"Data `{result['data']}`; {result['steps']} Adam steps at lr {result['lr']} (l2 {result['l2']}), "
             f"{result['repeats']} repeat(s). k = 0 is the generic user. Test pairs: "
             + (f"each user's comparisons in `{result['test_data']}`." if result.get("test_data") else
                f"each user's comparisons after the first {max(ks)}."), "",
             "| user | group | n test | " + " | ".join(f"k={k}" for k in ks) + " |",
             "|---|---|---|" + "---|" * len(ks)]
    for u in users:
        vals = [acc.get((u, k)) for k in ks]
        lines.append(f"| {u} | {groups[u] or '-'} | {n_test[u]} | " +
                     " | ".join(fmt(sum(v) / len(v)) if v else "-" for v in vals) + " |")
    lines.append("| **mean** | | | " + " | ".join(fmt(result["mean"][str(k)]) for k in ks) + " |")
    for g, m in result["per_group"].items():
        lines.append(f"| mean {g} | | | " + " | ".join(fmt(m[str(k)]) for k in ks) + " |")
    lines += ["", "![k-shot curve](curve.png)", ""]
    (out / "curve.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.plots import GROUP_COLOURS, save_figure

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for u in users:
        ys = [sum(acc[(u, k)]) / len(acc[(u, k)]) for k in ks]
        ax.plot(ks, ys, marker=".", lw=1, alpha=0.5, color=GROUP_COLOURS.get(groups[u], "#55A868"))
    ax.plot(ks, [result["mean"][str(k)] for k in ks], marker="o", lw=2.5, color="k", label="mean over users")
    for g, m in result["per_group"].items():
        ax.plot(ks, [m[str(k)] for k in ks], marker="s", lw=1.8, ls="--", color=GROUP_COLOURS.get(g, "#55A868"),
                label=f"mean {g}")
    ax.set_xticks(ks)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("k (comparisons used to fit the user's embedding)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"k-shot user adaptation ({result['route']}, {result['kind']})")
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, out / "curve.png")


# ------------------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.adapt_user", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="finished run folder (rm, dpo or ppo route)")
    parser.add_argument("--data", required=True, help="the user's comparisons (contract record, .jsonl/.json/.parquet)")
    parser.add_argument("--user-id", help="id of the user to add (records with this user_id are used; all records "
                                          "when none has a user_id). Required unless --curve")
    parser.add_argument("--steps", type=int, default=50, help="Adam steps on the user's row (default 50)")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default 0.05)")
    parser.add_argument("--l2", type=float, default=0.0,
                        help="penalty l2 * ||row - generic init||^2 (a prior for very small k; default 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="comparisons per forward pass (default 16)")
    parser.add_argument("--overwrite", action="store_true", help="refit a user who already exists")
    parser.add_argument("--out", help="write the adapted run here (a copy) instead of in place; with --curve the "
                                      "folder for curve.json/md/png (default RUN_DIR/adapt_curve)")
    parser.add_argument("--device", help="cpu or cuda (default: the run's train.device)")
    parser.add_argument("--curve", action="store_true", help="run the k-shot learning curve instead")
    parser.add_argument("--users", help="--curve: comma-separated user ids (default: users absent from training)")
    parser.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), help="--curve: k values (default 0,2,4,8,16)")
    parser.add_argument("--repeats", type=int, default=1, help="--curve: shuffled repeats per user (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="--curve: seed of the shuffles")
    parser.add_argument("--test-data", help="--curve: score each user on their comparisons in this file (default: "
                                            "their comparisons in --data after the first max k)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="run config overrides")
    args = parser.parse_args(argv)
    from pipelines._cli import setup_logging

    setup_logging()
    try:
        if args.steps < 0 or args.lr <= 0:
            raise AdaptError("--steps must be >= 0 and --lr > 0")
        if args.curve:
            users = [u.strip() for u in args.users.split(",") if u.strip()] if args.users else None
            try:
                ks = [int(k) for k in args.ks.split(",") if k.strip()]
            except ValueError:
                raise AdaptError(f"--ks must be comma-separated integers, got {args.ks!r}")
            res = learning_curve(args.run, args.data, users, ks, args.out, args.steps, args.lr, args.repeats,
                                 args.seed, args.batch_size, args.l2, args.device, args.overrides, args.test_data)
            print(json.dumps({"mean": res["mean"], "per_group": res["per_group"]}, indent=1))
            return 0
        if not args.user_id:
            raise AdaptError("--user-id is required (or --curve)")
        summary = adapt_user(args.run, args.data, args.user_id, args.steps, args.lr, args.overwrite, args.out,
                             args.batch_size, args.l2, args.device, args.overrides)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:  # AdaptError is a ValueError
        print(f"adapt_user: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
