"""Reading and writing ToolRL data files.

* RL parquet (veRL layout, as ToolRL's `train.parquet` / `test.parquet`): columns `data_source`, `prompt`
  (list of {content, role}), `ability`, `reward_model` ({ground_truth, style}), `extra_info` ({index, input,
  instruction, output, split}). `read_parquet` -> `write_parquet` reproduces the table exactly (schema metadata
  aside: the pandas index metadata of the original files is not written).
* SFT JSON (SFT400 layout): a list of {instruction, input, output} = system, user, assistant. `.jsonl` (one
  object per line) is accepted too, and so are JSON rows in the RL layout.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from toolrl_jax.datasets.example import (DEFAULT_ABILITY, DEFAULT_DATA_SOURCE, DEFAULT_REWARD_STYLE,
                                         ToolRLExample)

_MESSAGE = pa.struct([("content", pa.string()), ("role", pa.string())])
_EXTRA_INFO_FIELDS = [("index", pa.int64()), ("input", pa.string()), ("instruction", pa.string()),
                      ("output", pa.string()), ("split", pa.string())]
PARQUET_SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(_MESSAGE)),
    ("ability", pa.string()),
    ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
    ("extra_info", pa.struct(_EXTRA_INFO_FIELDS)),
])


class DataFileError(ValueError):
    """A data file (or one of its rows) that does not have the expected layout."""


def _row_error(path: Path | str, row: int, message: str) -> DataFileError:
    return DataFileError(f"{path}: row {row}: {message}")


def example_from_rl_row(row: Mapping[str, Any], row_number: int, path: Path | str = "<memory>") -> ToolRLExample:
    """One RL-layout row (a dict as pyarrow's `to_pylist` gives it) -> ToolRLExample."""
    prompt = row.get("prompt")
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise _row_error(path, row_number, "'prompt' must be a non-empty list of {role, content}")
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, Mapping) or not isinstance(reward_model.get("ground_truth"), str):
        raise _row_error(path, row_number, "'reward_model.ground_truth' must be a string")
    extra = row.get("extra_info")
    if extra is not None and not isinstance(extra, Mapping):
        raise _row_error(path, row_number, "'extra_info' must be a struct/dict")
    extra = dict(extra or {})
    try:
        example = ToolRLExample(
            prompt_messages=list(prompt), ground_truth=reward_model["ground_truth"],
            index=row_number if extra.get("index") is None else extra["index"],
            source=row.get("data_source") or DEFAULT_DATA_SOURCE, split=extra.get("split") or "",
            ability=row.get("ability") or DEFAULT_ABILITY,
            reward_style=reward_model.get("style") or DEFAULT_REWARD_STYLE)
    except (TypeError, ValueError) as err:
        raise _row_error(path, row_number, str(err)) from err
    if extra and extra != example.derived_extra_info():
        example = dataclasses.replace(example, extra_info=extra)
    return example


def example_from_sft_record(record: Mapping[str, Any], row_number: int, source: str,
                            path: Path | str = "<memory>", split: str = "train") -> ToolRLExample:
    """One {instruction, input, output} record -> ToolRLExample (system = instruction, user = input)."""
    for key in ("instruction", "input", "output"):
        if not isinstance(record.get(key), str):
            raise _row_error(path, row_number, f"'{key}' must be a string (SFT layout: instruction, input, output)")
    return ToolRLExample(prompt_messages=[{"role": "system", "content": record["instruction"]},
                                          {"role": "user", "content": record["input"]}],
                         ground_truth=record["output"], index=row_number, source=source, split=split)


def read_parquet(path: str | Path) -> list[ToolRLExample]:
    """Examples of an RL parquet file, in file order."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise DataFileError(f"{path}: cannot read parquet: {err}") from err
    missing = {"prompt", "reward_model"} - set(table.column_names)
    if missing:
        raise DataFileError(f"{path}: missing column(s) {sorted(missing)}; columns are {table.column_names}")
    return [example_from_rl_row(row, i, path) for i, row in enumerate(table.to_pylist())]


def read_json_records(path: str | Path) -> list[Any]:
    """The records of a JSON list file or a JSONL file (one object per line)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataFileError(f"{path}: line {n + 1}: invalid JSON: {err}") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFileError(f"{path}: invalid JSON: {err}") from None
    if not isinstance(data, list):
        raise DataFileError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def read_json(path: str | Path, source: str = "rlla_sft") -> list[ToolRLExample]:
    """Examples of an SFT JSON/JSONL file ({instruction, input, output}; RL-layout rows are accepted too)."""
    path = Path(path)
    examples = []
    for i, record in enumerate(read_json_records(path)):
        if not isinstance(record, Mapping):
            raise _row_error(path, i, f"expected an object, got {type(record).__name__}")
        if "prompt" in record:
            examples.append(example_from_rl_row(record, i, path))
        else:
            examples.append(example_from_sft_record(record, i, source, path))
    return examples


def read_examples(path: str | Path, source: str | None = None) -> list[ToolRLExample]:
    """Reads a parquet or JSON/JSONL ToolRL file, chosen by suffix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    if path.suffix == ".parquet":
        return read_parquet(path)
    if path.suffix in (".json", ".jsonl"):
        return read_json(path, source=source or "rlla_sft")
    raise DataFileError(f"{path}: unknown data file type (expected .parquet, .json or .jsonl)")


def _extra_info(example: ToolRLExample) -> dict[str, Any]:
    return dict(example.extra_info) if example.extra_info is not None else example.derived_extra_info()


def examples_to_table(examples: Sequence[ToolRLExample]) -> pa.Table:
    """The RL parquet table of `examples` (schema `PARQUET_SCHEMA`)."""
    extras = [_extra_info(e) for e in examples]
    standard = {name for name, _ in _EXTRA_INFO_FIELDS}
    columns: dict[str, Any] = {
        "data_source": pa.array([e.source for e in examples], pa.string()),
        "prompt": pa.array([[{"content": m["content"], "role": m["role"]} for m in e.prompt_messages]
                            for e in examples], pa.list_(_MESSAGE)),
        "ability": pa.array([e.ability for e in examples], pa.string()),
        "reward_model": pa.array([{"ground_truth": e.ground_truth, "style": e.reward_style} for e in examples],
                                 PARQUET_SCHEMA.field("reward_model").type),
    }
    if all(set(x) <= standard for x in extras):
        columns["extra_info"] = pa.array([{k: x.get(k) for k in standard} for x in extras],
                                         PARQUET_SCHEMA.field("extra_info").type)
    else:  # extra keys of a foreign file: let pyarrow infer their types rather than drop them
        columns["extra_info"] = pa.array(extras)
    return pa.table(columns)


def write_parquet(examples: Sequence[ToolRLExample], path: str | Path) -> Path:
    """Writes `examples` as an RL parquet file (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(examples_to_table(examples), path)
    return path


def write_sft_json(examples: Iterable[ToolRLExample], path: str | Path) -> Path:
    """Writes `examples` as SFT JSON ({instruction, input, output}; first system and last user message)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{"instruction": e.system, "input": e.user, "output": e.ground_truth} for e in examples]
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path
