"""Running declared tools safely: argument checks, per-call timeouts, budgets, and parallel stepping of many
trajectories on the host.

Guarantees of `ToolEnvironment.step` (what the rollout relies on):

* only functions the environment declared (`tools()`) ever run; a call is looked up by name in that table and its
  arguments are JSON values passed as keywords. Model text is never evaluated (no eval/exec/import).
* it never raises on model output: an unknown name, arguments that fail the tool's JSON schema (schema.py), an
  exception inside the tool, or a timeout each become an error `ToolResult` whose content says what went wrong.
* each call runs in a fresh daemon thread and is waited for at most `timeout_s` seconds. Python cannot kill a
  thread, so a timed-out tool keeps running in the background (and may still change the environment's state).
  A fresh thread per call means a runaway can never hold up later calls (a shared worker pool would queue them
  behind it), and a daemon thread never blocks interpreter exit (`concurrent.futures` workers are joined at exit).
  After `max_timeouts` timed-out calls the environment stops running calls and reports done, so one trajectory
  leaks at most that many threads.

Peers: veRL's multi-turn rollout runs each tool's `execute` concurrently per request with its own timeout, and
TRL's tool calling turns tool exceptions into messages for the model; this module does both for plain functions.
"""
from __future__ import annotations

import abc
import dataclasses
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from toolrl_jax.environments.calls import TurnParse, parse_error_result
from toolrl_jax.environments.protocol import Environment, Step, ToolCall, ToolResult
from toolrl_jax.environments.schema import check_spec, validate_arguments


class ToolError(Exception):
    """Raised by a tool for an expected failure (file not found, ticket already closed): the model reads
    "Error: <message>" without the exception type."""


@dataclasses.dataclass(frozen=True)
class Tool:
    """A declared tool: its JSON-schema spec (what the model is shown and what arguments are checked against) and
    the Python function that runs it, called as fn(**arguments)."""

    spec: Mapping[str, Any]
    fn: Callable[..., Any]

    def __post_init__(self) -> None:
        check_spec(self.spec)

    @property
    def name(self) -> str:
        return self.spec["name"]


@dataclasses.dataclass(frozen=True)
class CallOutcome:
    """What running a function produced: its value, or the exception it raised, or neither when it timed out."""

    value: Any = None
    exception: BaseException | None = None
    timed_out: bool = False


