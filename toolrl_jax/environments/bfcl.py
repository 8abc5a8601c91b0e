"""BFCL v3's multi-turn API classes (file system, math, messaging, trading, travel, ...) as a training environment.

The calls run through the evaluator's own `ApiSession` and are judged by its own per-turn check (`check_turn`, the
official rules of toolrl_jax.evaluation.bfcl.multi_turn), so a trajectory sees the same result texts and earns the
same verdict as the BFCL evaluation would give it. The API classes come from the optional bfcl-eval package
(`api_classes_available()` says whether they import, and how to install them).

Task files (JSONL, one task per line; `load_tasks` reads them, tasks.write_tasks writes them) hold the fields of a
BFCL v3 multi-turn entry:

* id: a unique string;
* question: the user turns, each a non-empty list of {"role": "user", "content": str} messages;
* involved_classes: the API classes the task uses (names of data.MULTI_TURN_CLASSES, e.g. "GorillaFileSystem");
* initial_config (optional, default {}): {class name: the scenario its `_load_scenario` loads};
* path (optional): the functions a solution goes through (informational, as in BFCL; not used);
* ground_truth (optional): per user turn, the reference calls as call strings (`cd(folder='docs')`); an empty turn
  is not scored (as in BFCL's miss_func / miss_param). Without it the task can be rolled out but not scored;
* long_context (optional, default false): load the scenario with the classes' long-context padding.

BFCL's `missed_function` / `excluded_function` fields (functions held out of the docs) are not supported.

One trajectory = one task. `reset` shows the involved classes' function docs (the copy bundled in bfcl-eval, or
`bfcl_dir`/multi_turn_func_doc) and the first user turn. `step(calls)` runs the calls on the task's session, each in
a thread with a timeout (execution.call_with_timeout); failures are error results, never exceptions.

Several user turns, the convention: an assistant turn without tool calls ends the current user turn, and the rollout
reports it by calling `step([])`. The environment then closes the turn (replays the turn's ground truth on a second
session and applies the official checks) and returns a `TurnStep`, a `Step` subclass whose extra field
`user_messages` holds the next user turn's chat messages, to append before generating again (`next_user_messages`
reads it from any Step). After the last user turn `step([])` returns done=True. A rollout that stops at the first
answer still works: `score` closes the open turn and counts turns never reached as failed. As in BFCL, more than
`max_steps_per_turn` tool-call steps in one user turn force the trajectory to quit (it then fails).

`score` reports success exactly when the official checker would pass the trajectory (every turn reached, every
scored turn passing); the reward is 1/0 (reward="binary", the benchmark's metric) or the fraction of scored turns
that passed (reward="turns", each turn judged on its own).

Contamination: BFCL v3's multi-turn categories (base, miss_func, miss_param, long_context) are what
experiments.evaluate reports, so training on their entries would inflate the reported numbers. `check_contamination`
finds tasks whose id, whole question, or any user message of at least `MIN_MATCH_CHARS` characters (after
normalisation: case-folded, runs of non-alphanumerics as one space) equals an evaluation entry's. `load_tasks` and
`BfclEnvironment.reset` refuse such tasks unless allow_contamination=True. They check against `bfcl_dir`'s
BFCL_v3_multi_turn_*.json when present, and against the BFCL_v4_multi_turn_*.json bundled in bfcl-eval (the same
800 entries, same ids, mostly the same wording).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from toolrl_jax.environments.execution import call_with_timeout, check_limits, result_text
from toolrl_jax.environments.protocol import Environment, Outcome, Reset, Step, ToolCall, ToolResult
from toolrl_jax.environments.synthetic import HERMES_SYSTEM
from toolrl_jax.environments.tasks import task_lines
from toolrl_jax.evaluation import prompts
from toolrl_jax.evaluation.bfcl import categories, data, multi_turn
from toolrl_jax.evaluation.bfcl.ast_checker import CheckResult

ENV_NAME = "bfcl"
PROMPT_STYLES = ("toolrl", "hermes")
REWARD_MODES = ("binary", "turns")
EVAL_CATEGORIES = categories.MULTI_TURN  # base, miss_func, miss_param, long_context
MIN_MATCH_CHARS = 40  # shorter user messages ("What's inside?") are too generic to count as copied
BASE_CATEGORY, LONG_CONTEXT_CATEGORY = "multi_turn_base", "multi_turn_long_context"
_REQUIRED_KEYS = ("id", "question", "involved_classes")
_UNSUPPORTED_KEYS = ("missed_function", "excluded_function")
_NON_ALNUM = re.compile(r"[^0-9a-z]+")
_JSON_TYPES = {"dict": "object", "float": "number", "tuple": "array"}


# ----------------------------------------------------------------------------------------------------------------
# Bundled data and function docs.
# ----------------------------------------------------------------------------------------------------------------

def bundled_data_dir() -> Path | None:
    """bfcl-eval's own data folder (multi_turn_func_doc/, BFCL_v4_*.json), None when the package is missing."""
    try:
        spec = importlib.util.find_spec("bfcl_eval")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    return folder if folder.is_dir() else None


