"""A disk cache of LLM-judge replies, so that a rerun (or a run that stopped half-way) asks the endpoint only what it
has not answered yet.

SQLite, one row per request, committed one at a time: a transaction is atomic, so a process killed mid-write
leaves the previous state, never a torn file (a JSONL appended to could end in half a line). Several processes may
share one cache (SQLite's file lock; a writer waits up to 30 s).

The key is a SHA-256 over everything that decides the reply: the judge (base URL + model + request settings), the
template's text and the texts judged (prompt, both answers in their order, user text). The raw reply is stored, not
the parsed verdict, so that a stricter or fixed parser re-reads old replies correctly.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path


def cache_key(**parts) -> str:
    """SHA-256 of the parts as canonical JSON (sorted keys): equal parts, equal key."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class VerdictCache:
    FILE = "verdicts.sqlite"

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / self.FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), timeout=30.0)
        self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, judge TEXT NOT NULL, "
                         "reply TEXT NOT NULL, created REAL NOT NULL)")
        self._db.commit()

    def get(self, key: str) -> str | None:
        row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, judge: str, reply: str) -> None:
        with self._db:  # one transaction per reply: committed, or not there at all
            self._db.execute("INSERT OR REPLACE INTO replies (key, judge, reply, created) VALUES (?, ?, ?, ?)",
                             (key, judge, reply, time.time()))

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        self._db.close()
