"""P-SOUPS (Personalized Soups, Jang et al. 2023) preference pairs -> records.

Each record: {"user_input": str, "completion_a": str (preferred), "completion_b": str, ["profile": "P1A"]}.
The six preference profiles P1A, P1B, P2A, P2B, P3A, P3B are the users (user_id = profile; the seed's users
1..6 in that order). The public release ships one file per profile, so the profile comes from a `profile`
field when present, else from the file name (e.g. `..._P1A_....json`, or a parent folder named `P1A`), else
DataError. Files are JSON lines or one JSON list. `n_read` counts records.

Dropped: "identical_completions", "empty_text".
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from preference_data.adapters.base import AdapterReport, as_paths, get_str, iter_json_records, require_mapping
from preference_data.records import DataError, PreferenceRecord

PROFILES = ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B")
_PROFILE_RE = re.compile(r"(?<![A-Za-z0-9])(P[123][AB])(?![A-Za-z0-9])", re.IGNORECASE)


def profile_from_name(path: Path) -> str | None:
    """The profile named by the file name (or, failing that, by the parent folder); None if none or ambiguous."""
    for name in (path.name, path.parent.name):
        found = {m.upper() for m in _PROFILE_RE.findall(name)}
        if len(found) == 1:
            return found.pop()
        if len(found) > 1:
            return None
    return None


def _normalise_profile(value: Any, where: str) -> str:
    if not isinstance(value, str) or value.strip().upper() not in PROFILES:
        raise DataError(f"{where}: field 'profile' must be one of {', '.join(PROFILES)}, got {value!r}")
    return value.strip().upper()


def read_psoups(paths: Sequence[str], **options: Any) -> tuple[list[PreferenceRecord], AdapterReport]:
    if options:
        raise TypeError(f"read_psoups got unknown option(s): {', '.join(sorted(options))}")
    report = AdapterReport("psoups")
    records = []
    per_profile: dict[str, int] = {}
    for path in as_paths(paths):
        file_profile = profile_from_name(path)
        for where, obj in iter_json_records(path):
            report.n_read += 1
            obj = require_mapping(obj, where)
            if obj.get("profile") is not None:
                profile = _normalise_profile(obj["profile"], where)
            elif file_profile is not None:
                profile = file_profile
            else:
                raise DataError(f"{where}: no 'profile' field and the file name names no profile "
                                f"(expected one of {', '.join(PROFILES)} in the name, e.g. data_P1A.jsonl)")
            prompt = get_str(obj, "user_input", where).strip()
            chosen = get_str(obj, "completion_a", where).strip()
            rejected = get_str(obj, "completion_b", where).strip()
            if not prompt or not chosen or not rejected:
                report.drop("empty_text")
                continue
            if chosen == rejected:
                report.drop("identical_completions")
                continue
            records.append(PreferenceRecord(prompt, chosen, rejected, profile))
            per_profile[profile] = per_profile.get(profile, 0) + 1
    report.n_written = len(records)
    report.extra["pairs_per_user"] = dict(sorted(per_profile.items()))
    report.extra["n_users"] = len(per_profile)
    return records, report