def docs_root(bfcl_dir: str | Path | None = None) -> Path:
    """The folder whose multi_turn_func_doc/ holds the function docs: `bfcl_dir` when given, else bfcl-eval's."""
    root = Path(bfcl_dir) if bfcl_dir is not None else bundled_data_dir()
    if root is None:
        raise FileNotFoundError(f"no BFCL function docs: bfcl-eval is not installed ({multi_turn.INSTALL_HINT}); "
                                f"or pass bfcl_dir, a BFCL folder holding multi_turn_func_doc/")
    if not (root / "multi_turn_func_doc").is_dir():
        raise FileNotFoundError(f"{root} has no multi_turn_func_doc/ folder of BFCL function docs")
    return root


@functools.lru_cache(maxsize=64)
def _cached_docs(root: str, class_name: str) -> tuple[dict[str, Any], ...]:
    return tuple(data.load_function_docs(Path(root), class_name))


def function_docs(class_names: Sequence[str], bfcl_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The BFCL function docs of `class_names`, in order (fresh copies; files are read once per process)."""
    root = str(docs_root(bfcl_dir))
    return [copy.deepcopy(doc) for name in class_names for doc in _cached_docs(root, name)]


def _schema(value: Any) -> Any:
    if isinstance(value, list):
        return [_schema(item) for item in value]
    if not isinstance(value, dict):
        return value
    converted = {key: _schema(item) for key, item in value.items()}
    kind = converted.get("type")
    if kind == "any":
        del converted["type"]
    elif isinstance(kind, str):
        converted["type"] = _JSON_TYPES.get(kind, kind)
    return converted


def json_schema_spec(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A BFCL function doc as a JSON-schema tool spec ({"name", "description", "parameters"}): BFCL's "dict",
    "float", "tuple" become "object", "number", "array", "any" drops the type, and the "response" part is left out."""
    parameters = doc.get("parameters") or {"type": "dict", "properties": {}}
    return {"name": doc["name"], "description": doc.get("description", ""), "parameters": _schema(parameters)}


# ----------------------------------------------------------------------------------------------------------------
# Task files.
# ----------------------------------------------------------------------------------------------------------------

def _turn_problem(number: int, turn: Any) -> str | None:
    if not isinstance(turn, list) or not turn:
        return f"question turn {number} must be a non-empty list of messages"
    for message in turn:
        if not isinstance(message, dict) or message.get("role") != "user" \
                or not isinstance(message.get("content"), str):
            return f'question turn {number}: each message must be {{"role": "user", "content": str}}'
    return None


def _ground_truth_problem(ground_truth: Any, turns: int) -> str | None:
    if not isinstance(ground_truth, list) or len(ground_truth) != turns:
        return f"ground_truth must be a list of {turns} turns (one per question turn)"
    for number, calls in enumerate(ground_truth):
        if not isinstance(calls, list) or not all(isinstance(call, str) for call in calls):
            return f"ground_truth turn {number} must be a list of call strings"
        for call in calls:
            try:
                multi_turn.parse_call(call)
            except ValueError as error:
                return f"ground_truth turn {number}: {error}"
    return None


def _classes_problem(task: Mapping[str, Any]) -> str | None:
    classes = task["involved_classes"]
    if not isinstance(classes, list) or not classes or len(set(map(str, classes))) != len(classes):
        return "involved_classes must be a non-empty list of distinct class names"
    unknown = [name for name in classes if name not in data.MULTI_TURN_CLASSES]
    if unknown:
        return f"unknown API classes {unknown}; known: {sorted(data.MULTI_TURN_CLASSES)}"
    config = task.get("initial_config", {})
    if not isinstance(config, dict) or not all(isinstance(value, dict) for value in config.values()):
        return "initial_config must be an object mapping class names to scenario objects"
    return None


def task_problem(task: Any) -> str | None:
    """What is wrong with a task dict (None when it is well formed); see the module docstring for the fields."""
    if not isinstance(task, dict):
        return f"a task must be a JSON object, got {type(task).__name__}"
    missing = [key for key in _REQUIRED_KEYS if key not in task]
    if missing:
        return f"missing fields {missing}"
    unsupported = [key for key in _UNSUPPORTED_KEYS if key in task]
    if unsupported:
        return f"fields {unsupported} (functions held out of the docs) are not supported"
    if not isinstance(task["id"], str) or not task["id"]:
        return "id must be a non-empty string"
    question = task["question"]
    if not isinstance(question, list) or not question:
        return "question must be a non-empty list of user turns"
    problem = next(filter(None, (_turn_problem(i, turn) for i, turn in enumerate(question))), None)
    problem = problem or _classes_problem(task)
    if problem is None and "path" in task and not (
            isinstance(task["path"], list) and all(isinstance(step, str) for step in task["path"])):
        problem = "path must be a list of strings"
    if problem is None and not isinstance(task.get("long_context", False), bool):
        problem = "long_context must be true or false"
    if problem is None and "ground_truth" in task:
        problem = _ground_truth_problem(task["ground_truth"], len(question))
    return problem


def load_tasks(path: str | Path, *, bfcl_dir: str | Path | None = None,
               allow_contamination: bool = False) -> list[dict[str, Any]]:
    """The tasks of a JSONL task file, checked line by line (ValueError naming the file and line) and for
    contamination with the BFCL evaluation set (ValueError listing the ids, unless allow_contamination)."""
    tasks: list[dict[str, Any]] = []
    lines: dict[str, int] = {}
    for number, task in task_lines(path):
        problem = task_problem(task)
        if problem is None and task["id"] in lines:
            problem = f"duplicate id (first on line {lines[task['id']]})"
        if problem is not None:
            raise ValueError(f"{path}:{number}: task {task.get('id')!r} {problem}")
        lines[task["id"]] = number
        tasks.append(task)
    if not allow_contamination:
        refuse_contaminated(tasks, default_reference(bfcl_dir), source=str(path))
    return tasks


def task_item(task: Mapping[str, Any]) -> data.BfclItem:
    """The evaluator's view of a (well-formed) task, which `ApiSession` and the checks run on."""
    return data.BfclItem(
        id=task["id"], category=LONG_CONTEXT_CATEGORY if task.get("long_context") else BASE_CATEGORY,
        turns=copy.deepcopy(task["question"]), functions=[], answer=copy.deepcopy(task.get("ground_truth")),
        initial_config=copy.deepcopy(task.get("initial_config", {})),
        involved_classes=list(task["involved_classes"]))


# ----------------------------------------------------------------------------------------------------------------
# Contamination with the evaluation set.
# ----------------------------------------------------------------------------------------------------------------

def normalize_text(text: str) -> str:
    """Case-folded, every run of non-alphanumerics one space, stripped: 'What's  inside?' -> 'what s inside'."""
    return _NON_ALNUM.sub(" ", text.casefold()).strip()


def _messages(question: Any) -> list[str]:
    """Every user message text of a question (list of turns of messages), normalised; malformed parts skipped."""
    texts = []
    for turn in question if isinstance(question, list) else []:
        for message in turn if isinstance(turn, list) else []:
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                texts.append(normalize_text(message["content"]))
    return texts


@dataclasses.dataclass(frozen=True)
class ReferenceIndex:
    """What identifies the evaluation entries: their ids, whole normalised questions, and long user messages, each
    mapped to the id of an entry that has it."""

    ids: frozenset[str] = frozenset()
    questions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    messages: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def build(cls, entries: Iterable[tuple[str, Any]]) -> "ReferenceIndex":
        """From (id, question) pairs."""
        ids, questions, messages = set(), {}, {}
        for entry_id, question in entries:
            ids.add(entry_id)
            texts = _messages(question)
            questions.setdefault(" | ".join(texts), entry_id)
            for text in texts:
                if len(text) >= MIN_MATCH_CHARS:
                    messages.setdefault(text, entry_id)
        return cls(frozenset(ids), questions, messages)

    def merge(self, other: "ReferenceIndex") -> "ReferenceIndex":
        return ReferenceIndex(self.ids | other.ids, {**other.questions, **self.questions},
                              {**other.messages, **self.messages})

    def match(self, task: Mapping[str, Any]) -> str | None:
        """Why `task` is contaminated (None when it is not)."""
        if task.get("id") in self.ids:
            return "its id is an evaluation entry's id"
        texts = _messages(task.get("question"))
        whole = " | ".join(texts)
        if texts and whole in self.questions:
            return f"its question is that of evaluation entry {self.questions[whole]}"
        for text in texts:
            if text in self.messages:
                return f"the user message {text[:60]!r} is in evaluation entry {self.messages[text]}"
        return None


def evaluation_files(folder: str | Path) -> list[Path]:
    """The multi-turn evaluation files of a BFCL folder: BFCL_v3_multi_turn_*.json, or bfcl-eval's v4 names."""
    folder = Path(folder)
    found = []
    for category in EVAL_CATEGORIES:
        for version in ("v3", "v4"):
            path = folder / f"BFCL_{version}_{category}.json"
            if path.is_file():
                found.append(path)
    return found


@functools.lru_cache(maxsize=8)
def _folder_index(folder: str) -> ReferenceIndex:
    files = evaluation_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder} holds no BFCL multi-turn evaluation files (BFCL_v3_multi_turn_*.json)")
    return ReferenceIndex.build((row["id"], row.get("question")) for path in files for row in data.read_jsonl(path))


