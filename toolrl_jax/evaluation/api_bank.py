"""API-Bank levels 1-3 as ToolRL evaluates them.

Each item is a ready-made ToolRL prompt (``system`` with the tool list, ``user`` with the dialogue) and a
gold ``answer`` (one call; written as a dict, a list of dicts, or JSON text of either). The model's
predicted calls are the JSON lines of its last ``<tool_call>`` block (of the whole output when it has no
such block, as ToolRL's script reads it).

Scores:
- ``toolrl`` (the paper's number): 1 if ANY predicted call has exactly the first gold call's name and
  exactly equal parameters. As in ToolRL's script, a predicted JSON object without ``name``/``parameters``
  keys is read as the parameters of a call to the gold tool.
- ``strict``: the predicted calls (valid ``{"name","parameters"}`` lines of the last ``<tool_call>``
  block, "None" calls dropped) equal the gold calls exactly, as a multiset.

Generation limits as ToolRL's ``benchmarks/API-Bank/generate.py`` (vLLM ``max_model_len=4096``, ``max_tokens=4096``):
each prompt gets ``min(4096, 4096 - prompt)`` new tokens; the system prompt is the data's own (no final newline).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from toolrl_jax.evaluation import prompts as P
from toolrl_jax.evaluation.generator import GenerationLimits, Generator, generate_batched
from toolrl_jax.evaluation.parsing import json_lines, last_tool_call_block, parse_tool_calls, strict_correct
from toolrl_jax.evaluation.records import RecordStore, write_jsonl

logger = logging.getLogger(__name__)

LEVELS = (1, 2, 3)
DEFAULT_LIMITS = GenerationLimits(max_new_tokens=4096, context_tokens=4096)


def level_file(level: int) -> str:
    return f"level-{level}-api_processed.json"


@dataclasses.dataclass(frozen=True)
class ApiBankItem:
    id: str
    level: int
    system: str
    user: str
    gold: tuple[dict, ...]  # ({"name": str, "parameters": dict}, ...)


def parse_gold(answer: Any, where: str) -> tuple[dict, ...]:
    """Normalise a gold answer to a tuple of ``{"name", "parameters"}`` dicts."""
    if isinstance(answer, str):
        text = answer.strip()
        block = last_tool_call_block(text)
        if block is not None:
            answer = json_lines(block)
        else:
            try:
                answer = json.loads(text)
            except json.JSONDecodeError:
                answer = json_lines(text)
    calls = answer if isinstance(answer, list) else [answer]
    gold = []
    for call in calls:
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
            raise ValueError(f"{where}: gold answer is not a tool call: {call!r}")
        params = call.get("parameters", call.get("arguments", {}))
        if isinstance(params, str):
            params = json.loads(params)
        if not isinstance(params, dict):
            raise ValueError(f"{where}: gold parameters are not an object: {params!r}")
        gold.append({"name": call["name"], "parameters": params})
    if not gold:
        raise ValueError(f"{where}: empty gold answer")
    return tuple(gold)


def load_api_bank(api_bank_dir: str | Path, levels: tuple[int, ...] = LEVELS,
                  limit: int | None = None) -> list[ApiBankItem]:
    """Items of the given levels (the first ``limit`` of each level if given)."""
    items = []
    for level in levels:
        path = Path(api_bank_dir) / level_file(level)
        if not path.is_file():
            raise FileNotFoundError(f"API-Bank level {level} not found at {path}")
        with open(path, encoding="utf-8") as handle:
            rows = json.load(handle)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of items")
        for index, row in enumerate(rows[:limit] if limit is not None else rows):
            where = f"{path} item {index}"
            if not all(key in row for key in ("system", "user", "answer")):
                raise ValueError(f"{where}: needs 'system', 'user' and 'answer'")
            items.append(ApiBankItem(id=f"level{level}_{index}", level=level, system=row["system"],
                                     user=row["user"], gold=parse_gold(row["answer"], where)))
    return items


def predicted_objects(text: str) -> list[Any]:
    """JSON values the ToolRL script reads as predicted calls (last block, else every line)."""
    block = last_tool_call_block(text)
    return json_lines(block if block is not None else text)


def toolrl_correct(text: str, gold: tuple[dict, ...]) -> bool:
    target = gold[0]
    for obj in predicted_objects(text):
        if not isinstance(obj, dict):
            continue
        if "name" in obj and "parameters" in obj:
            name, params = obj["name"], obj["parameters"]
        else:
            name, params = target["name"], obj
        if name == target["name"] and params == target["parameters"]:
            return True
    return False


def score_item(item: ApiBankItem, text: str) -> dict[str, Any]:
    return {"id": item.id, "level": item.level, "toolrl": toolrl_correct(text, item.gold),
            "strict": strict_correct(text, item.gold), "gold": list(item.gold),
            "predicted": [{"name": c.name, "parameters": c.parameters} for c in parse_tool_calls(text)]}


def summarize(scored: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per level and overall (= correct / all items) for both scores."""
    summary: dict[str, Any] = {}
    for metric in ("toolrl", "strict"):
        per_level = {}
        for level in LEVELS:
            rows = [row for row in scored if row["level"] == level]
            if rows:
                per_level[f"level{level}"] = sum(row[metric] for row in rows) / len(rows)
        per_level["overall"] = sum(row[metric] for row in scored) / len(scored) if scored else 0.0
        summary[metric] = per_level
    summary["counts"] = {f"level{level}": sum(row["level"] == level for row in scored) for level in LEVELS}
    return summary


def evaluate_api_bank(generator: Generator, api_bank_dir: str | Path, out_dir: str | Path, *, batch_size: int = 8,
                      limit: int | None = None, limits: GenerationLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Generate (resuming) and score all levels; writes raw generations and scored items."""
    out_dir = Path(out_dir)
    items = load_api_bank(api_bank_dir, limit=limit)
    store = RecordStore(out_dir / "generations" / "api_bank.jsonl")
    pending = [item for item in items if item.id not in store]
    logger.info("API-Bank: %d items (%d already generated)", len(items), len(items) - len(pending))
    for start in range(0, len(pending), batch_size):
        chunk = pending[start:start + batch_size]
        completions = generate_batched(generator, [P.chat(item.system, item.user) for item in chunk], batch_size,
                                       limits)
        store.add({"id": item.id, "raw": c.text, **c.record()} for item, c in zip(chunk, completions))
    scored = [{**score_item(item, store.get(item.id)["raw"]), "truncated": bool(store.get(item.id).get("truncated"))}
              for item in items]
    write_jsonl(out_dir / "items" / "api_bank.jsonl", scored)
    summary = summarize(scored)
    summary["truncated"] = sum(row["truncated"] for row in scored)
    summary["limit"] = limit
    return summary
