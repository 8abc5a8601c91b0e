"""Generate and score BFCL v3 with a ``Generator``: resumable raw records, scored per-item records,
official-format result files, per-category accuracies and leaderboard groups.

Generation limits follow BFCL's OSS handler as ToolRL ran it (``benchmarks/BFCL/rlla_qwen.py`` on
``base_oss_handler``): no prompt truncation, ``min(4096, max_context_length - prompt - 2)`` new tokens, where the
context is the model's window. An item whose prompt (any step's, for multi-turn) still did not fit is flagged
``truncated`` and counted per category.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from toolrl_jax.evaluation import prompts as P
from toolrl_jax.evaluation.bfcl import aggregate, ast_checker, data, multi_turn
from toolrl_jax.evaluation.bfcl import categories as cats
from toolrl_jax.evaluation.generator import GenerationLimits, Generator, generate_batched
from toolrl_jax.evaluation.parsing import calls_to_python_list, parse_tool_calls
from toolrl_jax.evaluation.records import RecordStore, write_jsonl

logger = logging.getLogger(__name__)


DEFAULT_LIMITS = GenerationLimits(max_new_tokens=4096, context_tokens=None, reserve_tokens=2)


@dataclasses.dataclass(frozen=True)
class BfclConfig:
    bfcl_dir: str
    categories: tuple[str, ...] = cats.ALL_CATEGORIES
    limit: int | None = None  # first N items per category (None: all)
    batch_size: int = 8
    max_steps_per_turn: int = multi_turn.MAX_STEPS_PER_TURN
    limits: GenerationLimits = DEFAULT_LIMITS


def single_turn_prompt(item: data.BfclItem, prompt_set: P.PromptSet, hints: dict[str, str]) -> list[dict]:
    functions = data.prompt_functions(item.functions, item.category, hints)
    return P.chat(prompt_set.system_prompt(functions), P.render_history(item.turns[0], prompt_set.bfcl_single_turn))


def score_single_turn(item: data.BfclItem, raw: str) -> dict[str, Any]:
    calls = [call.to_bfcl() for call in parse_tool_calls(raw)]
    if cats.is_relevance(item.category):
        result = ast_checker.check_relevance(item.category, calls)
    else:
        result = ast_checker.check_ast(item.category, item.functions, calls, item.answer)
    return {"id": item.id, "valid": result.valid, "error_type": result.error_type, "error": result.error,
            "calls": calls}


def decoded_turns(raw_turns: list[list[str]]) -> list[list[list[str]]]:
    """Per turn, per step that contains calls: the calls as Python call strings."""
    return [[[call.to_python() for call in parse_tool_calls(raw)] for raw in turn] for turn in raw_turns]


def score_multi_turn(item: data.BfclItem, record: dict[str, Any]) -> dict[str, Any]:
    turns = decoded_turns(record["raw_turns"])
    result = multi_turn.check_multi_turn(item, turns)
    return {"id": item.id, "valid": result.valid, "error_type": result.error_type, "error": result.error,
            "calls": turns, "force_quit": record.get("force_quit", False)}


def _generate_single_turn(generator: Generator, items: list[data.BfclItem], store: RecordStore,
                          prompt_set: P.PromptSet, config: BfclConfig) -> None:
    pending = [item for item in items if item.id not in store]
    hints = data.load_language_hints()
    for start in range(0, len(pending), config.batch_size):
        chunk = pending[start:start + config.batch_size]
        completions = generate_batched(generator, [single_turn_prompt(item, prompt_set, hints) for item in chunk],
                                       config.batch_size, config.limits)
        store.add({"id": item.id, "raw": c.text, **c.record()} for item, c in zip(chunk, completions))


def _generate_multi_turn(generator: Generator, items: list[data.BfclItem], store: RecordStore,
                         prompt_set: P.PromptSet, config: BfclConfig) -> None:
    """Keep up to ``batch_size`` conversations in flight; each step generates for all of them at once."""
    pending = [item for item in items if item.id not in store]
    hints = data.load_language_hints()
    missed = prompt_set.bfcl_missed_function
    active: list[tuple[multi_turn.Conversation, str]] = []
    while pending or active:
        while pending and len(active) < config.batch_size:
            item = pending.pop(0)
            conversation = multi_turn.Conversation.start(item, missed)
            if conversation.finished:  # an entry without turns
                store.add([{"id": item.id, "raw_turns": [], "force_quit": False, "truncated": False}])
                continue
            system = prompt_set.system_prompt(data.prompt_functions(item.functions, item.category, hints))
            active.append((conversation, system))
        if not active:
            break
        conversations = [P.chat(system, P.render_history(conv.messages, prompt_set.bfcl_multi_turn))
                         for conv, system in active]
        completions = generate_batched(generator, conversations, config.batch_size, config.limits)
        still_active = []
        for (conv, system), completion in zip(active, completions):
            text = completion.text
            conv.truncated_steps += completion.truncated
            conv.record_step(text, [call.to_python() for call in parse_tool_calls(text)], missed,
                             config.max_steps_per_turn)
            if conv.finished:
                store.add([{"id": conv.item.id, "raw_turns": conv.raw_turns, "force_quit": conv.force_quit,
                            "truncated": conv.truncated_steps > 0, "truncated_steps": conv.truncated_steps}])
            else:
                still_active.append((conv, system))
        active = still_active


def official_result(item: data.BfclItem, record: dict[str, Any]) -> dict[str, Any]:
    """``{"id", "result"}`` as BFCL's ``evaluate`` reads it (calls written in Python syntax)."""
    if cats.is_multi_turn(item.category):
        result = [[calls_to_python_list(parse_tool_calls(raw)) for raw in turn] for turn in record["raw_turns"]]
    else:
        result = calls_to_python_list(parse_tool_calls(record["raw"]))
    return {"id": item.id, "result": result}