@functools.lru_cache(maxsize=8)
def _folders_index(folders: tuple[str, ...]) -> ReferenceIndex:
    index = ReferenceIndex()
    for folder in folders:
        index = index.merge(_folder_index(folder))
    return index


def _entry_pair(entry: Any) -> tuple[str, Any]:
    if isinstance(entry, data.BfclItem):
        return entry.id, entry.turns
    if isinstance(entry, Mapping) and isinstance(entry.get("id"), str):
        return entry["id"], entry.get("question")
    raise TypeError(f"expected a BFCL folder, a BfclItem or an entry dict with 'id', got {type(entry).__name__}")


def reference_index(reference: str | os.PathLike | Iterable[Any] | None = None) -> ReferenceIndex:
    """The index of `reference`: a BFCL folder, or an iterable of folders / BfclItems / entry dicts
    ({"id", "question"}); None: the evaluation files bundled in bfcl-eval. Folders are read once per process."""
    if reference is None:
        reference = default_reference(None)
    if isinstance(reference, (str, os.PathLike)):
        reference = [reference]
    folders, entries = [], []
    for part in reference:
        if isinstance(part, (str, os.PathLike)):
            folders.append(str(Path(part).resolve()))
        else:
            entries.append(_entry_pair(part))
    index = _folders_index(tuple(folders))
    return index.merge(ReferenceIndex.build(entries)) if entries else index


