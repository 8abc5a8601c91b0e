"""Load BFCL v3 items (questions, function docs, possible answers) from a local copy of the benchmark.

Expected layout under ``bfcl_dir``: ``BFCL_v3_<category>.json`` (JSON lines), ``possible_answer/`` with
the same file names, and ``multi_turn_func_doc/<api>.json`` for the multi-turn categories.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

from toolrl_jax.evaluation.bfcl import categories as cats

# Multi-turn API class -> function-doc file (and module name in bfcl_eval's func_source_code).
MULTI_TURN_CLASSES: dict[str, str] = {
    "GorillaFileSystem": "gorilla_file_system",
    "MathAPI": "math_api",
    "MessageAPI": "message_api",
    "TwitterAPI": "posting_api",
    "TicketAPI": "ticket_api",
    "TradingBot": "trading_bot",
    "TravelAPI": "travel_booking",
    "VehicleControlAPI": "vehicle_control",
}

_HINTS_FILE = Path(__file__).resolve().parents[1] / "templates" / "bfcl_language_hints.json"


@dataclasses.dataclass
class BfclItem:
    """One BFCL test entry with everything needed to prompt and score it."""

    id: str
    category: str
    turns: list[list[dict]]  # question: one list of messages per user turn (a turn may be empty)
    functions: list[dict]  # docs available from the start (original types; used by the checker)
    answer: Any = None  # single-turn: [{name: {param: [options]}}]; multi-turn: [[call strings]] per turn
    initial_config: dict = dataclasses.field(default_factory=dict)
    involved_classes: list[str] = dataclasses.field(default_factory=list)
    missed_functions: dict[int, list[dict]] = dataclasses.field(default_factory=dict)  # turn -> held-out docs


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSON-lines file, naming the file and line on a parse error."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({error})") from error
    return rows


def _entry_index(entry_id: str) -> str:
    """``live_multiple_1052-79-0`` -> ``live_multiple_1052`` (official files align rows by position)."""
    return entry_id.split("-")[0]


def load_function_docs(bfcl_dir: Path, class_name: str) -> list[dict]:
    if class_name not in MULTI_TURN_CLASSES:
        raise ValueError(f"unknown multi-turn API class {class_name!r}")
    return read_jsonl(Path(bfcl_dir) / "multi_turn_func_doc" / f"{MULTI_TURN_CLASSES[class_name]}.json")


def load_category(bfcl_dir: str | Path, category: str, limit: int | None = None) -> list[BfclItem]:
    """All items of ``category`` (the first ``limit`` if given), with possible answers attached."""
    bfcl_dir = Path(bfcl_dir)
    question_path = bfcl_dir / cats.file_name(category)
    if not question_path.is_file():
        raise FileNotFoundError(f"BFCL questions for {category!r} not found at {question_path}")
    entries = read_jsonl(question_path)
    answers: list[dict | None] = [None] * len(entries)
    if cats.has_possible_answers(category):
        answer_path = bfcl_dir / "possible_answer" / cats.file_name(category)
        answers = read_jsonl(answer_path)
        if len(answers) != len(entries):
            raise ValueError(f"{answer_path}: {len(answers)} answers for {len(entries)} questions")
        for row, (entry, answer) in enumerate(zip(entries, answers), start=1):
            if _entry_index(entry["id"]) != _entry_index(answer["id"]):
                raise ValueError(f"{answer_path}:{row}: answer id {answer['id']!r} does not match "
                                 f"question id {entry['id']!r}")
    if limit is not None:
        entries, answers = entries[:limit], answers[:limit]
    doc_cache: dict[str, list[dict]] = {}
    items = []
    for entry, answer in zip(entries, answers):
        item = BfclItem(
            id=entry["id"], category=category, turns=entry["question"],
            functions=entry.get("function", []),
            answer=None if answer is None else answer["ground_truth"],
            initial_config=entry.get("initial_config", {}),
            involved_classes=entry.get("involved_classes", []),
        )
        if cats.is_multi_turn(category):
            _attach_multi_turn_docs(item, entry, bfcl_dir, doc_cache)
        items.append(item)
    return items


def _attach_multi_turn_docs(item: BfclItem, entry: dict, bfcl_dir: Path, cache: dict[str, list[dict]]) -> None:
    docs: list[dict] = []
    for class_name in item.involved_classes:
        if class_name not in cache:
            cache[class_name] = load_function_docs(bfcl_dir, class_name)
        docs.extend(copy.deepcopy(cache[class_name]))
    for turn, names in entry.get("missed_function", {}).items():
        held_out = [doc for doc in docs if doc["name"] in names]
        docs = [doc for doc in docs if doc["name"] not in names]
        item.missed_functions[int(turn)] = held_out
    item.functions = docs


def load_language_hints(path: str | Path | None = None) -> dict[str, str]:
    with open(path or _HINTS_FILE, encoding="utf-8") as handle:
        return json.load(handle)


def prompt_functions(functions: list[dict], category: str, hints: dict[str, str] | None = None) -> list[dict]:
    """Function docs as BFCL v3 shows them to prompting models.

    Every description gets a language note; in the Java/JavaScript categories each parameter's type becomes
    ``string`` with a note saying which type the string must encode (the checker converts it back).
    """
    hints = hints or load_language_hints()
    language = "javascript" if "javascript" in category else "java" if "java" in category else "python"
    docs = copy.deepcopy(functions)
    for doc in docs:
        doc["description"] = doc.get("description", "") + hints[language]
        if language == "python":
            continue
        for spec in doc.get("parameters", {}).get("properties", {}).values():
            kind = spec.get("type")
            if kind == "any":
                spec["description"] = spec.get("description", "") + hints[f"{language}_any"]
            else:
                spec["description"] = spec.get("description", "") + hints[f"{language}_typed"].format(type=kind)
            collection_types = ("ArrayList", "Array") if language == "java" else ("array",)
            if kind in collection_types:
                item_type = (spec.get("items") or {}).get("type")
                spec["description"] += hints[f"{language}_items"].format(item_type=item_type)
                spec.pop("items", None)
            if language == "javascript" and kind == "dict" and "properties" in spec:
                spec["description"] += hints["javascript_dict_schema"].format(schema=json.dumps(spec["properties"]))
                del spec["properties"]
            spec["type"] = "string"
    return docs
