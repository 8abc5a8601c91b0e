"""Loading training / validation examples with every row checked up front, ground truth included.

A ground truth the reward cannot parse would otherwise surface only when its batch is first scored, as a batch
index, steps into a run (and again on every resume). Here each row is read and its ground truth parsed with the
reward's own `parse_ground_truth` at load; bad rows (bad layout or bad ground truth) are named by file and row,
and a policy either stops (`bad_rows="error"`) or leaves them out and lists them (`bad_rows="skip"`).
Positions: "row N (0-based)" for parquet, JSON lists and in-memory lists; "line N" (1-based) for JSONL.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from toolrl_jax.datasets.example import ToolRLExample
from toolrl_jax.datasets.io import read_rows
from toolrl_jax.datasets.records import DataFileError, Records, RowError, RowIssue, bulleted, row_label
from toolrl_jax.rewards.parsing import GroundTruthError, parse_ground_truth

BadRowPolicy = Literal["error", "skip"]
BAD_ROW_POLICIES = ("error", "skip")


class BadRowsError(DataFileError):
    """Rows that cannot be used; `issues` lists every one (file, row, reason)."""

    def __init__(self, message: str, issues: Sequence[RowIssue]):
        super().__init__(message)
        self.issues = list(issues)


@dataclasses.dataclass(frozen=True)
class LoadedExamples:
    """The usable examples of a file (or in-memory list), in order, the position of each in the file (same unit
    as the issues), and the rows left out under "skip"."""
    origin: str
    examples: list[ToolRLExample]
    positions: list[int]
    skipped: list[RowIssue]

    def summary(self) -> str:
        """One line for the log: how many rows were kept and skipped, and the first skipped one."""
        text = f"{self.origin}: {len(self.examples)} examples"
        if self.skipped:
            text += f", {len(self.skipped)} bad row(s) skipped (first: {self.skipped[0]})"
        return text


def _checked_ground_truth(example: ToolRLExample, _: int) -> ToolRLExample:
    try:
        parse_ground_truth(example.ground_truth)
    except GroundTruthError as err:
        raise RowError(str(err)) from None
    return example


def _describe(records: Records[ToolRLExample]) -> str:
    return bulleted([f"{row_label(i.row, i.unit)}: {i.reason}" for i in records.issues])


def _apply_policy(records: Records[ToolRLExample], bad_rows: BadRowPolicy) -> LoadedExamples:
    if bad_rows not in BAD_ROW_POLICIES:
        raise ValueError(f"bad_rows must be one of {BAD_ROW_POLICIES}, got {bad_rows!r}")
    records = records.map(_checked_ground_truth)
    bad = len(records.issues)
    if bad and bad_rows == "error":
        raise BadRowsError(f"{records.path}: {bad} of {records.num_rows} rows cannot be used (leave them out with "
                           f"bad_rows='skip'):{_describe(records)}", records.issues)
    if bad and not records.rows:
        raise BadRowsError(f"{records.path}: every one of its {bad} rows is bad:{_describe(records)}",
                           records.issues)
    return LoadedExamples(records.path, [example for _, example in records.rows],
                          [position for position, _ in records.rows], records.issues)


def load_examples(path: str | Path, *, source: str | None = None,
                  bad_rows: BadRowPolicy = "error") -> LoadedExamples:
    """The examples of a parquet or JSON/JSONL ToolRL file with every row's layout and ground truth checked.

    bad_rows="error": BadRowsError (a DataFileError) naming the file and each bad row. "skip": the good rows, and
    `.skipped` lists the bad ones (BadRowsError still when no row is good). A file that cannot be read at all
    raises DataFileError / FileNotFoundError either way. source: data_source of SFT-layout JSON rows.
    """
    return _apply_policy(read_rows(path, source), bad_rows)


def check_examples(examples: Sequence[ToolRLExample], *, origin: str = "<memory>",
                   bad_rows: BadRowPolicy = "error") -> LoadedExamples:
    """`load_examples`' checks and policy for examples built in memory (e.g. the synthetic set); rows are list
    positions (0-based) and messages name them with `origin` (e.g. "synthetic train")."""
    return _apply_policy(Records(origin, "row", list(enumerate(examples))), bad_rows)
