"""Preference records: the contract's comparison record, its loaders, the user vocabulary and the
adapters that turn public datasets into records. Pure Python (no torch): tokenisation lives in
`common.batching`."""

from preference_data.records import DataError, PreferenceRecord, validate_record
from preference_data.io import load_records, write_jsonl
from preference_data.vocab import UserVocab

__all__ = ["DataError", "PreferenceRecord", "validate_record", "load_records", "write_jsonl", "UserVocab"]
