"""BFCL v3 multi-turn: execute calls against the benchmark's stateful API classes and score end states.

The API classes (file system, trading bot, travel booking, ...) ship in the optional ``bfcl-eval`` package
(``pip install --no-deps bfcl-eval``); without it the multi-turn categories are skipped with a message.

Scoring rules (as the official checker): the model's calls of every turn are executed on one persistent set
of API instances, the ground-truth calls on another. After each turn whose ground truth is non-empty:
the model must have made at least one call in that turn; every public attribute of every API instance
must equal the ground truth's; and the ground truth's execution results for that turn must all appear
(as a multiset) among the model's results so far. An entry whose turn count differs from the ground
truth (forced to quit after too many steps) fails.

Version note: bfcl-eval 2026.3.23's TradingBot no longer has ``make_transaction`` / ``update_market_status``
(called by 12 v3 ground-truth steps per category); such calls return the same error string for the model and the
ground truth, so scoring stays consistent but can differ from v3-era official numbers on those entries.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import importlib
import inspect
import json
from typing import Any

from toolrl_jax.evaluation.bfcl.ast_checker import CheckResult
from toolrl_jax.evaluation.bfcl.data import MULTI_TURN_CLASSES, BfclItem

API_PACKAGE = "bfcl_eval.eval_checker.multi_turn_eval.func_source_code"
STATELESS_CLASSES = ("MathAPI",)
BLOCKED_FUNCTIONS = ("kill", "exit", "quit", "remove", "unlink", "popen", "Popen", "run")
MAX_STEPS_PER_TURN = 20  # the official inference loop quits an entry after more steps than this in a turn
INSTALL_HINT = "pip install --no-deps bfcl-eval==2026.3.23"
EXECUTION_ERROR = "Error during execution: "  # how every failed call's result text starts


def api_classes_available() -> tuple[bool, str]:
    """(True, "") if bfcl-eval's API classes import; else (False, why, with the install command)."""
    try:
        for module in MULTI_TURN_CLASSES.values():
            importlib.import_module(f"{API_PACKAGE}.{module}")
    except Exception as error:  # noqa: BLE001 - any import problem means "not usable"
        return False, (f"BFCL multi-turn categories need the API classes from the optional bfcl-eval package "
                       f"({type(error).__name__}: {error}); install them with `{INSTALL_HINT}`")
    return True, ""


def parse_call(text: str) -> tuple[str, list[Any], dict[str, Any]]:
    """``name(a, k=v)`` with literal arguments -> (name, args, kwargs). Raises ValueError otherwise."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as error:
        raise ValueError(f"not a call: {text!r}") from error
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError(f"not a plain function call: {text!r}")
    try:
        args = [ast.literal_eval(arg) for arg in node.args]
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
    except (ValueError, SyntaxError, TypeError) as error:
        raise ValueError(f"arguments of {text!r} are not literals") from error
    if any(kw.arg is None for kw in node.keywords):
        raise ValueError(f"**kwargs are not allowed: {text!r}")
    return node.func.id, args, kwargs


def _blocked(name: str) -> str:
    return f"{EXECUTION_ERROR}Function call {name} is not allowed."


def _result_text(result: Any) -> str:
    if type(result) is str:
        return result
    if type(result) is dict:
        try:
            return json.dumps(result)
        except (TypeError, ValueError):
            return str(result)
    return str(result)


class ApiSession:
    """One persistent set of API instances for an entry; executes call strings, returns result strings."""

    def __init__(self, item: BfclItem):
        self.instances: dict[str, Any] = {}
        self._methods: dict[str, Any] = {}
        long_context = "long_context" in item.category
        for class_name in item.involved_classes:
            module = importlib.import_module(f"{API_PACKAGE}.{MULTI_TURN_CLASSES[class_name]}")
            instance = getattr(module, class_name)()
            if class_name not in STATELESS_CLASSES:
                instance._load_scenario(copy.deepcopy(item.initial_config.get(class_name, {})),
                                        long_context=long_context)
            self.instances[class_name] = instance
            for name, method in inspect.getmembers(instance, predicate=inspect.ismethod):
                if not name.startswith("_"):
                    self._methods[name] = method

    def execute(self, calls: list[str]) -> list[str]:
        return [self._execute_one(call) for call in calls]

    def _execute_one(self, call: str) -> str:
        name = call.split("(")[0].strip()
        if name.split(".")[-1] in BLOCKED_FUNCTIONS:
            return _blocked(name.split(".")[-1])
        try:
            func_name, args, kwargs = parse_call(call)
        except ValueError as error:
            return f"{EXECUTION_ERROR}{error}"
        return self.call(func_name, args, kwargs)

    def call(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> str:
        """Run one already-parsed call, name(*args, **kwargs), on the public methods of this entry's API instances.
        Never raises: a blocked or unknown name, bad arguments or a failing method give an error string. Shared by
        `execute` (call strings) and the training environment (structured calls), so both observe the same text."""
        if name.split(".")[-1] in BLOCKED_FUNCTIONS:
            return _blocked(name.split(".")[-1])
        method = self._methods.get(name)
        if method is None:
            return f"{EXECUTION_ERROR}name '{name}' is not defined"
        try:
            return _result_text(method(*args, **kwargs))
        except Exception as error:  # noqa: BLE001 - a failing call is an observation, not a crash
            return f"{EXECUTION_ERROR}{error}"

    def public_state(self) -> dict[str, dict[str, Any]]:
        return {name: {k: v for k, v in vars(inst).items() if not k.startswith("_")}
                for name, inst in self.instances.items()}


def _state_differences(model: ApiSession, truth: ApiSession) -> dict[str, list[str]]:
    differences = {}
    for class_name, truth_instance in truth.instances.items():
        model_instance = model.instances[class_name]
        changed = [attr for attr in vars(truth_instance) if not attr.startswith("_")
                   and getattr(model_instance, attr, object()) != getattr(truth_instance, attr)]
        if changed:
            differences[class_name] = changed
    return differences


def _missing_results(expected: list[str], produced: list[str]) -> list[str]:
    pool = list(produced)
    missing = []
    for result in expected:
        if result in pool:
            pool.remove(result)
        else:
            missing.append(result)
    return missing


def check_multi_turn(item: BfclItem, model_turns: list[list[list[str]]]) -> CheckResult:
    """Score one entry. ``model_turns[t]`` lists, per step that decoded to calls, that step's call strings."""
    truth_turns: list[list[str]] = item.answer
    if len(model_turns) != len(truth_turns):
        return CheckResult(False, f"{len(model_turns)} turns for {len(truth_turns)} expected "
                                  f"(forced to quit)", "force_terminated")
    model, truth = ApiSession(item), ApiSession(item)
    all_model_results: list[str] = []
    for turn, truth_calls in enumerate(truth_turns):
        steps = [step for step in model_turns[turn] if step]
        for step in steps:
            all_model_results.extend(model.execute(step))
        truth_results = truth.execute(truth_calls)
        if not truth_calls:
            continue  # a turn the model cannot complete (missing function / parameter); not scored
        result = check_turn(turn, bool(steps), model, truth, truth_results, all_model_results)
        if not result.valid:
            return result
    return CheckResult(True)


