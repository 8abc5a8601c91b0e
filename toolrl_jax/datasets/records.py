"""Rows of a data file, each with its position in the file, and the rows that could not be read.

Positions are explicit and consistent: parquet rows and the records of a JSON list are numbered from 0 (unit "row",
shown as "row 3 (0-based)"); the records of a JSONL file are numbered by their 1-based line (unit "line", as editors
show them). A bad JSONL line (not UTF-8, not JSON) or a JSON-list record holding bytes that are not UTF-8 is a row
issue and the rest of the file is still read; a file that cannot be read as a whole raises DataFileError naming it.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

RowUnit = Literal["row", "line"]
T = TypeVar("T")
U = TypeVar("U")


class DataFileError(ValueError):
    """A data file (or one of its rows) that does not have the expected layout."""


class RowError(ValueError):
    """Why one row cannot be used (raised by per-row converters; the caller adds file and position)."""


def row_label(row: int, unit: RowUnit) -> str:
    """"row 3 (0-based)" or "line 4": a position as every message writes it."""
    return f"line {row}" if unit == "line" else f"row {row} (0-based)"


@dataclasses.dataclass(frozen=True)
class RowIssue:
    """A row of a data file that holds no usable example, and why."""
    path: str
    row: int
    reason: str
    unit: RowUnit = "row"

    def __str__(self) -> str:
        return f"{self.path}: {row_label(self.row, self.unit)}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class Records(Generic[T]):
    """The readable rows of a file as (position, value) in file order, and the issues of the other rows."""
    path: str
    unit: RowUnit
    rows: list[tuple[int, T]]
    issues: list[RowIssue] = dataclasses.field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return len(self.rows) + len(self.issues)

    def map(self, fn: Callable[[T, int], U]) -> Records[U]:
        """fn(value, ordinal) on every row (ordinal: 0-based among the readable rows); a RowError becomes an issue."""
        rows: list[tuple[int, U]] = []
        issues = list(self.issues)
        for ordinal, (position, value) in enumerate(self.rows):
            try:
                rows.append((position, fn(value, ordinal)))
            except RowError as err:
                issues.append(RowIssue(self.path, position, str(err), self.unit))
        return Records(self.path, self.unit, rows, sorted(issues, key=lambda issue: issue.row))

    def strict(self) -> list[T]:
        """The values, or DataFileError naming the first bad row (and how many there are)."""
        if self.issues:
            more = f" (and {len(self.issues) - 1} more bad rows)" if len(self.issues) > 1 else ""
            raise DataFileError(f"{self.issues[0]}{more}")
        return [value for _, value in self.rows]


def bulleted(lines: Sequence[str], limit: int = 10) -> str:
    """The first `limit` lines, each on its own indented line, and how many more there are."""
    text = "".join(f"\n  {line}" for line in lines[:limit])
    return text + (f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else "")


def _bad_bytes(err: UnicodeDecodeError) -> str:
    return f"byte 0x{err.object[err.start]:02x} at offset {err.start} is not UTF-8"


def _jsonl_records(path: Path, data: bytes) -> Records[Any]:
    rows, issues = [], []
    for number, line in enumerate(data.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            issues.append(RowIssue(str(path), number, _bad_bytes(err), "line"))
            continue
        if not text.strip():
            continue
        try:
            rows.append((number, json.loads(text)))
        except (json.JSONDecodeError, RecursionError) as err:
            issues.append(RowIssue(str(path), number, f"invalid JSON: {err}", "line"))
    if issues and not rows:
        raise DataFileError(f"{path}: no line is readable UTF-8 JSON ({len(issues)} bad line(s); first: "
                            f"{row_label(issues[0].row, 'line')}: {issues[0].reason})")
    return Records(str(path), "line", rows, issues)


def _undecoded_text(value: Any) -> str | None:
    """The first string (key or value) of a record that holds bytes json read through surrogateescape."""
    if isinstance(value, str):
        return value if any("\udc80" <= c <= "\udcff" for c in value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _undecoded_text(key) or _undecoded_text(item)
        if found is not None:
            return found
    return None


def _json_list_records(path: Path, data: bytes) -> Records[Any]:
    try:
        text, undecodable = data.decode("utf-8"), None
    except UnicodeDecodeError as err:  # keep the bad bytes as lone surrogates and report the records holding them
        text, undecodable = data.decode("utf-8", "surrogateescape"), err
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        hint = f" (and not UTF-8: {_bad_bytes(undecodable)})" if undecodable else ""
        raise DataFileError(f"{path}: invalid JSON{hint}: {err}") from None
    if not isinstance(value, list):
        raise DataFileError(f"{path}: expected a JSON list of records, got {type(value).__name__}")
    rows, issues = [], []
    for i, record in enumerate(value):
        bad = _undecoded_text(record) if undecodable else None
        if bad is None:
            rows.append((i, record))
        else:
            shown = bad.encode("utf-8", "surrogateescape")[:80]
            issues.append(RowIssue(str(path), i, f"holds bytes that are not UTF-8: {shown!r}"))
    if issues and not rows:
        raise DataFileError(f"{path}: not UTF-8: every record holds bytes that are not UTF-8 "
                            f"({_bad_bytes(undecodable)})")
    return Records(str(path), "row", rows, issues)


def read_json_records(path: str | Path) -> Records[Any]:
    """The records of a JSON list file or a JSONL file (one object per line; ".jsonl" suffix), with positions."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataFileError(f"{path}: cannot read: {err}") from err
    encoding = json.detect_encoding(data)
    if encoding not in ("utf-8", "utf-8-sig"):
        raise DataFileError(f"{path}: the text is {encoding}; data files must be UTF-8")
    if encoding == "utf-8-sig":
        data = data[3:]
    return _jsonl_records(path, data) if path.suffix == ".jsonl" else _json_list_records(path, data)
