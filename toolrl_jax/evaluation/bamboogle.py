"""Bamboogle: two-hop questions answered with a ``Search(query)`` tool; the data, and the offline protocol.

The paper's protocol (web search, LLM judge) is ``bamboogle_toolrl``. The offline protocol here needs no service
and is NOT comparable to the paper's numbers (other prompts, a local corpus, a rule-based judge): the model sees
the Search tool in the ToolRL system prompt and may search for at most ``max_rounds`` generations; only the first
call of a ``<tool_call>`` block is executed and its top-5 snippets come back as an ``<obs>`` block. A generation
without a call ends the question; its ``<response>`` is the answer. A call in the last allowed round is not
executed (nothing could read it). Answers are judged by a pluggable ``judge(question, prediction, gold) -> bool``;
the default accepts an exact match or a token F1 of at least ``f1_threshold`` after SQuAD normalisation. Also
reported: EM, F1, cover-EM and the average number of executed tool calls.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re
import string
from pathlib import Path
from typing import Any, Callable

from toolrl_jax.evaluation import prompts as P
from toolrl_jax.evaluation.generator import GenerationLimits, Generator, generate_batched
from toolrl_jax.evaluation.parsing import final_answer, parse_turn
from toolrl_jax.evaluation.records import RecordStore, write_jsonl
from toolrl_jax.evaluation.search import SearchBackend

logger = logging.getLogger(__name__)

# ToolRL's Bamboogle/generate.py ran vLLM with max_model_len=4096 and max_tokens=4096.
DEFAULT_LIMITS = GenerationLimits(max_new_tokens=4096, context_tokens=4096)

Judge = Callable[[str, str, str], bool]


@dataclasses.dataclass(frozen=True)
class BamboogleConfig:
    max_rounds: int = 4
    top_k: int = 5
    f1_threshold: float = 0.5  # the offline protocol's default judge: EM or F1 >= this
    batch_size: int = 8
    limit: int | None = None
    limits: GenerationLimits = DEFAULT_LIMITS


@dataclasses.dataclass(frozen=True)
class BamboogleItem:
    id: str
    question: str
    answer: str


def load_bamboogle(path: str | Path, limit: int | None = None) -> list[BamboogleItem]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Bamboogle data not found at {path}")
    with open(path, encoding="utf-8") as handle:
        rows = json.load(handle)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of {{Question, Answer}}")
    items = []
    for index, row in enumerate(rows[:limit] if limit is not None else rows):
        question = row.get("Question", row.get("question")) if isinstance(row, dict) else None
        answer = row.get("Answer", row.get("answer")) if isinstance(row, dict) else None
        if not isinstance(question, str) or not isinstance(answer, str):
            raise ValueError(f"{path} item {index}: needs string 'Question' and 'Answer'")
        items.append(BamboogleItem(id=f"bamboogle_{index}", question=question, answer=answer))
    return items


# ---------------------------------------------------------------------------------------------- scoring


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, squash whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


def f1_score(prediction: str, gold: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = collections.Counter(predicted) & collections.Counter(expected)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def cover_exact_match(prediction: str, gold: str) -> bool:
    """The normalised gold answer appears as a whole-word span of the normalised prediction."""
    gold_norm = normalize_answer(gold)
    return bool(gold_norm) and f" {gold_norm} " in f" {normalize_answer(prediction)} "


def default_judge(f1_threshold: float = 0.5) -> Judge:
    """EM or F1 >= ``f1_threshold`` (a rule-based stand-in for the paper's LLM judge)."""
    def judge(question: str, prediction: str, gold: str) -> bool:
        del question
        return exact_match(prediction, gold) or f1_score(prediction, gold) >= f1_threshold
    return judge


# ------------------------------------------------------------------------------------------- generation


def format_snippets(snippets: list[str]) -> str:
    if not snippets:
        return "No results found."
    return "\n".join(f"[{rank}] {snippet}" for rank, snippet in enumerate(snippets, start=1))


@dataclasses.dataclass
class _Dialogue:
    item: BamboogleItem
    messages: list[dict]
    rounds: list[str] = dataclasses.field(default_factory=list)
    calls: list[str] = dataclasses.field(default_factory=list)  # executed calls (incl. invalid ones)
    queries: list[str] = dataclasses.field(default_factory=list)
    prediction: str | None = None
    truncated_rounds: int = 0


def _step(dialogue: _Dialogue, text: str, search: SearchBackend, config: BamboogleConfig) -> None:
    dialogue.rounds.append(text)
    dialogue.messages.append({"role": "assistant", "content": text})
    calls = parse_turn(text).calls
    if not calls or len(dialogue.rounds) >= config.max_rounds:
        dialogue.prediction = final_answer(text)
        return
    call = calls[0]  # only the first call of a block is executed
    dialogue.calls.append(call.to_python())
    query = call.parameters.get("query")
    if call.name != "Search" or not isinstance(query, str):
        result = f"Error: only Search(query: string) is available, got {call.to_python()}"
    else:
        dialogue.queries.append(query)
        result = format_snippets(search.search(query, config.top_k))
    dialogue.messages.append({"role": "tool", "name": call.to_python(), "content": result})


def evaluate_bamboogle(generator: Generator, data_path: str | Path, out_dir: str | Path, search: SearchBackend,
                       prompt_set: P.PromptSet, config: BamboogleConfig = BamboogleConfig(),
                       judge: Judge | None = None) -> dict[str, Any]:
    """Run the multi-round search dialogue (resuming), then score; writes raw and scored records."""
    out_dir = Path(out_dir)
    judge = judge or default_judge(config.f1_threshold)
    items = load_bamboogle(data_path, config.limit)
    store = RecordStore(out_dir / "generations" / "bamboogle.jsonl")
    system = prompt_set.system_prompt([prompt_set.bamboogle_tool])
    pending = [item for item in items if item.id not in store]
    logger.info("Bamboogle: %d questions (%d already generated)", len(items), len(items) - len(pending))
    for start in range(0, len(pending), config.batch_size):
        dialogues = [_Dialogue(item, [{"role": "user", "content": item.question}])
                     for item in pending[start:start + config.batch_size]]
        while active := [d for d in dialogues if d.prediction is None]:
            prompts = [P.chat(system, P.render_history(d.messages, prompt_set.bamboogle)) for d in active]
            for dialogue, completion in zip(active, generate_batched(generator, prompts, config.batch_size,
                                                                     config.limits)):
                dialogue.truncated_rounds += completion.truncated
                _step(dialogue, completion.text, search, config)
        store.add({"id": d.item.id, "rounds": d.rounds, "calls": d.calls, "queries": d.queries,
                   "prediction": d.prediction, "truncated": d.truncated_rounds > 0}
                  for d in dialogues)
    scored = []
    for item in items:
        record = store.get(item.id)
        prediction = record["prediction"] or ""
        scored.append({
            "id": item.id, "question": item.question, "gold": item.answer, "prediction": prediction,
            "correct": bool(judge(item.question, prediction, item.answer)),
            "em": exact_match(prediction, item.answer), "f1": f1_score(prediction, item.answer),
            "cover_em": cover_exact_match(prediction, item.answer), "tool_calls": len(record["calls"]),
            "queries": record["queries"], "truncated": bool(record.get("truncated", False)),
        })
    write_jsonl(out_dir / "items" / "bamboogle.jsonl", scored)
    count = max(len(scored), 1)
    return {
        "protocol": "offline", "comparable_to_paper": False,
        "accuracy": sum(row["correct"] for row in scored) / count,
        "em": sum(row["em"] for row in scored) / count,
        "f1": sum(row["f1"] for row in scored) / count,
        "cover_em": sum(row["cover_em"] for row in scored) / count,
        "avg_tool_calls": sum(row["tool_calls"] for row in scored) / count,
        "total": len(scored), "truncated": sum(row["truncated"] for row in scored),
        "limit": config.limit,
    }
