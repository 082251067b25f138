"""Load comparison records from JSONL, JSON, Parquet or a `datasets.Dataset`, and write JSONL."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from preference_data.records import DataError, PreferenceRecord, validate_record

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What `load_records` read and what it skipped (with `on_error="skip"`)."""

    source: str
    n_read: int = 0
    skipped: list[str] = field(default_factory=list)


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("r", encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw)
            except json.JSONDecodeError as exc:
                # Yield the error so that skip mode can go on with the next line.
                yield lineno, DataError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})")


def _rows(source: Any) -> tuple[str, str, Iterable[tuple[int, Any]]]:
    """(source name, unit name for positions: "line" or "row", iterable of (position, raw record))."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise DataError(f"{path}: data file not found")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return str(path), "line", _iter_jsonl(path)
        if suffix == ".json":
            text = path.read_text(encoding="utf-8")
            if not text.lstrip().startswith("["):  # JSON lines saved as .json (one record: one line)
                return str(path), "line", _iter_jsonl(path)
            try:  # a list is one document: a syntax error spoils all of it, so it is raised even in skip mode
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            return str(path), "row", ((i + 1, r) for i, r in enumerate(data))
        if suffix == ".parquet":
            import datasets

            ds = datasets.Dataset.from_parquet(str(path))
            return str(path), "row", ((i + 1, r) for i, r in enumerate(ds))
        raise DataError(f"{path}: unsupported data file type '{suffix}' (use .jsonl, .json or .parquet)")
    return "<dataset>", "row", ((i + 1, r) for i, r in enumerate(source))


def load_records(source: Any, on_error: str = "raise", report: LoadReport | None = None) -> list[PreferenceRecord]:
    """Read and validate every record of a file or a `datasets.Dataset` (or list of dicts).

    Errors name the file and line (JSONL) or row. With `on_error="skip"` bad records are dropped, counted in
    `report.skipped` and summarised in one warning.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    name, unit, rows = _rows(source)
    report = report if report is not None else LoadReport(name)
    report.source = name
    records: list[PreferenceRecord] = []
    for pos, raw in rows:
        report.n_read += 1
        try:
            if isinstance(raw, DataError):
                raise raw
            where = name if unit == "line" else f"{name} row {pos}"
            records.append(validate_record(raw, where, pos if unit == "line" else None))
        except DataError as exc:
            if on_error == "raise":
                raise
            report.skipped.append(str(exc))
    if report.skipped:
        log.warning("skipped %d of %d record(s) in %s; first: %s", len(report.skipped), report.n_read, name,
                    report.skipped[0])
    return records


def write_jsonl(records: Iterable[PreferenceRecord | dict], path: str | os.PathLike) -> int:
    """Write records as JSON lines, atomically (temp file, then rename). Returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            row = rec.to_dict() if isinstance(rec, PreferenceRecord) else dict(rec)
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n
