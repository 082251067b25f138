"""The canonical comparison record (docs: shared contract, "Data records")."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

REQUIRED_STR_FIELDS = ("prompt", "chosen", "rejected")
OPTIONAL_STR_FIELDS = ("user_text", "group")


class DataError(ValueError):
    """Bad input data. The message always names where: file, line (1-based) and field."""


@dataclass(frozen=True)
class PreferenceRecord:
    prompt: str
    chosen: str
    rejected: str
    user_id: str | None = None  # source annotator id; None/unseen -> generic user 0
    user_text: str | None = None
    group: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _where(source: str, line: int | None) -> str:
    return f"{source}:{line}" if line is not None else source


def validate_record(obj: Any, source: str = "<records>", line: int | None = None) -> PreferenceRecord:
    """Check one raw record and turn it into a PreferenceRecord, or raise DataError naming the place."""
    where = _where(source, line)
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in REQUIRED_STR_FIELDS:
        if key not in obj:
            raise DataError(f"{where}: missing field '{key}'")
        value = obj[key]
        if not isinstance(value, str):
            raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
        if not value.strip():
            raise DataError(f"{where}: field '{key}' is empty")
    if obj["chosen"] == obj["rejected"]:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical")
    user_id = obj.get("user_id")
    if user_id is not None and not isinstance(user_id, str):
        raise DataError(
            f"{where}: field 'user_id' must be a string (or null), got {type(user_id).__name__} {user_id!r}; "
            "quote numeric ids in the source file"
        )
    if user_id is not None and not user_id.strip():
        user_id = None
    extras = {}
    for key in OPTIONAL_STR_FIELDS:
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: field '{key}' must be a string or null, got {type(value).__name__}")
        extras[key] = value if value else None
    return PreferenceRecord(obj["prompt"], obj["chosen"], obj["rejected"], user_id, **extras)