def default_reference(bfcl_dir: str | Path | None) -> list[Path]:
    """The folders to check against: `bfcl_dir` if it holds evaluation files, and bfcl-eval's data folder.
    Raises FileNotFoundError when there are none (the check cannot be done)."""
    folders = [Path(folder) for folder in (bfcl_dir, bundled_data_dir())
               if folder is not None and evaluation_files(folder)]
    if not folders:
        raise FileNotFoundError(
            f"no BFCL multi-turn evaluation files to check training tasks against: install bfcl-eval "
            f"({multi_turn.INSTALL_HINT}) or pass bfcl_dir (a folder with BFCL_v3_multi_turn_*.json); "
            f"or pass allow_contamination=True to skip the check")
    return folders


def contamination_reasons(tasks: Iterable[Mapping[str, Any]],
                          reference: str | os.PathLike | Iterable[Any] | None = None) -> dict[str, str]:
    """{task id: why it matches the evaluation set} for the contaminated tasks, in task order."""
    index = reference if isinstance(reference, ReferenceIndex) else reference_index(reference)
    reasons = {}
    for task in tasks:
        reason = index.match(task)
        if reason is not None:
            reasons.setdefault(str(task.get("id")), reason)
    return reasons


def check_contamination(tasks: Iterable[Mapping[str, Any]],
                        reference: str | os.PathLike | Iterable[Any] | None = None) -> list[str]:
    """The ids of the tasks whose id or normalised question text appears in the BFCL v3 multi-turn evaluation set
    (`reference`: see `reference_index`)."""
    return list(contamination_reasons(tasks, reference))


