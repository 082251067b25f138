"""`python -m pipelines.adapt_user --run RUN_DIR --data new_user.jsonl --user-id NAME [--steps 50 --lr 0.05
--overwrite --out DIR]`

Adds one new user to a finished run by fitting *only that user's embedding* on a few of their comparisons: the
LLM, its LoRA adapters, the heads, the generic embedding e_0 / the cluster centres and every other user's row stay
frozen and bit-identical. Individual user model: the user's offset row o_i; cluster user model: the user's weight
logits a_i (w_i = softmax(a_i) on the simplex). The uniform user model is refused (nothing user-specific).

Loss: RM runs the Bradley-Terry loss on r(x, y, u); DPO and PPO runs the DPO loss on the policy's implicit reward
beta * log pi(y|x,u) / pi_ref(y|x), with the reference log-probs (no prefix, adapters off) computed once.

The records used are those whose user_id is NAME (or all records when none carries a user_id). The user is
appended to users.json and to the user table (existing indices unchanged); checkpoint/user_model.* and users.json
are each rewritten atomically (temp file, then rename; the weights first, see RunAdapter.save_users). Adapting a user who already exists is refused unless
--overwrite, which refits that row from the generic init. With --out the run folder is copied there first and
the original is left untouched.

`--curve` runs the k-shot learning curve instead (nothing is written to the run): for each held-out user, fit a
fresh row on their first k comparisons (k in --ks, k = 0 is the generic user) and score their remaining ones (or
their comparisons in --test-data); writes curve.json, curve.md and curve.png into --out (default
RUN_DIR/adapt_curve/). See docs/adapt_user.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from common.batching import EncodedPair, PairEncoder, collate_pairs
from common.config import ConfigError, load_config
from common.run import RUN_INFO, load_backbone_from_run, load_head, pick_device, seed_everything
from preference_data import DataError, UserVocab, load_records
from preference_data.records import PreferenceRecord
from user_models.adaptation import AdaptationError, FitResult, fit_user_embedding, reset_user
from user_models.user_model import CONFIG_NAME, WEIGHTS_NAME

log = logging.getLogger(__name__)

DEFAULT_KS = (0, 2, 4, 8, 16)
LOCK_NAME = ".adapt_user.lock"


class AdaptError(AdaptationError):
    """A user error of adapt_user (reported as one line, exit status 2)."""


# ----------------------------------------------------------------------------------------------- records and run


def select_user_records(records: list[PreferenceRecord], user_id: str, source: str = "data") -> list[PreferenceRecord]:
    """The records of `user_id`; all records when none carries a user_id."""
    ids = {r.user_id for r in records if r.user_id is not None}
    if not ids:
        return list(records)
    mine = [r for r in records if r.user_id == user_id]
    if not mine:
        shown = ", ".join(sorted(ids)[:10]) + (" ..." if len(ids) > 10 else "")
        raise AdaptError(f"{source}: no records with user_id {user_id!r} (user ids in the file: {shown})")
    return mine


def _check_run_dir(run_dir: Path) -> dict:
    """The run's user_model.json, after checking the run folder has what adaptation needs."""
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml)")
    um_json = run_dir / "checkpoint" / CONFIG_NAME
    if not um_json.exists():
        raise FileNotFoundError(f"{run_dir}: run has no final checkpoint/ (did training finish?)")
    for name in ("users.json", RUN_INFO):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir}: run has no {name}")
    um = json.loads(um_json.read_text())
    if um.get("kind") == "uniform":
        raise AdaptError(f"{run_dir}: the run's user model is 'uniform' (vanilla RLHF): every user has the same "
                         "embedding, so there is nothing user-specific to fit. Adapt a run trained with "
                         "user_model.kind=individual or cluster.")
    return um


def _route(info: dict) -> str:
    return info.get("route") or {"train_rm": "rm", "train_pdpo": "dpo", "train_ppo": "ppo"}[info["stage"]]


