"""User-id vocabulary: source annotator ids -> 1..m; unseen or missing ids -> 0, the generic user."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

GENERIC = 0


class UserVocab:
    def __init__(self, ids: Iterable[str] = ()):
        self._index: dict[str, int] = {}
        for uid in ids:
            self.add(uid)

    @classmethod
    def from_records(cls, records) -> "UserVocab":
        """Seen users in order of first appearance, so the mapping is deterministic for a given file."""
        return cls(r.user_id for r in records if r.user_id is not None)

    def add(self, uid: str) -> int:
        if uid not in self._index:
            self._index[uid] = len(self._index) + 1
        return self._index[uid]

    def index(self, uid: str | None) -> int:
        return self._index.get(uid, GENERIC) if uid is not None else GENERIC

    def __contains__(self, uid: object) -> bool:
        return uid in self._index

    def __len__(self) -> int:
        """m, the number of seen users (the table has m + 1 rows with the generic user)."""
        return len(self._index)

    @property
    def ids(self) -> list[str]:
        return list(self._index)

    def to_dict(self) -> dict[str, int]:
        return dict(self._index)

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"generic": GENERIC, "users": self._index}, indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "UserVocab":
        data = json.loads(Path(path).read_text())
        vocab = cls()
        for uid, idx in sorted(data["users"].items(), key=lambda kv: kv[1]):
            if idx != len(vocab) + 1:
                raise ValueError(f"{path}: user indices must be 1..m without gaps (user {uid!r} has {idx})")
            vocab.add(uid)
        return vocab
