"""Held-out tool-call sets: does the trained model call tools it never saw, given the training prompt?

Files (several may be given; each row is one single-step item):
- ToolRL format: an RL parquet, or JSON/JSONL rows in the RL layout (``prompt``, ``reward_model``) or the SFT layout
  (``instruction``, ``input``, ``output``); rows are read with ``toolrl_jax.datasets.io``'s row readers.
- xLAM style JSON/JSONL ``{"query", "tools", "answers"}`` or Hammer style ``{"instruction", "output"}``: converted
  by the training converters (``toolrl_jax.datasets.sources``), so the system prompt lists the tools exactly as
  training does. Answers may be written ``{"name", "arguments"}`` or ``{"tool", "parameters"}``; tools may use
  JSON-schema (``parameters: {type: object, properties, required}``) or flat specs (``parameters: {param: {type,
  description, required}}``). A row whose answer list is empty expects no call.
A row that cannot be used is reported with its file and position (summary and ``items/heldout_bad_rows.jsonl``; rows
of parquet files and JSON lists count from 0, JSONL lines from 1, as ``toolrl_jax.datasets.records`` does), not
fatal.

Scores: ``exact`` = the predicted calls (valid lines of the last ``<tool_call>`` block, as the ToolRL evaluation reads
them) equal the reference calls as a multiset; per reference call, ``name`` = a predicted call has its name and
``parameters`` = a predicted call has its name and exactly its parameters (one-to-one matching; items without a
reference call do not count here); and the ToolRL reward (``toolrl_jax.rewards.score_batch``, default RewardConfig,
step 0) with its format / correctness components and its own exact-match accuracy.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from toolrl_jax.datasets import sources
from toolrl_jax.datasets.example import ToolRLExample
from toolrl_jax.datasets.io import example_from_json_record, read_rows
from toolrl_jax.datasets.records import DataFileError, Records, RowError, RowIssue, read_json_records, row_label
from toolrl_jax.evaluation.generator import GenerationLimits, Generator, generate_batched
from toolrl_jax.evaluation.parsing import parse_tool_calls, strict_correct
from toolrl_jax.evaluation.records import RecordStore, write_jsonl
from toolrl_jax.rewards import GroundTruthError, RewardConfig, parse_ground_truth, score_batch

logger = logging.getLogger(__name__)

SUFFIXES = (".parquet", ".json", ".jsonl")
# Training's default response budget (experiments/grpo.py --max_response_length) within the model's window.
DEFAULT_LIMITS = GenerationLimits(max_new_tokens=1024)
_HAMMER_TOOLS = "[BEGIN OF AVAILABLE TOOLS]"

Gold = tuple[dict[str, Any], ...]  # reference calls {"name", "parameters"}; empty: no call expected


@dataclasses.dataclass(frozen=True)
class HeldoutConfig:
    paths: tuple[str, ...]
    batch_size: int = 8
    limit: int | None = None  # first N usable rows per file
    limits: GenerationLimits = DEFAULT_LIMITS


@dataclasses.dataclass(frozen=True)
class HeldoutItem:
    id: str
    file: str
    row: int  # position in the file, in the unit of the file's rows ("row" 0-based, or JSONL "line" 1-based)
    example: ToolRLExample
    gold: Gold


def _tool_key_as_name(value: Any) -> Any:
    """Calls written ``{"tool", "parameters"}`` -> ``{"name", "parameters"}`` (lists too); anything else as is."""
    if isinstance(value, list):
        return [_tool_key_as_name(v) for v in value]
    if isinstance(value, Mapping) and "tool" in value and "name" not in value:
        return {"name": value["tool"], **{k: v for k, v in value.items() if k != "tool"}}
    return value


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # the converter reports it


def _xlam(record: Mapping[str, Any]) -> dict[str, Any]:
    answers = record.get("answers")
    if not isinstance(answers, (list, str)):
        return dict(record)  # the converter reports it
    calls = _tool_key_as_name(_json_or_text(answers) if isinstance(answers, str) else answers)
    return {**record, "answers": calls if isinstance(calls, list) else answers}


def _hammer(record: Mapping[str, Any]) -> dict[str, Any]:
    output = record.get("output")
    if not isinstance(output, str):
        return dict(record)
    calls = _json_or_text(re.sub(r"^```(?:json)?\s*|\s*```$", "", output.strip()))
    return {**record, "output": output if isinstance(calls, str) else json.dumps(_tool_key_as_name(calls))}


def _converted(convert: Callable[..., list[ToolRLExample]], record: dict[str, Any]) -> ToolRLExample:
    report = sources.ConversionReport()
    examples = convert([record], empty_calls="response", report=report)
    if report.failed:
        raise RowError(report.failed[0].reason)
    return examples[0]


def example_of(record: Any, index: int) -> ToolRLExample:
    """The training-format example of one JSON record of any accepted layout (raises RowError saying why not)."""
    if isinstance(record, Mapping) and "query" in record:
        return _converted(sources.convert_xlam, _xlam(record))
    if isinstance(record, Mapping) and isinstance(record.get("instruction"), str) \
            and _HAMMER_TOOLS in record["instruction"]:
        return _converted(sources.convert_hammer, _hammer(record))
    if isinstance(record, Mapping) and not ({"prompt", "instruction"} & set(record)):
        raise RowError("unknown row layout: expected a ToolRL row ({prompt, reward_model} or {instruction, input, "
                       "output}), xLAM {query, tools, answers} or Hammer {instruction, output}")
    return example_from_json_record(record, index, "heldout")


def _with_gold(example: ToolRLExample, _: int) -> tuple[ToolRLExample, Gold]:
    try:
        parsed = parse_ground_truth(example.ground_truth)
    except GroundTruthError as error:
        raise RowError(str(error)) from None
    return example, tuple({"name": c["name"], "parameters": c["parameters"]} for c in parsed.calls or [])


def read_file(path: str | Path) -> Records[tuple[ToolRLExample, Gold]]:
    """Every row of a held-out file as (example, reference calls) or an issue; a file that cannot be read at all
    raises DataFileError / FileNotFoundError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"held-out data not found: {path}")
    if path.suffix == ".parquet":
        records = read_rows(path)
    elif path.suffix in (".json", ".jsonl"):
        records = read_json_records(path).map(example_of)
    else:
        raise DataFileError(f"{path}: unknown held-out file type (expected one of {SUFFIXES})")
    return records.map(_with_gold)


