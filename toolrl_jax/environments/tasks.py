"""Task files: an environment's examples are plain JSON dicts, stored one per line (JSONL) so a task set can be
generated once, inspected, and read back identically."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any


def write_tasks(tasks: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write `tasks` to `path` as JSON lines (key order kept, UTF-8); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for task in tasks:
            handle.write(json.dumps(task, ensure_ascii=False) + "\n")
    return path


def task_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, task) of each record of a JSONL file (blank lines skipped); raises ValueError naming the file
    and line of a record that is not a JSON object."""
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                task = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error})") from error
            if not isinstance(task, dict):
                raise ValueError(f"{path}:{number}: a task must be a JSON object, got {type(task).__name__}")
            yield number, task


def read_tasks(path: str | Path) -> list[dict[str, Any]]:
    """The tasks of a JSONL file (blank lines skipped); raises ValueError naming the line of a bad record."""
    return [task for _, task in task_lines(path)]