def call_with_timeout(fn: Callable[..., Any], kwargs: Mapping[str, Any], timeout_s: float | None) -> CallOutcome:
    """fn(**kwargs) in a fresh daemon thread, waited for at most timeout_s seconds (None: run inline, no limit).

    Never raises what fn raises. A timed-out fn keeps running in its thread (threads cannot be killed).
    """
    if timeout_s is None:
        try:
            return CallOutcome(value=fn(**kwargs))
        except Exception as error:  # noqa: BLE001 - any tool failure becomes a result
            return CallOutcome(exception=error)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(**kwargs)
        except BaseException as error:  # noqa: BLE001 - includes SystemExit from a tool; this thread is the tool's
            box["exception"] = error

    thread = threading.Thread(target=target, name=f"tool-{getattr(fn, '__name__', 'call')}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return CallOutcome(timed_out=True)
    if "exception" in box:
        return CallOutcome(exception=box["exception"])
    return CallOutcome(value=box.get("value"))


def result_text(value: Any, max_chars: int) -> str:
    """A tool's return value as the text the model reads: strings as they are, anything else as JSON; cut to
    max_chars so one call cannot flood the context."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > max_chars:
        text = text[:max_chars] + f"... [truncated {len(text) - max_chars} characters]"
    return text


def check_limits(timeout_s: float | None, **counts: int) -> None:
    """ValueError unless timeout_s is positive or None and every count a positive int (not a bool)."""
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive or None, got {timeout_s!r}")
    for label, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")


class ToolEnvironment(Environment):
    """An environment whose `step` runs its declared tools with the guarantees in this module's docstring.

    Subclasses implement `tools()` (the only callable surface; usually bound methods on the trajectory's state),
    `reset` and `score`. Calls of one turn run one after another in the given order, since later calls may read
    what earlier ones wrote; parallelism is across trajectories (`execute_batch`).

    timeout_s: per-call limit in seconds (None: run inline without a limit, for trusted fast tools).
    max_calls_per_step: calls beyond this in one turn are not run (each gets an error result).
    max_calls: calls per trajectory; once spent, further calls are not run and the step reports done.
    max_timeouts: after this many timed-out calls the environment stops (done) to bound leaked threads.
    max_result_chars: longer results are truncated.
    """

    def __init__(self, *, timeout_s: float | None = 5.0, max_calls_per_step: int = 8, max_calls: int = 32,
                 max_timeouts: int = 2, max_result_chars: int = 2000) -> None:
        check_limits(timeout_s, max_calls_per_step=max_calls_per_step, max_calls=max_calls,
                     max_timeouts=max_timeouts, max_result_chars=max_result_chars)
        self.timeout_s = timeout_s
        self.max_calls_per_step = max_calls_per_step
        self.max_calls = max_calls
        self.max_timeouts = max_timeouts
        self.max_result_chars = max_result_chars
        self.calls_made = 0
        self.timeouts = 0
        self.stop_reason: str | None = None

    @abc.abstractmethod
    def tools(self) -> Mapping[str, Tool]:
        """The declared tools by name: the only functions `step` may run."""

    def _error(self, name: str, message: str) -> ToolResult:
        return ToolResult(name=name, content=result_text(f"Error: {message}", self.max_result_chars), error=True)

    def call(self, call: ToolCall) -> ToolResult:
        """Run one call: look up, validate, execute with the timeout. Never raises on the call's content."""
        name = call.name if isinstance(call.name, str) else repr(call.name)
        tools = self.tools()
        tool = tools.get(name)
        if tool is None:
            available = ", ".join(sorted(tools)) or "none"
            return self._error(name, f"unknown tool {name!r}; available tools: {available}")
        arguments, problem = validate_arguments(tool.spec, call.arguments)
        if problem is not None:
            return self._error(name, f"invalid arguments for {name}: {problem}")
        outcome = call_with_timeout(tool.fn, arguments, self.timeout_s)
        if outcome.timed_out:
            self.timeouts += 1
            if self.timeouts >= self.max_timeouts:
                self.stop_reason = f"the environment stopped after {self.timeouts} timed-out tool calls"
            return self._error(name, f"{name} timed out after {self.timeout_s:g} s")
        if isinstance(outcome.exception, ToolError):
            return self._error(name, str(outcome.exception))
        if outcome.exception is not None:
            error = outcome.exception
            return self._error(name, f"{name} failed: {type(error).__name__}: {error}")
        try:
            content = result_text(outcome.value, self.max_result_chars)
        except Exception as error:  # noqa: BLE001 - e.g. a circular structure that JSON cannot write
            return self._error(name, f"{name} returned an unprintable value: {type(error).__name__}")
        return ToolResult(name=name, content=content, error=False)

    def step(self, calls: Sequence[ToolCall]) -> Step:
        """Run a turn's calls in order, within the per-turn and per-trajectory budgets."""
        results = []
        for i, call in enumerate(calls):
            name = call.name if isinstance(call.name, str) else repr(call.name)
            if self.stop_reason is None and self.calls_made >= self.max_calls:
                self.stop_reason = f"the budget of {self.max_calls} tool calls for this task is spent"
            if self.stop_reason is not None:
                results.append(self._error(name, f"not run: {self.stop_reason}"))
            elif i >= self.max_calls_per_step:
                results.append(self._error(name, f"not run: at most {self.max_calls_per_step} tool calls per turn"))
            else:
                self.calls_made += 1
                results.append(self.call(call))
        return Step(results=results, done=self.stop_reason is not None, reward=None)


def step_parsed(env: Environment, parsed: TurnParse) -> Step:
    """Step `env` with a parsed assistant turn: malformed tool-call text becomes one error result telling the model
    what was wrong (nothing runs); otherwise the parsed calls run."""
    if parsed.error is not None:
        return Step(results=[parse_error_result(parsed.error)], done=False, reward=None)
    return env.step(list(parsed.calls))


def execute_batch(envs: Sequence[Environment], calls_per_env: Sequence[Sequence[ToolCall]],
                  max_workers: int = 8) -> list[Step]:
    """Step many trajectories' environments in parallel host threads; the i-th Step belongs to envs[i].

    Deterministic: each environment only touches its own state and runs its own calls in order, so the results
    equal a serial loop's whatever the thread schedule. Each environment must appear once (two threads stepping one
    environment would race). Exceptions from an environment's own code (bugs, not tool failures) propagate.
    """
    if len(envs) != len(calls_per_env):
        raise ValueError(f"{len(envs)} environments but {len(calls_per_env)} call lists")
    if len({id(env) for env in envs}) != len(envs):
        raise ValueError("an environment appears more than once in the batch; use one environment per trajectory")
    if not isinstance(max_workers, int) or max_workers < 1:
        raise ValueError(f"max_workers must be a positive int, got {max_workers!r}")
    work = list(zip(envs, calls_per_env))
    if max_workers == 1 or len(work) <= 1:
        return [env.step(calls) for env, calls in work]
    with ThreadPoolExecutor(max_workers=min(max_workers, len(work)), thread_name_prefix="env-step") as pool:
        return list(pool.map(lambda pair: pair[0].step(pair[1]), work))