@contextlib.contextmanager
def _run_lock(run_dir: Path):
    """One adapt_user at a time per run folder (two would both append user m + 1)."""
    import fcntl

    with open(run_dir / LOCK_NAME, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AdaptError(f"{run_dir}: another adapt_user is updating this run; try again when it is done")
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    _fsync(tmp)
    os.replace(tmp, path)


def copy_run(src: Path, dst: Path) -> None:
    """The parts of a run folder that serving/adaptation need (config, run.json, users.json, checkpoint/), copied
    into a new folder atomically. Big unchanged files are hard-linked when possible: every writer in the project
    replaces files by rename, never in place, so the original never sees a change."""
    if dst.exists() and any(dst.iterdir()):
        raise AdaptError(f"--out {dst} exists and is not empty; choose a new folder (or adapt in place)")
    tmp = dst.parent / f".tmp-{dst.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    def link_or_copy(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    for name in ("config.yaml", RUN_INFO, "users.json", "metrics.json"):
        if (src / name).exists():
            shutil.copy2(src / name, tmp / name)
    shutil.copytree(src / "checkpoint", tmp / "checkpoint", copy_function=link_or_copy,
                    ignore=shutil.ignore_patterns(".tmp-*"))  # a killed writer's leftovers
    if dst.exists():
        dst.rmdir()
    os.replace(tmp, dst)


class RunAdapter:
    """A loaded run, ready to fit and score users' rows many times (the CLI fits one, the curve many)."""

    def __init__(self, run_dir: str | Path, device: torch.device | str | None = None,
                 overrides: list[str] | None = None, batch_size: int = 16):
        self.run_dir = Path(run_dir)
        _check_run_dir(self.run_dir)
        cfg = load_config(self.run_dir / "config.yaml", overrides)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        seed_everything(cfg.seed)
        self.device = torch.device(device) if device is not None else pick_device(cfg)
        self.cfg, self.backbone, self.tokenizer, self.vocab, self.info = load_backbone_from_run(
            self.run_dir, self.device, cfg)
        self.route = _route(self.info)
        self.encoder = PairEncoder.from_config(self.tokenizer, self.cfg)
        self.pad_id = self.tokenizer.pad_token_id
        self.batch_size = max(1, batch_size)
        if self.route == "rm":
            from reward.model import PersonalizedRewardModel

            self.model = PersonalizedRewardModel(self.backbone)
            load_head(self.run_dir, "score", self.model.score)
        else:
            from policy.model import PersonalizedPolicy

            self.model = PersonalizedPolicy(self.backbone)
        self.model.to(self.device).eval()
        self._ref_cache: dict[int, tuple[list, list]] = {}  # id(pairs) -> (pairs, per-batch ref log-probs)

    @property
    def user_model(self):
        return self.backbone.user_model

    # -- users
    def add_user(self, user_id: str) -> int:
        """Append `user_id` to the vocabulary and a generic-initialised row to the user table."""
        if user_id in self.vocab:
            raise AdaptError(f"user {user_id!r} already exists (index {self.vocab.index(user_id)})")
        idx = self.vocab.add(user_id)
        if self.user_model.n_users >= idx:  # a row an interrupted save left without its users.json entry
            reset_user(self.user_model, idx)
            new = idx
        else:
            (new,) = self.user_model.implicit.add_users(1)
        if new != idx:
            raise RuntimeError(f"user table gave index {new} but users.json gives {idx}")
        return idx

    def scratch_user(self) -> int:
        """A row for fits that are never saved (the learning curve); not in the vocabulary."""
        if not hasattr(self, "_scratch"):
            (self._scratch,) = self.user_model.implicit.add_users(1)
        return self._scratch

    # -- data
    def encode(self, records: list[PreferenceRecord], user_idx: int, source: str = "data") -> list[EncodedPair]:
        pairs = self.encoder.encode_all(records, self.vocab, source)
        return [replace(p, user_idx=user_idx) for p in pairs]

    def _batches(self, pairs: list[EncodedPair]) -> list[tuple[int, dict]]:
        out = []
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i:i + self.batch_size]
            out.append((len(chunk), {k: v.to(self.device) for k, v in collate_pairs(chunk, self.pad_id).items()}))
        return out

    def _reference(self, pairs: list[EncodedPair], batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """log pi_ref(y_w|x), log pi_ref(y_l|x) per batch: no prefix, adapters off, so independent of the user
        and computed once per pair list."""
        key = id(pairs)
        if key not in self._ref_cache:
            refs = []
            for b, batch in batches:
                lp = self.model.reference_logps(batch)
                refs.append((lp[:b].detach(), lp[b:].detach()))
            self._ref_cache[key] = (pairs, refs)  # keep `pairs` alive so its id stays unique
        return self._ref_cache[key][1]

    # -- loss and scores
    def loss_closure(self, pairs: list[EncodedPair]):
        """The route's loss on `pairs` (each already carrying the adapted user's index), as partial losses per
        batch that sum to the mean over pairs. Batches (and DPO reference log-probs) are built once."""
        from policy.dpo_loss import dpo_margins, preference_loss
        from reward.loss import bt_loss

        batches = self._batches(pairs)
        n = len(pairs)
        ls = self.cfg.loss.label_smoothing
        if self.route == "rm":
            def closure():
                for b, batch in batches:
                    r = self.model(batch)
                    yield bt_loss(r[:b], r[b:], ls).sum() / n
            return closure
        refs = self._reference(pairs, batches)
        beta = self.cfg.loss.beta
        loss_type = self.cfg.loss.loss_type if self.route == "dpo" else "sigmoid"

        def closure():
            for (b, batch), (ref_w, ref_l) in zip(batches, refs):
                lp = self.model.sequence_logps(batch)
                yield preference_loss(dpo_margins(lp[:b], lp[b:], ref_w, ref_l), beta, loss_type, ls).sum() / n
        return closure

    @torch.no_grad()
    def margins(self, pairs: list[EncodedPair], as_generic: bool = False) -> torch.Tensor:
        """Per pair: r(x,y_w,u) - r(x,y_l,u) (RM) or the implicit-reward margin (DPO/PPO), for each pair's user
        (or the generic user 0). Positive = ranked right."""
        batches = self._batches(pairs)
        out = []
        refs = self._reference(pairs, batches) if self.route != "rm" else [None] * len(batches)
        for (b, batch), ref in zip(batches, refs):
            if as_generic:
                batch = {**batch, "user_idx": torch.zeros_like(batch["user_idx"])}
            if self.route == "rm":
                r = self.model(batch)
                out.append((r[:b] - r[b:]).cpu())
            else:
                lp = self.model.sequence_logps(batch)
                out.append((self.cfg.loss.beta * ((lp[:b] - ref[0]) - (lp[b:] - ref[1]))).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def fit(self, user_idx: int, pairs: list[EncodedPair], steps: int = 50, lr: float = 0.05, l2: float = 0.0,
            init: str = "generic") -> FitResult:
        if not pairs:
            reset_user(self.user_model, user_idx)
            return FitResult(user_idx, self.user_model.kind, 0, lr)
        return fit_user_embedding(self.user_model, user_idx, self.loss_closure(pairs), steps=steps, lr=lr,
                                  init=init, freeze=[self.model], l2=l2)

    # -- save
    def save_users(self, target: Path, extra_info: dict | None = None) -> None:
        """checkpoint/user_model.{safetensors,json}, then users.json, then run.json, each written to a temp file
        and renamed into place, the weights first. A kill (or a reader) between the renames sees a table with one
        row more than users.json: loaders ignore that row and the next adapt_user reuses it."""
        ckpt = target / "checkpoint"
        tmp = ckpt / f".tmp-adapt-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        self.user_model.save(tmp)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            _fsync(tmp / name)
        os.replace(tmp / WEIGHTS_NAME, ckpt / WEIGHTS_NAME)
        os.replace(tmp / CONFIG_NAME, ckpt / CONFIG_NAME)
        tmp.rmdir()
        self.vocab.save(target / "users.json")
        info = json.loads((target / RUN_INFO).read_text())
        info["n_users"] = len(self.vocab)
        info["user_model"] = self.user_model.describe()
        if extra_info:
            info.setdefault("adapted_users", {}).update(extra_info)
        _write_json_atomic(target / RUN_INFO, info)


def _accuracy(margins: torch.Tensor) -> float | None:
    return float((margins > 0).float().mean()) if len(margins) else None


# ------------------------------------------------------------------------------------------------- adapt one user


def adapt_user(run_dir: str | Path, data: str | Path | list, user_id: str, steps: int = 50, lr: float = 0.05,
               overwrite: bool = False, out: str | Path | None = None, batch_size: int = 16, l2: float = 0.0,
               device: str | None = None, overrides: list[str] | None = None) -> dict:
    """Fit user `user_id`'s row on their comparisons in `data` and save it into the run (or a copy at `out`).
    Returns a summary: index, k, losses, accuracy on the k pairs as generic user and after adaptation."""
    run_dir = Path(run_dir)
    if not user_id or not str(user_id).strip():
        raise AdaptError("--user-id must be a non-empty string")
    _check_run_dir(run_dir)
    cfg = load_config(run_dir / "config.yaml", overrides)
    exists = user_id in UserVocab.load(run_dir / "users.json")
    if exists and not overwrite:
        raise AdaptError(f"user {user_id!r} already exists in {run_dir / 'users.json'}; pass --overwrite to refit "
                         "its row from the generic init")
    source = str(data) if not isinstance(data, list) else "<records>"
    records = data if isinstance(data, list) else load_records(data, on_error=cfg.data.on_error)
    records = select_user_records(records, user_id, source)
    if not records:
        raise AdaptError(f"{source}: no comparisons to adapt user {user_id!r} on")
    target = Path(out) if out is not None else run_dir
    if target.resolve() != run_dir.resolve():
        with _run_lock(run_dir):  # not in the middle of an in-place adapt_user's renames
            copy_run(run_dir, target)
    t0 = time.time()
    with _run_lock(target):
        ad = RunAdapter(target, device, overrides, batch_size)
        if user_id in ad.vocab:
            if not overwrite:  # appeared meanwhile
                raise AdaptError(f"user {user_id!r} already exists in {target / 'users.json'}; pass --overwrite")
            idx = ad.vocab.index(user_id)
            reset_user(ad.user_model, idx)
        else:
            idx = ad.add_user(user_id)
        pairs = ad.encode(records, idx, source)
        before = _accuracy(ad.margins(pairs))  # the fresh row is the generic user's embedding
        res = ad.fit(idx, pairs, steps, lr, l2)
        after = _accuracy(ad.margins(pairs))
        summary = {"user_id": user_id, "index": idx, "k": len(pairs), "route": ad.route,
                   "kind": ad.user_model.kind, "overwrote": exists, "data": source,
                   "train_accuracy_generic": before, "train_accuracy_adapted": after, "l2": l2,
                   **res.to_dict(), "run": str(target)}
        summary["total_s"] = time.time() - t0
        ad.save_users(target, {user_id: {k: v for k, v in summary.items() if k not in ("run", "user_id")}})
    log.info("adapted user %r (index %d) on k=%d comparisons in %.1f s: loss %.4f -> %.4f, train accuracy "
             "%s -> %s", user_id, idx, len(pairs), res.wall_s, res.losses[0] if res.losses else float("nan"),
             res.final_loss, before, after)
    return summary


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
    _check_run_dir(run_dir)
    cfg = load_config(run_dir / "config.yaml", overrides)

    def read(d):
        return (str(d) if not isinstance(d, list) else "<records>",
                d if isinstance(d, list) else load_records(d, on_error=cfg.data.on_error))

    source, records = read(data)
    by_user = _records_by_user(records)
    test_source, test_by_user = None, None
    if test_data is not None:
        test_source, test_records = read(test_data)
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
                acc = _accuracy(ad.margins(test_pairs, as_generic=(k == 0)))
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
    _write_json_atomic(out / "curve.json", result)
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
