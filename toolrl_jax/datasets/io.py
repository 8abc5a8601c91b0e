"""Reading and writing ToolRL data files.

* RL parquet (veRL layout, as ToolRL's `train.parquet` / `test.parquet`): columns `data_source`, `prompt`
  (list of {content, role}), `ability`, `reward_model` ({ground_truth, style}), `extra_info` ({index, input,
  instruction, output, split}). `read_parquet` -> `write_parquet` reproduces the table exactly (schema metadata
  aside: the pandas index metadata of the original files is not written).
* SFT JSON (SFT400 layout): a list of {instruction, input, output} = system, user, assistant. `.jsonl` (one
  object per line) is accepted too, and so are JSON rows in the RL layout.

Errors name the file and the row: "row N (0-based)" for parquet and JSON lists, "line N" (1-based) for JSONL
(see `records`). The readers here check layout only; `loading.load_examples` also checks every ground truth.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from toolrl_jax.datasets.example import DEFAULT_ABILITY, DEFAULT_DATA_SOURCE, DEFAULT_REWARD_STYLE, ToolRLExample
from toolrl_jax.datasets.records import DataFileError, Records, RowError, read_json_records

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


def example_from_rl_row(row: Mapping[str, Any], index: int) -> ToolRLExample:
    """One RL-layout row (a dict as pyarrow's `to_pylist` gives it) -> ToolRLExample (`index` unless extra_info
    has one). Raises RowError saying what is wrong."""
    prompt = row.get("prompt")
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise RowError("'prompt' must be a non-empty list of {role, content}")
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, Mapping) or not isinstance(reward_model.get("ground_truth"), str):
        raise RowError("'reward_model.ground_truth' must be a string")
    extra = row.get("extra_info")
    if extra is not None and not isinstance(extra, Mapping):
        raise RowError("'extra_info' must be a struct/dict")
    extra = dict(extra or {})
    try:
        example = ToolRLExample(
            prompt_messages=list(prompt), ground_truth=reward_model["ground_truth"],
            index=index if extra.get("index") is None else extra["index"],
            source=row.get("data_source") or DEFAULT_DATA_SOURCE, split=extra.get("split") or "",
            ability=row.get("ability") or DEFAULT_ABILITY,
            reward_style=reward_model.get("style") or DEFAULT_REWARD_STYLE)
    except (TypeError, ValueError) as err:
        raise RowError(str(err)) from err
    if extra and extra != example.derived_extra_info():
        example = dataclasses.replace(example, extra_info=extra)
    return example


def example_from_sft_record(record: Mapping[str, Any], index: int, source: str,
                            split: str = "train") -> ToolRLExample:
    """One {instruction, input, output} record -> ToolRLExample (system = instruction, user = input)."""
    for key in ("instruction", "input", "output"):
        if not isinstance(record.get(key), str):
            raise RowError(f"'{key}' must be a string (SFT layout: instruction, input, output)")
    return ToolRLExample(prompt_messages=[{"role": "system", "content": record["instruction"]},
                                          {"role": "user", "content": record["input"]}],
                         ground_truth=record["output"], index=index, source=source, split=split)


def example_from_json_record(record: Any, index: int, source: str) -> ToolRLExample:
    """One record of a JSON/JSONL data file: SFT layout, or RL layout when it has a 'prompt'."""
    if not isinstance(record, Mapping):
        raise RowError(f"expected an object, got {type(record).__name__}")
    return example_from_rl_row(record, index) if "prompt" in record else example_from_sft_record(record, index, source)


def _parquet_rows(path: Path) -> Records[ToolRLExample]:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise DataFileError(f"{path}: cannot read parquet: {err}") from err
    missing = {"prompt", "reward_model"} - set(table.column_names)
    if missing:
        raise DataFileError(f"{path}: missing column(s) {sorted(missing)}; columns are {table.column_names}")
    return Records(str(path), "row", list(enumerate(table.to_pylist()))).map(example_from_rl_row)


def _json_rows(path: Path, source: str) -> Records[ToolRLExample]:
    return read_json_records(path).map(lambda record, i: example_from_json_record(record, i, source))


def read_rows(path: str | Path, source: str | None = None) -> Records[ToolRLExample]:
    """Every row of a parquet or JSON/JSONL ToolRL file (chosen by suffix) as an example or a RowIssue. Whole-file
    problems (missing file or columns, unreadable file) raise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    if path.suffix in (".json", ".jsonl"):
        return _json_rows(path, source or "rlla_sft")
    raise DataFileError(f"{path}: unknown data file type (expected .parquet, .json or .jsonl)")


def read_parquet(path: str | Path) -> list[ToolRLExample]:
    """Examples of an RL parquet file, in file order (DataFileError at the first bad row)."""
    return _parquet_rows(Path(path)).strict()


def read_json(path: str | Path, source: str = "rlla_sft") -> list[ToolRLExample]:
    """Examples of an SFT JSON/JSONL file ({instruction, input, output}; RL-layout rows are accepted too);
    DataFileError at the first bad row."""
    return _json_rows(Path(path), source).strict()


def read_examples(path: str | Path, source: str | None = None) -> list[ToolRLExample]:
    """Reads a parquet or JSON/JSONL ToolRL file, chosen by suffix; DataFileError at the first row with a bad
    layout. Ground truths are not checked: see `loading.load_examples` for that."""
    return read_rows(path, source).strict()


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
