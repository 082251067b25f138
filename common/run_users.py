"""The users of a finished run, after training: add one, fit their row with the run's own training objective and
save the user table into the run folder, under one lock per run folder.

What it builds on:
- the objectives are the routes' own, written once next to their losses: `reward.objective.rm_objective` (RM
  runs) and `policy.dpo_objective.pdpo_objective` (P-DPO runs with `cfg.loss`; PPO runs on the implicit reward of
  the PPO optimum, `route_loss_config`);
- the fit of one row is `user_models.adaptation.fit_user_embedding`, which knows nothing of runs;
- log pi_ref and the margins come only from `policy.scoring` / `reward.scoring`.

Users: `pipelines.adapt_user` (the CLI and the k-shot curve) and servers that onboard a user live
(`adapt_user(run_dir, records, user_id, ...)`, see docs/adapt_user.md).

Locking: every writer of a run's users.json and checkpoint/user_model.* holds `run_lock(run_dir)`, an exclusive
`flock` on RUN_DIR/.adapt_user.lock: it excludes other processes and other threads of this one alike.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from common.batching import EncodedPair, PairEncoder, collate_pairs
from common.config import Config, LossConfig, load_config
from common.objective import objective_alpha, to_device
from common.run import RUN_INFO, load_backbone_from_run, pick_device, run_route
from preference_data import UserVocab
from preference_data.records import PreferenceRecord
from user_models import load_user_model
from user_models.adaptation import AdaptationError, FitResult, LossClosure, fit_user_embedding, reset_user
from user_models.user_model import CONFIG_NAME, WEIGHTS_NAME

log = logging.getLogger(__name__)

LOCK_NAME = ".adapt_user.lock"


class AdaptError(AdaptationError):
    """A user error of adaptation: bad arguments, a run that cannot be adapted, a user who already exists, the run
    locked by another writer. One line, meant for the person who asked (the CLI exits with status 2)."""


# --------------------------------------------------------------------------------------------- run folder and lock


def check_adaptable(run_dir: Path) -> dict:
    """The run's checkpoint/user_model.json, after checking the folder has what adaptation needs."""
    run_dir = Path(run_dir)
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


@contextlib.contextmanager
def run_lock(run_dir: str | Path, timeout: float | None = 0.0):
    """Hold the run folder's user-table lock: one writer of users.json / checkpoint/user_model.* at a time (two
    would both append user m + 1), across processes and across threads of one process (an exclusive `flock` on
    RUN_DIR/.adapt_user.lock, taken through a file opened here, so two threads exclude each other too).

    `timeout`: 0 (default) fails at once if the lock is held; > 0 waits up to that many seconds; None waits as
    long as it takes. Failing raises AdaptError("... another adapt_user is updating this run ..."). The lock is
    not re-entrant: a holder that takes it again waits for itself."""
    import fcntl

    run_dir = Path(run_dir)
    deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
    with open(run_dir / LOCK_NAME, "a") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise AdaptError(f"{run_dir}: another adapt_user is updating this run; try again when it is "
                                     "done") from None
                time.sleep(0.05)
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


