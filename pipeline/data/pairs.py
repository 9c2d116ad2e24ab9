"""The pair file contract (SPEC §6.2): a pair's message lists, and reading a pairs file back. The preference stage
writes pairs files and the training stage reads them, so the contract lives here, below both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.data.jsonl import read_jsonl
from pipeline.errors import DataError

REQUIRED_FIELDS = ("prompt", "chosen", "rejected", "case_idx")


def check_messages(messages: Any, what: str) -> None:
    """A non-empty list of ``{role, content}`` with non-empty string contents; ``DataError`` otherwise."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{what}: expected a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise DataError(f"{what}: message {i}: expected an object with exactly 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise DataError(f"{what}: message {i}: unknown role '{m['role']}'")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise DataError(f"{what}: message {i} ({m['role']}): empty content")


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