def refuse_contaminated(tasks: Iterable[Mapping[str, Any]], reference: Any, source: str = "tasks") -> None:
    """Raise ValueError naming the contaminated tasks (and how to override) if there are any."""
    reasons = contamination_reasons(tasks, reference)
    if not reasons:
        return
    listed = "; ".join(f"{task_id}: {why}" for task_id, why in list(reasons.items())[:20])
    more = f" (and {len(reasons) - 20} more)" if len(reasons) > 20 else ""
    raise ValueError(f"{source}: {len(reasons)} training tasks overlap the BFCL v3 multi-turn evaluation set, which "
                     f"experiments.evaluate reports: {listed}{more}. Remove them, or pass allow_contamination=True "
                     f"if the overlap is intended")


# ----------------------------------------------------------------------------------------------------------------
# The environment.
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TurnStep(Step):
    """A Step that may open the next user turn: `user_messages` are its chat messages, to be appended after the
    assistant's answer (empty when there is none). Rollouts unaware of the field still read a valid Step."""

    user_messages: tuple[dict[str, str], ...] = ()


def next_user_messages(step: Step) -> list[dict[str, str]]:
    """The user messages a step opens (any environment's Step; only a `TurnStep` has them)."""
    return [dict(message) for message in getattr(step, "user_messages", ())]


def call_string(call: ToolCall) -> str:
    """A structured call in BFCL's call-string form, name(key=value, ...) with Python literals (for logs and for
    `check_multi_turn`)."""
    arguments = call.arguments if isinstance(call.arguments, Mapping) else {}
    return f"{call.name}({', '.join(f'{key}={value!r}' for key, value in arguments.items())})"


def _is_error(text: str) -> bool:
    """An error result: the session's error prefix, or an API method's {"error": ...} reply."""
    if text.startswith(multi_turn.EXECUTION_ERROR):
        return True
    if not text.startswith("{"):
        return False
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and "error" in value


@functools.lru_cache(maxsize=1)
def _prompt_set() -> prompts.PromptSet:
    return prompts.PromptSet.load()


@functools.lru_cache(maxsize=1)
def _language_hints() -> dict[str, str]:
    return data.load_language_hints()


def _user_block(message: Mapping[str, str]) -> dict[str, str]:
    """A later user turn's message in ToolRL layout, as the evaluator renders user turns into its history."""
    suffix = _prompt_set().bfcl_multi_turn.user_suffix
    content = message["content"].strip() + (f"\n{suffix}" if suffix else "")
    return {"role": "user", "content": f"<user> {content} </user>"}