def load_heldout(paths: tuple[str, ...], limit: int | None = None) -> tuple[list[HeldoutItem], list[RowIssue]]:
    """Usable items (the first ``limit`` per file) and every row that was not usable."""
    items: list[HeldoutItem] = []
    issues: list[RowIssue] = []
    for name in paths:
        records = read_file(name)
        issues += records.issues
        items += [HeldoutItem(id=f"{name}:{row_label(row, records.unit)}", file=name, row=row, example=example,
                              gold=gold) for row, (example, gold) in records.rows[:limit]]
    return items, issues


def bad_row(issue: RowIssue) -> dict[str, Any]:
    return {"file": issue.path, "row": issue.row, "unit": issue.unit, "error": issue.reason}


def call_hits(text: str, gold: tuple[dict[str, Any], ...]) -> tuple[int, int]:
    """(reference calls whose name a predicted call has, reference calls a predicted call equals), one-to-one."""
    predicted = [{"name": call.name, "parameters": call.parameters} for call in parse_tool_calls(text)]
    names = collections.Counter(call["name"] for call in predicted)
    name_hits = sum(min(count, names[name]) for name, count in collections.Counter(g["name"] for g in gold).items())
    call_hits_ = 0
    for call in gold:
        if call in predicted:
            predicted.remove(call)
            call_hits_ += 1
    return name_hits, call_hits_


def _rates(rows: list[dict[str, Any]]) -> dict[str, Any]:
    count, gold_calls = len(rows), sum(row["gold_calls"] for row in rows)
    mean = (lambda key: sum(row[key] for row in rows) / count if count else None)  # noqa: E731
    return {"items": count, "exact": mean("exact"),
            "name_accuracy": sum(row["name_hits"] for row in rows) / gold_calls if gold_calls else None,
            "parameter_accuracy": sum(row["call_hits"] for row in rows) / gold_calls if gold_calls else None,
            "reward": {key: mean(f"reward_{key}") for key in ("total", "format", "correctness", "accuracy")},
            "truncated": sum(row["truncated"] for row in rows)}


def evaluate_heldout(generator: Generator, config: HeldoutConfig, out_dir: str | Path) -> dict[str, Any]:
    """Generate (resuming) and score every usable row; writes generations, scored items and the bad rows."""
    out_dir = Path(out_dir)
    items, bad = load_heldout(config.paths, config.limit)
    for issue in bad:
        logger.warning("held-out row not usable: %s", issue)
    store = RecordStore(out_dir / "generations" / "heldout.jsonl")
    pending = [item for item in items if item.id not in store]
    logger.info("held-out: %d items (%d already generated), %d bad rows", len(items), len(items) - len(pending),
                len(bad))
    for start in range(0, len(pending), config.batch_size):
        chunk = pending[start:start + config.batch_size]
        completions = generate_batched(generator, [item.example.prompt_messages for item in chunk],
                                       config.batch_size, config.limits)
        store.add({"id": item.id, "raw": c.text, **c.record()} for item, c in zip(chunk, completions))
    texts = [store.get(item.id)["raw"].strip() for item in items]
    rewards = score_batch(texts, [item.example.ground_truth for item in items], step=0, config=RewardConfig())
    scored = []
    for index, (item, text) in enumerate(zip(items, texts)):
        name_hits, hits = call_hits(text, item.gold)
        scored.append({"id": item.id, "file": item.file, "row": item.row, "exact": strict_correct(text, item.gold),
                       "gold_calls": len(item.gold), "name_hits": name_hits, "call_hits": hits,
                       **{f"reward_{key}": float(getattr(rewards, key)[index])
                          for key in ("total", "format", "correctness", "accuracy")},
                       "truncated": bool(store.get(item.id).get("truncated")), "gold": list(item.gold),
                       "predicted": [{"name": c.name, "parameters": c.parameters} for c in parse_tool_calls(text)]})
    write_jsonl(out_dir / "items" / "heldout.jsonl", scored)
    bad_rows = [bad_row(issue) for issue in bad]
    write_jsonl(out_dir / "items" / "heldout_bad_rows.jsonl", bad_rows)
    return {"overall": _rates(scored),
            "files": {name: _rates([row for row in scored if row["file"] == name]) for name in config.paths},
            "bad_rows": bad_rows, "limit": config.limit}