def write_json_atomic(path: Path, obj) -> None:
    """Write to a temp file, fsync, rename into place: readers see the old or the new file, never half of one."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    _fsync(tmp)
    os.replace(tmp, path)


def copy_run(src: Path, dst: Path) -> None:
    """The parts of a run folder that serving and adaptation need (config, run.json, users.json, metrics.json,
    checkpoint/), copied into a new folder atomically. Hold `run_lock(src)` around it when a writer may be at work
    on `src`. Big unchanged files are hard-linked when possible: every writer in the project replaces files by
    rename, never in place, so the original never sees a change."""
    src, dst = Path(src), Path(dst)
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


# ------------------------------------------------------------------------------------------ the objective of a run


def adaptation_loss_config(cfg: Config, route: str) -> LossConfig:
    """The loss settings a run's users are fitted with: those of the route's training objective (`cfg.loss` for RM
    and P-DPO runs, `route_loss_config` for PPO runs), with one change: a run trained with the stochastic
    estimator is fitted with the exact loss, the stochastic estimator's expectation. A fit is full-batch and
    deterministic (it keeps the row of lowest loss), which a loss that draws its generic pairs anew at every call
    would break."""
    if route == "rm":
        loss = cfg.loss
    else:
        from policy.dpo_objective import route_loss_config

        loss = route_loss_config(cfg, route)
    return replace(loss, estimator="exact")


def _pair_key(p: EncodedPair, with_text: bool) -> tuple:
    key = (tuple(p.prompt_ids), tuple(p.chosen_ids), tuple(p.rejected_ids))
    return key + (tuple(p.text_ids),) if with_text else key


class FixedScores:
    """Scores of pairs that fitting a user's row does not change, computed once per distinct pair: log pi_ref(y|x)
    (policy routes) and the generic user's scores (policy log-probs or RM rewards), for the generic term of a
    two-term objective. Valid while the model's weights and the generic user's embedding stay as they are, i.e.
    during any adaptation."""

    def __init__(self, model, route: str, pad_id: int, batch_size: int, device):
        self.model, self.route, self.pad_id, self.batch_size, self.device = model, route, pad_id, batch_size, device
        self._memo: dict[str, dict[tuple, tuple[float, float]]] = {"reference": {}, "generic": {}}

    def reference(self, pairs: list[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi_ref(y_w|x), log pi_ref(y_l|x) per pair (independent of the user)."""
        from policy.scoring import pair_logps

        return self._scores("reference", pairs, False,
                            lambda ps: pair_logps(self.model, ps, self.pad_id, self.batch_size, self.device,
                                                  reference=True))

    def generic(self, pairs: list[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each pair's (chosen, rejected) score as the generic user 0: RM rewards or policy log-probs."""
        if self.route == "rm":
            from reward.scoring import pair_rewards as score
        else:
            from policy.scoring import pair_logps as score
        return self._scores("generic", pairs, True,
                            lambda ps: score(self.model, ps, self.pad_id, self.batch_size, self.device,
                                             as_generic=True))

    def _scores(self, kind: str, pairs: list[EncodedPair], with_text: bool,
                compute) -> tuple[torch.Tensor, torch.Tensor]:
        memo = self._memo[kind]
        keys = [_pair_key(p, with_text) for p in pairs]
        missing = {k: p for k, p in zip(keys, pairs) if k not in memo}
        if missing:
            w, l = compute(list(missing.values()))
            memo.update({k: (float(a), float(b)) for k, a, b in zip(missing, w, l)})
        return (torch.tensor([memo[k][0] for k in keys], dtype=torch.float32),
                torch.tensor([memo[k][1] for k in keys], dtype=torch.float32))


def objective_closure(model, route: str, loss_cfg: LossConfig, pairs: list[EncodedPair], pad_id: int,
                      batch_size: int, fixed: FixedScores) -> LossClosure:
    """The route's objective over `pairs`, each scored for its own `user_idx` (the row being fitted), as the loss
    closure `fit_user_embedding` takes: one partial loss per batch of `batch_size` pairs, weighted by its share of
    the pairs, so that the parts sum to the objective over all pairs (every term of both objectives is a mean over
    pairs). Batches, log pi_ref and the generic user's scores are computed once, here."""
    alpha = objective_alpha(loss_cfg, model.user_model)
    if alpha <= 0.0:
        raise AdaptError(f"the run was trained with loss.alpha={loss_cfg.alpha}: its objective scores every pair as "
                         "the generic user, so no user's row changes it; there is nothing to fit")
    device = fixed.device
    n = len(pairs)
    chunks = [pairs[i:i + batch_size] for i in range(0, n, batch_size)]
    batches = [to_device(collate_pairs(c, pad_id), device) for c in chunks]
    users = [b["user_idx"][:len(c)] for b, c in zip(batches, chunks)]
    weights = [len(c) / n for c in chunks]
    generic = [fixed.generic(c) if alpha < 1.0 else None for c in chunks]  # constants: the generic term

    if route == "rm":
        from reward.objective import rm_objective

        def closure():
            for batch, u, w, g in zip(batches, users, weights, generic):
                yield w * rm_objective(model, batch, u, loss_cfg, generic_rewards=g)[0]
        return closure

    from policy.dpo_objective import pdpo_objective

    refs = [fixed.reference(c) for c in chunks]

    def closure():
        for batch, u, w, ref, g in zip(batches, users, weights, refs, generic):
            yield w * pdpo_objective(model, batch, u, ref[0], ref[1], loss_cfg, generic_logps=g)[0]
    return closure


# --------------------------------------------------------------------------------------------------- a loaded run


class RunAdapter:
    """A finished run loaded for fitting users' rows: its model (the RM with its head, or the policy), config,
    tokenizer and users. Load once, fit many rows (the k-shot curve; a server onboarding users one after another).

    Nothing of the model is trained: a fit writes one row of the user table (`fit_user_embedding`). The adapter
    touches no process-wide torch setting (threads, seeds): that is its caller's business. One adapter serves one
    thread at a time."""

    def __init__(self, run_dir: str | Path, device: torch.device | str | None = None,
                 overrides: list[str] | None = None, batch_size: int = 16):
        self.run_dir = Path(run_dir)
        check_adaptable(self.run_dir)
        cfg = load_config(self.run_dir / "config.yaml", overrides)
        self.device = torch.device(device) if device is not None else pick_device(cfg)
        self.cfg, self.backbone, self.tokenizer, self.vocab, self.info = load_backbone_from_run(
            self.run_dir, self.device, cfg)
        self.route = run_route(self.info)
        self.encoder = PairEncoder.from_config(self.tokenizer, self.cfg)
        self.pad_id = self.tokenizer.pad_token_id
        self.batch_size = max(1, batch_size)
        if self.route == "rm":
            from reward.model import load_reward_model

            self.model = load_reward_model(self.run_dir, self.cfg, self.backbone)
        else:
            from policy.model import PersonalizedPolicy

            self.model = PersonalizedPolicy(self.backbone)
        self.model.to(self.device).eval()
        self.loss_cfg = adaptation_loss_config(self.cfg, self.route)
        self.fixed = FixedScores(self.model, self.route, self.pad_id, self.batch_size, self.device)

    @property
    def user_model(self):
        return self.backbone.user_model

    # -- users
    def reload_users(self) -> None:
        """Re-read users.json and checkpoint/user_model.* (another writer may have added users since this adapter
        loaded the run). Call it under `run_lock` before adding a user with an adapter kept across calls."""
        check_adaptable(self.run_dir)
        vocab = UserVocab.load(self.run_dir / "users.json")
        user_model = load_user_model(self.run_dir / "checkpoint")
        if user_model.n_users < len(vocab):
            raise AdaptError(f"{self.run_dir}: users.json has {len(vocab)} users, the user table {user_model.n_users}")
        self.backbone.user_model = user_model.to(self.device)
        self.vocab = vocab
        self.fixed = FixedScores(self.model, self.route, self.pad_id, self.batch_size, self.device)
        if hasattr(self, "_scratch"):
            del self._scratch

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
        """The records as pairs, each scored for user `user_idx` (whatever their user_id)."""
        pairs = self.encoder.encode_all(records, self.vocab, source)
        return [replace(p, user_idx=user_idx) for p in pairs]

    # -- objective and scores
    def loss_closure(self, pairs: list[EncodedPair]) -> LossClosure:
        """The run's own training objective on `pairs` (each carrying the fitted user's index), for
        `fit_user_embedding` (see `objective_closure`, `adaptation_loss_config`)."""
        return objective_closure(self.model, self.route, self.loss_cfg, pairs, self.pad_id, self.batch_size,
                                 self.fixed)

    @torch.no_grad()
    def margins(self, pairs: list[EncodedPair], as_generic: bool = False) -> torch.Tensor:
        """Per pair: r(x,y_w,u) - r(x,y_l,u) (RM) or the implicit-reward margin beta * log-ratio difference (policy
        routes, beta = `route_beta`), for each pair's user (or the generic user 0). Positive = ranked right."""
        if self.route == "rm":
            from reward.scoring import reward_margins

            return reward_margins(self.model, pairs, self.pad_id, self.batch_size, self.device, as_generic)
        from policy.dpo_objective import route_beta
        from policy.scoring import implicit_reward_margins, pair_logps

        ref_w, ref_l = self.fixed.reference(pairs)
        w, l = pair_logps(self.model, pairs, self.pad_id, self.batch_size, self.device, as_generic=as_generic)
        return implicit_reward_margins(w, l, ref_w, ref_l, route_beta(self.cfg, self.route))

    def fit(self, user_idx: int, pairs: list[EncodedPair], steps: int = 50, lr: float = 0.05, l2: float = 0.0,
            init: str = "generic") -> FitResult:
        """Fit row `user_idx` on `pairs` with the run's objective; no pairs: the row is reset to the generic init."""
        if not pairs:
            reset_user(self.user_model, user_idx)
            return FitResult(user_idx, self.user_model.kind, 0, lr)
        return fit_user_embedding(self.user_model, user_idx, self.loss_closure(pairs), steps=steps, lr=lr,
                                  init=init, freeze=[self.model], l2=l2)

    # -- save
    def save_users(self, target: str | Path | None = None, extra_info: dict | None = None) -> None:
        """checkpoint/user_model.{safetensors,json}, then users.json, then run.json of `target` (default: the run
        itself), each written to a temp file and renamed into place, the weights first. A kill (or a reader)
        between the renames sees a table with one row more than users.json: loaders ignore that row and the next
        adapt_user reuses it. Hold `run_lock(target)`."""
        target = Path(target) if target is not None else self.run_dir
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
        write_json_atomic(target / RUN_INFO, info)


def accuracy(margins: torch.Tensor) -> float | None:
    """Share of pairs ranked right (margin > 0); None without pairs."""
    return float((margins > 0).float().mean()) if len(margins) else None


# ---------------------------------------------------------------------------------------------- adapt one user


def adapt_user(run_dir: str | Path, records: list[PreferenceRecord], user_id: str, *, steps: int = 50,
               lr: float = 0.05, overwrite: bool = False, l2: float = 0.0, batch_size: int = 16,
               device: str | torch.device | None = None, overrides: list[str] | None = None,
               adapter: RunAdapter | None = None, lock_timeout: float | None = 0.0,
               source: str = "<records>") -> dict:
    """Add user `user_id` to the run in `run_dir` (or refit them, with `overwrite`): fit their row on `records`
    with the run's own training objective and save the user table into the run folder.

    All of it runs under `run_lock(run_dir, lock_timeout)`: the run's users are read, the user added, the row
    fitted and users.json / checkpoint/user_model.* / run.json written (atomically, `RunAdapter.save_users`)
    while no other writer can change them. Readers need no lock: they see the old or the new files (read
    users.json first, then the weights: the table then has at least users.json's rows).

    - `records`: the user's comparisons; those whose user_id is `user_id` are used, or all when none carries a
      user_id. Their prompts, answers and user_text are used; their user_id is not (all are scored as this user).
    - `adapter`: a `RunAdapter` of this same run folder, kept by the caller to skip loading the model at every
      call; its users are re-read from the folder under the lock (`reload_users`). `batch_size`, `device` and
      `overrides` are then the adapter's. None: the run is loaded here.
    - `lock_timeout`: seconds to wait for another writer (0: fail at once with AdaptError; None: wait).
    Raises AdaptError for a user error (bad id, no records, existing user without `overwrite`, uniform user
    model, lock held), FileNotFoundError for a folder that is not a finished run.

    Returns the summary also stored in run.json under adapted_users[user_id]: user_id, index, k, route, kind,
    overwrote, data, train_accuracy_generic / train_accuracy_adapted (on the k pairs), l2, the fit's numbers
    (initial_loss, final_loss, best_step, steps, lr, wall_s, n_parameters), run, total_s."""
    run_dir = Path(run_dir)
    if not user_id or not str(user_id).strip():
        raise AdaptError("the user id must be a non-empty string")
    records = select_user_records(list(records), user_id, source)
    if not records:
        raise AdaptError(f"{source}: no comparisons to adapt user {user_id!r} on")
    if adapter is not None and adapter.run_dir.resolve() != run_dir.resolve():
        raise ValueError(f"the adapter is of {adapter.run_dir}, not of {run_dir}")
    t0 = time.time()
    with run_lock(run_dir, lock_timeout):
        if adapter is None:
            ad = RunAdapter(run_dir, device, overrides, batch_size)
        else:
            ad = adapter
            ad.reload_users()
        exists = user_id in ad.vocab
        if exists and not overwrite:
            raise AdaptError(f"user {user_id!r} already exists in {run_dir / 'users.json'}; pass --overwrite "
                             "(overwrite=True) to refit its row from the generic init")
        if exists:
            idx = ad.vocab.index(user_id)
            reset_user(ad.user_model, idx)  # "before" below is then the generic user, as for a new user
        else:
            idx = ad.add_user(user_id)
        pairs = ad.encode(records, idx, source)
        before = accuracy(ad.margins(pairs))  # the fresh row is the generic user's embedding
        res = ad.fit(idx, pairs, steps, lr, l2)
        after = accuracy(ad.margins(pairs))
        summary = {"user_id": user_id, "index": idx, "k": len(pairs), "route": ad.route,
                   "kind": ad.user_model.kind, "overwrote": exists, "data": source,
                   "train_accuracy_generic": before, "train_accuracy_adapted": after, "l2": l2,
                   **res.to_dict(), "run": str(run_dir)}
        summary["total_s"] = time.time() - t0
        ad.save_users(run_dir, {user_id: {k: v for k, v in summary.items() if k not in ("run", "user_id")}})
    log.info("adapted user %r (index %d) on k=%d comparisons in %.1f s: loss %.4f -> %.4f, train accuracy "
             "%s -> %s", user_id, idx, len(pairs), res.wall_s, res.losses[0] if res.losses else float("nan"),
             res.final_loss, before, after)
    return summary