class BfclEnvironment(Environment):
    """One trajectory of a BFCL-style multi-turn task (see the module docstring).

    bfcl_dir: a BFCL folder (multi_turn_func_doc/, BFCL_v3_multi_turn_*.json) for the function docs and the
      contamination check; None: the copies bundled in bfcl-eval.
    prompt_style: "toolrl" (the evaluator's BFCL system prompt and user-turn layout; ToolRL call format) or
      "hermes" (a short system prompt, tools for the chat template, Hermes call format).
    reward: "binary" (1/0, the benchmark's metric) or "turns" (fraction of scored turns passed).
    allow_contamination: accept tasks that overlap the evaluation set.
    timeout_s: per-call limit (None: inline, no limit); after max_timeouts timed-out calls the trajectory stops.
    max_steps_per_turn: tool-call steps allowed in one user turn before the trajectory is forced to quit (BFCL's).
    max_result_chars: results the model reads are cut to this length (None: whole, as in the evaluation); the checks
      always use the whole results.
    """

    multi_user_turns = True

    def __init__(self, *, bfcl_dir: str | Path | None = None, prompt_style: str = "toolrl", reward: str = "binary",
                 allow_contamination: bool = False, timeout_s: float | None = 5.0,
                 max_steps_per_turn: int = multi_turn.MAX_STEPS_PER_TURN, max_timeouts: int = 2,
                 max_result_chars: int | None = None) -> None:
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"unknown prompt_style {prompt_style!r}; expected one of {PROMPT_STYLES}")
        if reward not in REWARD_MODES:
            raise ValueError(f"unknown reward {reward!r}; expected one of {REWARD_MODES}")
        check_limits(timeout_s, max_steps_per_turn=max_steps_per_turn, max_timeouts=max_timeouts,
                     max_result_chars=1 if max_result_chars is None else max_result_chars)
        self.bfcl_dir = bfcl_dir
        self.prompt_style = prompt_style
        self.reward = reward
        self.allow_contamination = allow_contamination
        self.timeout_s = timeout_s
        self.max_steps_per_turn = max_steps_per_turn
        self.max_timeouts = max_timeouts
        self.max_result_chars = max_result_chars
        self.item: data.BfclItem | None = None
        self.session: multi_turn.ApiSession | None = None
        self.truth: multi_turn.ApiSession | None = None
        self._start_trajectory()

    def _start_trajectory(self) -> None:
        self.turn = 0  # the open user turn (== number of turns once all are done)
        self.steps_in_turn = 0
        self.made_calls = False  # in the open turn
        self.model_results: list[str] = []  # every result text of the trajectory, whole (the checks' multiset)
        self.turn_calls: list[list[str]] = [[]]  # per turn, the calls made, as call strings (for details)
        self.verdicts: list[CheckResult | None] = []  # per closed turn; None: not scored (no ground truth calls)
        self.timeouts = 0
        self.stop_reason: str | None = None
        self._outcome: Outcome | None = None

    # -- reset --------------------------------------------------------------------------------------------------

    def reset(self, example: Mapping[str, Any]) -> Reset:
        """Build the task's API sessions and its opening messages. Raises ValueError on a malformed or contaminated
        task and RuntimeError when bfcl-eval's API classes are missing (setup, not model output)."""
        problem = task_problem(dict(example) if isinstance(example, Mapping) else example)
        if problem is not None:
            task_id = example.get("id") if isinstance(example, Mapping) else None
            raise ValueError(f"BFCL task {task_id!r}: {problem}")
        if not self.allow_contamination:
            refuse_contaminated([example], default_reference(self.bfcl_dir), source="reset")
        available, why = multi_turn.api_classes_available()
        if not available:
            raise RuntimeError(why)
        docs = function_docs(example["involved_classes"], self.bfcl_dir)
        self.item = task_item(example)
        self.session = multi_turn.ApiSession(self.item)
        self.truth = multi_turn.ApiSession(self.item) if self.item.answer is not None else None
        self._start_trajectory()
        specs = [json_schema_spec(doc) for doc in docs]
        first = self.item.turns[0]
        if self.prompt_style == "hermes":
            messages = [{"role": "system", "content": HERMES_SYSTEM}, *(dict(m) for m in first)]
            return Reset(messages=messages, tools=specs, call_format="hermes")
        prompt_set = _prompt_set()
        system = prompt_set.system_prompt(data.prompt_functions(docs, BASE_CATEGORY, _language_hints()))
        return Reset(messages=prompts.chat(system, prompts.render_history(first, prompt_set.bfcl_multi_turn)),
                     tools=specs, call_format="toolrl")

    def _user_messages(self, turn: int) -> tuple[dict[str, str], ...]:
        messages = self.item.turns[turn]
        if self.prompt_style == "hermes":
            return tuple({"role": "user", "content": m["content"]} for m in messages)
        return tuple(_user_block(m) for m in messages)

    # -- step ---------------------------------------------------------------------------------------------------

    def _require_reset(self) -> multi_turn.ApiSession:
        if self.session is None or self.item is None:
            raise RuntimeError("BfclEnvironment: call reset(example) first")
        return self.session

    def _run(self, session: multi_turn.ApiSession, call: ToolCall) -> ToolResult:
        """Run one call on the session with the timeout; the whole text is kept for the checks."""
        name = call.name if isinstance(call.name, str) else repr(call.name)
        arguments = call.arguments
        if not isinstance(arguments, Mapping) or not all(isinstance(key, str) for key in arguments):
            text = f"{multi_turn.EXECUTION_ERROR}the arguments of {name} must be a JSON object"
        else:
            run = functools.partial(session.call, name, [], copy.deepcopy(dict(arguments)))
            outcome = call_with_timeout(run, {}, self.timeout_s)
            if outcome.timed_out:
                self.timeouts += 1
                if self.timeouts >= self.max_timeouts:
                    self.stop_reason = f"the environment stopped after {self.timeouts} timed-out tool calls"
                text = f"{multi_turn.EXECUTION_ERROR}{name} timed out after {self.timeout_s:g} s"
            elif outcome.exception is not None:  # ApiSession.call catches everything; kept as a safety net
                text = f"{multi_turn.EXECUTION_ERROR}{type(outcome.exception).__name__}: {outcome.exception}"
            else:
                text = str(outcome.value)
        self.model_results.append(text)
        self.turn_calls[-1].append(call_string(ToolCall(name, arguments if isinstance(arguments, Mapping) else {})))
        self.made_calls = True
        shown = text if self.max_result_chars is None else result_text(text, self.max_result_chars)
        return ToolResult(name=name, content=shown, error=_is_error(text))

    def step(self, calls: Sequence[ToolCall]) -> TurnStep:
        """Run an assistant turn's calls in order; no calls: the user turn is over (see the module docstring)."""
        session = self._require_reset()
        if self.stop_reason is not None:
            results = [ToolResult(name=call.name if isinstance(call.name, str) else repr(call.name),
                                  content=f"{multi_turn.EXECUTION_ERROR}not run: {self.stop_reason}", error=True)
                       for call in calls]
            return TurnStep(results=results, done=True)
        if not calls:
            return self._end_turn()
        results = [self._run(session, call) for call in calls]
        self.steps_in_turn += 1
        if self.stop_reason is None and self.steps_in_turn > self.max_steps_per_turn:
            self.stop_reason = f"more than {self.max_steps_per_turn} tool-call steps in user turn {self.turn}"
        return TurnStep(results=results, done=self.stop_reason is not None)

    def _end_turn(self) -> TurnStep:
        self._close_turn()
        if self.turn >= len(self.item.turns):
            self.stop_reason = "all user turns are done"
            return TurnStep(results=[], done=True)
        return TurnStep(results=[], done=False, user_messages=self._user_messages(self.turn))

    def _close_turn(self) -> None:
        """Replay the turn's ground truth on the second session and judge the turn as the official checker does."""
        if self.truth is not None:
            truth_calls = self.item.answer[self.turn]
            truth_results = self.truth.execute(truth_calls)
            self.verdicts.append(None if not truth_calls else multi_turn.check_turn(
                self.turn, self.made_calls, self.session, self.truth, truth_results, self.model_results))
        self.turn += 1
        self.steps_in_turn, self.made_calls = 0, False
        if self.turn < len(self.item.turns):
            self.turn_calls.append([])

    # -- score --------------------------------------------------------------------------------------------------

    def score(self, final_answer: str | None) -> Outcome:
        """The official verdict on the trajectory (the final answer text is not judged, as in BFCL). Closes the
        open user turn unless the trajectory was forced to quit; turns never reached fail."""
        self._require_reset()
        if self._outcome is not None:
            return self._outcome
        if self.stop_reason is None and self.turn < len(self.item.turns):
            self._close_turn()
        self._outcome = self._verdict()
        self.stop_reason = self.stop_reason or "the trajectory was scored"
        return self._outcome

    def _verdict(self) -> Outcome:
        turns = len(self.item.turns)
        details: dict[str, Any] = {"id": self.item.id, "turns": turns, "turns_completed": self.turn,
                                   "calls": self.turn_calls, "stop_reason": self.stop_reason}
        if self.item.answer is None:
            return Outcome(False, 0.0, {**details, "scored": False, "error": "the task has no ground_truth"})
        scored = [t for t, calls in enumerate(self.item.answer) if calls]
        per_turn = [None if v is None else {"valid": v.valid, "error_type": v.error_type, "error": v.error}
                    for v in self.verdicts]
        passed = sum(v is not None and v.valid for v in self.verdicts)
        failure = next((v for v in self.verdicts if v is not None and not v.valid), None)
        if failure is None and self.turn < turns:
            why = self.stop_reason or "the rollout ended before the last user turn"
            failure = CheckResult(False, f"{self.turn} turns for {turns} expected (forced to quit: {why})",
                                  "force_terminated")
        success = failure is None
        if self.reward == "turns" and scored:
            reward = passed / len(scored)
        else:
            reward = float(success)
        return Outcome(success, reward, {**details, "scored": True, "scored_turns": len(scored),
                                         "passed_turns": passed, "per_turn": per_turn,
                                         "error_type": "" if success else failure.error_type,
                                         "error": "" if success else failure.error})
