"""Reading pair files back (the training side of the pair contract, SPEC §6.2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.data.jsonl import read_jsonl
from pipeline.errors import DataError
from pipeline.preference.render import check_messages

REQUIRED_FIELDS = ("prompt", "chosen", "rejected", "case_idx")


def load_pairs(path: str | Path) -> list[dict[str, Any]]:
    """Load and validate a pairs JSONL file; every record needs ``prompt``/``chosen``/``rejected`` message lists
    and an integer ``case_idx``. A bad record raises one ``DataError`` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: pairs file not found")
    records = read_jsonl(path, allow_truncated_tail=False).records
    for i, rec in enumerate(records):
        where = f"{path}: line {i + 1}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object")
        missing = [k for k in REQUIRED_FIELDS if k not in rec]
        if missing:
            raise DataError(f"{where}: missing field '{missing[0]}'; expected {', '.join(REQUIRED_FIELDS)}")
        if not isinstance(rec["case_idx"], int) or isinstance(rec["case_idx"], bool):
            raise DataError(f"{where}: field 'case_idx': expected an integer")
        for k in ("prompt", "chosen", "rejected"):
            check_messages(rec[k], f"{where}: field '{k}'")
    return records


def split_by_cases(pairs: list[dict[str, Any]],
                   test_cases: set[int]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pairs of train cases, pairs of test cases): the validation set is the test cases' pairs."""
    train = [p for p in pairs if p["case_idx"] not in test_cases]
    val = [p for p in pairs if p["case_idx"] in test_cases]
    return train, val
