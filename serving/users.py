"""The server's users: who is known, and onboarding new ones live.

Onboarding fits one new user's row with the run's own objective (DPO for a policy run, Bradley-Terry for a reward
model) through the project's adaptation library call, `common.run_users.adapt_user` (what `pipelines.adapt_user`
runs): on its own copy of the model, it fits only that row and saves users.json and the user table atomically
under the run folder's lock. Here it runs on one background thread, one user at a time. When it is done, only the user table is reloaded
(users.json first, then the table, so the table never has fewer rows than the vocabulary) and handed to the
serving model's `reload_users`, which swaps an immutable snapshot: requests already decoding keep the prefix
they started with, the next ones as that user get their own.

User ids are data: they are keys of users.json, never file or folder names.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from preference_data.records import DataError, validate_record
from preference_data.vocab import UserVocab

log = logging.getLogger(__name__)

FITTED, PENDING, FAILED, UNKNOWN = "fitted", "pending", "failed", "unknown"


class OnboardingError(ValueError):
    """An onboarding request that cannot be accepted: `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class _Job:
    user_id: str
    records: list
    steps: int
    lr: float
    overwrite: bool


class RunUsersAdapt:
    """Onboarding through the project's adaptation library call, `common.run_users.adapt_user`: the run's own
    objective, the run folder's lock (waiting up to `lock_timeout` s for another writer such as a CLI adapt_user),
    atomic saves. One `RunAdapter` (a second copy of the model, for fitting) is loaded at the first onboarding and
    kept for the next ones; it re-reads the run's users under the lock each time."""

    def __init__(self, lock_timeout: float = 60.0):
        self.lock_timeout = lock_timeout
        self._adapter = None

    def __call__(self, run_dir: Path, records: list, user_id: str, steps: int, lr: float, overwrite: bool,
                 device: str) -> dict:
        from common.run_users import RunAdapter, adapt_user

        if self._adapter is None:
            self._adapter = RunAdapter(run_dir, device)
        return adapt_user(run_dir, records, user_id, steps=steps, lr=lr, overwrite=overwrite, adapter=self._adapter,
                          lock_timeout=self.lock_timeout, source="POST /v1/users")


def load_user_state(run_dir: Path):
    """(vocab, user model) as saved in the run folder: users.json first, then the table (adapt_user renames the
    table into place before users.json, so read in this order the table has at least the vocabulary's rows)."""
    from user_models import load_user_model

    vocab = UserVocab.load(run_dir / "users.json")
    user_model = load_user_model(run_dir / "checkpoint")
    if user_model.n_users < len(vocab):
        raise RuntimeError(f"{run_dir}: users.json has {len(vocab)} users but the user table {user_model.n_users}")
    return vocab, user_model


class UserDirectory:
    """Known users (`vocab()` of the serving model) plus the onboarding jobs of this server."""

    def __init__(self, run_dir: str | Path, vocab: Callable[[], UserVocab], reload_users: Callable,
                 refuse_reason: str | None = None, device: str = "cpu", steps: int = 50, lr: float = 0.05,
                 max_pending: int = 8, adapt: Callable | None = None):
        self.run_dir = Path(run_dir)
        self._vocab, self._reload = vocab, reload_users
        self.refuse_reason = refuse_reason  # why this run cannot onboard users (SFT, uniform user model), or None
        self.device, self.steps, self.lr = device, steps, lr
        self.max_pending = max_pending
        self._adapt = adapt if adapt is not None else RunUsersAdapt()
        self._lock = threading.Lock()
        self._pending: dict[str, _Job] = {}
        self._failed: dict[str, str] = {}
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._worker: threading.Thread | None = None

    # -- queries

    def vocab(self) -> UserVocab:
        return self._vocab()

    def status(self, user_id: str) -> dict:
        with self._lock:
            if user_id in self._pending:
                return {"user_id": user_id, "status": PENDING}
            if user_id in self._vocab():
                return {"user_id": user_id, "status": FITTED}
            if user_id in self._failed:
                return {"user_id": user_id, "status": FAILED, "error": self._failed[user_id]}
        return {"user_id": user_id, "status": UNKNOWN}

    def list(self, limit: int, offset: int) -> dict:
        ids = self._vocab().ids
        with self._lock:
            extra = [u for u in list(self._pending) + list(self._failed) if u not in set(ids)]
        everyone = ids + extra
        page = [self.status(u) for u in everyone[offset:offset + limit]]
        return {"object": "list", "data": page, "total": len(everyone), "offset": offset, "limit": limit}

    # -- onboarding

    def onboard(self, user_id: str, comparisons: list[dict], steps: int | None = None, lr: float | None = None,
                overwrite: bool = False) -> dict:
        """Validate and queue one user's fit; returns the pending status. Raises OnboardingError."""
        if self.refuse_reason:
            raise OnboardingError(400, self.refuse_reason)
        records = []
        for i, c in enumerate(comparisons):
            try:
                records.append(validate_record({**c, "user_id": user_id}, "comparisons", None))
            except DataError as exc:
                msg = str(exc).split(": ", 1)[-1]
                raise OnboardingError(400, f"comparisons[{i}]: {msg}", f"comparisons[{i}]") from None
        with self._lock:
            if user_id in self._pending:
                raise OnboardingError(409, f"user {user_id!r} is already being onboarded", "user_id")
            if user_id in self._vocab() and not overwrite:
                raise OnboardingError(409, f"user {user_id!r} already exists; send overwrite: true to refit "
                                           "their row from the generic user", "user_id")
            if len(self._pending) >= self.max_pending:
                raise OnboardingError(429, f"{len(self._pending)} users are already waiting to be onboarded; "
                                           "try again later")
            self._pending[user_id] = _Job(user_id, records, steps or self.steps, lr or self.lr, overwrite)
            self._failed.pop(user_id, None)
            self._ensure_worker()
            self._jobs.put(self._pending[user_id])
        return {"user_id": user_id, "status": PENDING}

    def _ensure_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="prlhf-onboarding", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                summary = self._adapt(self.run_dir, job.records, job.user_id, job.steps, job.lr, job.overwrite,
                                      self.device)
                vocab, user_model = load_user_state(self.run_dir)
                self._reload(vocab, user_model)
                log.info("onboarded user %r (index %s, k=%d) in %.1f s", job.user_id, summary.get("index"),
                         len(job.records), summary.get("total_s", float("nan")))
                error = None
            except Exception as exc:  # noqa: BLE001 - any failure is that job's status, the server goes on
                log.warning("onboarding user %r failed: %s", job.user_id, exc)
                error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)
            with self._lock:
                self._pending.pop(job.user_id, None)
                if error is not None:
                    self._failed[job.user_id] = error

    def close(self, timeout: float = 1.0) -> None:
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join(timeout)  # a fit in progress is not interrupted; the thread is a daemon
