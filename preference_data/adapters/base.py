"""Shared pieces of the source adapters: the report, file readers that know positions, small text helpers.

Every adapter is a function `read_<source>(paths, **options) -> (records, AdapterReport)`. Malformed input
raises `DataError` naming the file, the line (JSON lines) or row (CSV / JSON list) and the field; data that is
well formed but not a usable comparison (a tie, identical responses, ...) is dropped and counted per reason in
`AdapterReport.dropped`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from preference_data.records import DataError, PreferenceRecord


@dataclass
class AdapterReport:
    """What an adapter read, wrote and dropped (per reason), plus source-specific details in `extra`."""

    source: str = ""
    n_read: int = 0  # input units read (lines / rows / conversations; see each adapter's doc)
    n_written: int = 0  # comparison records returned
    dropped: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # later turn's prompt -> its conversation's first user message: a train/eval split keeps them on one side, or
    # the held-out turn 2 would hold a training prompt (turn 1) word for word
    related_prompts: dict[str, str] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        return (f"{self.source}: read {self.n_read}, wrote {self.n_written}, "
                f"dropped {self.n_dropped} ({reasons})")


# --------------------------------------------------------------------------------------------------- paths
def as_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = [Path(p) for p in paths]
    if not out:
        raise DataError("no input files given")
    for p in out:
        if not p.exists():
            raise DataError(f"{p}: data file not found")
        if p.is_dir():
            raise DataError(f"{p}: is a directory, expected a data file")
    return out


# --------------------------------------------------------------------------------------------------- JSON
def iter_json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, object) for every record of a JSON-lines file or a file holding one JSON list.

    `where` is "file:line" for JSON lines and "file row N" for a JSON list, ready for error messages.
    """
    with path.open("r", encoding="utf-8") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith("["):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(data, list):  # pragma: no cover - starts with "[" so it is a list
            raise DataError(f"{path}: expected a JSON list of records or JSON lines")
        for i, obj in enumerate(data, start=1):
            yield f"{path} row {i}", obj
        return
    with path.open("r", encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            yield where, obj


def require_mapping(obj: Any, where: str, name: str = "record") -> Mapping:
    if not isinstance(obj, Mapping):
        what = "expected a JSON object" if name == "record" else f"field '{name}' must be an object"
        raise DataError(f"{where}: {what}, got {type(obj).__name__}")
    return obj


def get_str(obj: Mapping, key: str, where: str, *, label: str | None = None, required: bool = True,
            allow_empty: bool = True) -> str | None:
    """obj[key] as a string; DataError naming `label` (default key) when missing or of the wrong type."""
    label = label or key
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(f"{where}: missing field '{label}'")
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{label}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{label}' is empty")
    return value


def get_id(obj: Mapping, key: str, where: str, *, label: str | None = None) -> str:
    """An annotator id: a non-empty string (numbers are turned into their decimal text)."""
    label = label or key
    if key not in obj or obj[key] is None:
        raise DataError(f"{where}: missing field '{label}'")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: field '{label}' must be a string id, got {type(value).__name__}")
    value = str(value).strip()
    if not value:
        raise DataError(f"{where}: field '{label}' is empty")
    return value


# --------------------------------------------------------------------------------------------------- CSV
def _raise_csv_limit() -> None:
    limit = sys.maxsize
    while True:  # conversations in one cell exceed csv's default 128 KiB field limit
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 10


def iter_csv_rows(path: Path, required_columns: Iterable[str] = ()) -> Iterator[tuple[str, dict[str, str]]]:
    """(where, row dict) for every data row of a CSV file, or of the single CSV inside a .zip file.

    `where` is "file row N" (N counts data rows from 1; cells may span lines, so line numbers would lie).
    Raises DataError naming the file when a required column is missing.
    """
    _raise_csv_limit()
    if path.suffix.lower() == ".zip":
        try:
            zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise DataError(f"{path}: not a valid zip file") from None
        with zf:
            names = [n for n in zf.namelist() if n.lower().endswith(".csv") and not n.startswith("__MACOSX")]
            if len(names) != 1:
                raise DataError(f"{path}: expected exactly one .csv inside the zip, found {len(names)}")
            label = f"{path}!{names[0]}"
            with zf.open(names[0]) as raw:
                yield from _csv_rows(io.TextIOWrapper(raw, encoding="utf-8-sig", newline=""), label,
                                     required_columns)
        return
    with path.open("r", encoding="utf-8-sig", newline="") as fh:
        yield from _csv_rows(fh, str(path), required_columns)


def _csv_rows(fh, label: str, required_columns: Iterable[str]) -> Iterator[tuple[str, dict[str, str]]]:
    reader = csv.DictReader(fh)
    header = reader.fieldnames or []
    missing = [c for c in required_columns if c not in header]
    if missing:
        raise DataError(f"{label} header: missing column(s) {', '.join(repr(c) for c in missing)}")
    try:
        for i, row in enumerate(reader, start=1):
            if None in row:
                raise DataError(f"{label} row {i}: more cells than header columns")
            yield f"{label} row {i}", row
    except csv.Error as exc:
        raise DataError(f"{label} row {reader.line_num}: malformed CSV ({exc})") from None


# --------------------------------------------------------------------------------------------------- text
def word_count(text: str) -> int:
    return len(text.split())


def format_dialogue(turns: Sequence[tuple[str, str]]) -> str:
    """A prompt from (role, content) turns: a lone user turn is just its text, longer histories are
    "User: ...\\n\\nAssistant: ...\\n\\nUser: ..." ending with the turn to be answered."""
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    names = {"user": "User", "assistant": "Assistant"}
    return "\n\n".join(f"{names.get(role, role.capitalize())}: {content}" for role, content in turns)


def most_common_first(values: Iterable[Any]) -> Any:
    """The most frequent value; ties go to the value seen first."""
    counts = Counter()
    order: dict[Any, int] = {}
    for v in values:
        counts[v] += 1
        order.setdefault(v, len(order))
    if not counts:
        return None
    return max(counts, key=lambda v: (counts[v], -order[v]))


def dedupe(records: list[PreferenceRecord], report: AdapterReport, reason: str = "duplicate") -> list[PreferenceRecord]:
    seen: set[PreferenceRecord] = set()
    out = []
    for r in records:
        if r in seen:
            report.drop(reason)
            continue
        seen.add(r)
        out.append(r)
    return out
