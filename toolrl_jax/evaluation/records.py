"""Resumable per-item records: one JSON object per line, keyed by ``id``.

Generation is the expensive step, so each finished item is appended (and flushed) at once; a rerun loads
the file and skips ids already present. A truncated last line (an interrupted write) is ignored.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

logger = logging.getLogger(__name__)


class RecordStore:
    """An append-only JSONL file of ``{"id": ..., ...}`` records."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._records: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        lines = self.path.read_text(encoding="utf-8").split("\n")
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if line_no == len(lines) or all(not rest.strip() for rest in lines[line_no:]):
                    logger.warning("%s:%d: ignoring a truncated last record", self.path, line_no)
                    continue
                raise ValueError(f"{self.path}:{line_no}: corrupt record (not JSON)") from None
            if not isinstance(record, dict) or "id" not in record:
                raise ValueError(f"{self.path}:{line_no}: record has no 'id'")
            self._records[str(record["id"])] = record
        # Rewrite without a truncated tail so later appends start on a clean line.
        self._rewrite()

    def _rewrite(self) -> None:
        with open(self.path, "w", encoding="utf-8") as handle:
            for record in self._records.values():
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def __contains__(self, item_id: object) -> bool:
        return str(item_id) in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, item_id: str) -> dict[str, Any] | None:
        return self._records.get(str(item_id))

    def add(self, records: Iterable[dict[str, Any]]) -> None:
        """Append records (each needs an ``id``) and flush them to disk."""
        records = list(records)
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            for record in records:
                if "id" not in record:
                    raise ValueError("record has no 'id'")
                self._records[str(record["id"])] = record
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows as JSON lines (replacing the file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