def check_turn(turn: int, made_calls: bool, model: ApiSession, truth: ApiSession, truth_results: list[str],
               model_results: list[str]) -> CheckResult:
    """The official checks at the end of a turn that has ground truth, once both sessions have run it: the model
    made a call in the turn, the API states are equal, and the turn's ground-truth results all appear (as a
    multiset) among ``model_results``, the model's results of all turns so far. Shared with the training
    environment (toolrl_jax.environments.bfcl)."""
    if not made_calls:
        return CheckResult(False, f"no function call in turn {turn}", "empty_turn")
    differences = _state_differences(model, truth)
    if differences:
        return CheckResult(False, f"API state differs after turn {turn}: {differences}", "state_mismatch")
    missing = _missing_results(truth_results, model_results)
    if missing:
        return CheckResult(False, f"execution results missing after turn {turn}: {missing}", "response_mismatch")
    return CheckResult(True)


@dataclasses.dataclass
class Conversation:
    """The inference-time state of one multi-turn entry (ToolRL prompting, official step limits)."""

    item: BfclItem
    session: ApiSession
    messages: list[dict] = dataclasses.field(default_factory=list)
    turn: int = -1
    steps_in_turn: int = 0
    raw_turns: list[list[str]] = dataclasses.field(default_factory=list)
    call_turns: list[list[list[str]]] = dataclasses.field(default_factory=list)
    force_quit: bool = False
    finished: bool = False
    truncated_steps: int = 0  # steps whose prompt did not fit the context (see generator.GenerationLimits)

    @classmethod
    def start(cls, item: BfclItem, missed_function_message: str) -> "Conversation":
        conversation = cls(item=item, session=ApiSession(item))
        conversation._next_turn(missed_function_message)
        return conversation

    def _next_turn(self, missed_function_message: str) -> None:
        self.turn += 1
        self.steps_in_turn = 0
        if self.turn >= len(self.item.turns):
            self.finished = True
            return
        messages = list(self.item.turns[self.turn])
        if self.turn in self.item.missed_functions:
            text = missed_function_message.replace("{functions}", str(self.item.missed_functions[self.turn]))
            messages = [{"role": "user", "content": text}]
        self.messages.extend(messages)
        self.raw_turns.append([])
        self.call_turns.append([])

    def record_step(self, text: str, calls: list[str], missed_function_message: str,
                    max_steps: int = MAX_STEPS_PER_TURN) -> None:
        """Add the model's step; run its calls, or move to the next turn when it made none."""
        self.messages.append({"role": "assistant", "content": text})
        self.raw_turns[-1].append(text)
        self.call_turns[-1].append(list(calls))
        if not calls:
            self._next_turn(missed_function_message)
            return
        for call, result in zip(calls, self.session.execute(calls)):
            self.messages.append({"role": "tool", "name": call, "content": result})
        self.steps_in_turn += 1
        if self.steps_in_turn > max_steps:
            self.force_quit = True
            self.finished = True