def evaluate_bfcl(generator: Generator, config: BfclConfig, out_dir: str | Path,
                  prompt_set: P.PromptSet) -> dict[str, Any]:
    """Generate (resuming), score and write results for the configured categories."""
    out_dir = Path(out_dir)
    scores: dict[str, aggregate.CategoryScore] = {}
    skipped: dict[str, str] = {}
    truncated: dict[str, int] = {}
    for category in cats.expand(list(config.categories)):
        if cats.is_multi_turn(category):
            available, why = multi_turn.api_classes_available()
            if not available:
                logger.warning("skipping %s: %s", category, why)
                skipped[category] = why
                continue
        items = data.load_category(config.bfcl_dir, category, config.limit)
        store = RecordStore(out_dir / "generations" / f"bfcl_{category}.jsonl")
        logger.info("BFCL %s: %d items (%d already generated)", category, len(items), len(store))
        if cats.is_multi_turn(category):
            _generate_multi_turn(generator, items, store, prompt_set, config)
        else:
            _generate_single_turn(generator, items, store, prompt_set, config)
        scored = []
        for item in items:
            record = store.get(item.id)
            row = (score_multi_turn(item, record) if cats.is_multi_turn(category)
                   else score_single_turn(item, record["raw"]))
            scored.append({**row, "truncated": bool(record.get("truncated", False))})
        write_jsonl(out_dir / "items" / f"bfcl_{category}.jsonl", scored)
        write_jsonl(out_dir / "bfcl_results" / cats.result_file_name(category),
                    [official_result(item, store.get(item.id)) for item in items])
        scores[category] = aggregate.CategoryScore(sum(row["valid"] for row in scored), len(scored))
        truncated[category] = sum(row["truncated"] for row in scored)
        logger.info("BFCL %s: accuracy %.4f (%d truncated prompts)", category, scores[category].accuracy,
                    truncated[category])
    return {
        "categories": {name: {"accuracy": s.accuracy, "correct": s.correct, "total": s.total,
                              "truncated": truncated[name]}
                       for name, s in scores.items()},
        "groups": aggregate.summarize(scores),
        "skipped": skipped,
        "limit": config.limit,
    }
