"""Host-side environments for multi-turn RL with tools executed in the loop (pure Python, no JAX).

protocol.py: the data exchanged (ToolCall, ToolResult, Reset, Step, Outcome) and the `Environment` interface;
schema.py: argument checks against JSON-schema tool specs; execution.py: running declared tools with timeouts and
budgets (`ToolEnvironment`), and stepping many trajectories in parallel (`execute_batch`); calls.py: reading tool
calls out of model text (ToolRL and Hermes formats) and writing results back; synthetic.py: a built-in executable
environment and its task generator; tasks.py: task files (JSONL).

`make_environment(name, **kwargs)` builds a fresh environment for one trajectory. The name "none" selects the
single-turn task, which has no environment: callers handle it before asking for one.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from toolrl_jax.environments.bfcl import BfclEnvironment
from toolrl_jax.environments.calls import (
    TurnParse,
    format_calls,
    parse_error_result,
    parse_hermes,
    parse_toolrl,
    parse_turn,
    render_observation,
    tool_messages,
)
from toolrl_jax.environments.execution import (
    Tool,
    ToolEnvironment,
    ToolError,
    call_with_timeout,
    execute_batch,
    step_parsed,
)
from toolrl_jax.environments.protocol import Environment, Outcome, Reset, Step, ToolCall, ToolResult
from toolrl_jax.environments.schema import SpecError, check_spec, validate_arguments
from toolrl_jax.environments.synthetic import SyntheticEnvironment, make_tasks
from toolrl_jax.environments.tasks import read_tasks, write_tasks

NO_ENVIRONMENT = "none"
ENVIRONMENTS: dict[str, Callable[..., Environment]] = {"synthetic": SyntheticEnvironment, "bfcl": BfclEnvironment}
ENVIRONMENT_NAMES = (NO_ENVIRONMENT, *ENVIRONMENTS)  # e.g. for a command-line choice


def make_environment(name: str, **kwargs: Any) -> Environment:
    """A new environment `name` (one per trajectory), built with `kwargs`. Raises ValueError for "none" (the
    single-turn task has no environment) and for an unknown name, listing the known ones."""
    if name == NO_ENVIRONMENT:
        raise ValueError(f"environment {NO_ENVIRONMENT!r} means the single-turn task, which has no environment "
                         f"object; known environments: {sorted(ENVIRONMENTS)}")
    factory = ENVIRONMENTS.get(name)
    if factory is None:
        raise ValueError(f"unknown environment {name!r}; known environments: {sorted(ENVIRONMENTS)} "
                         f"(or {NO_ENVIRONMENT!r} for the single-turn task)")
    return factory(**kwargs)


__all__ = [
    "ENVIRONMENTS", "ENVIRONMENT_NAMES", "NO_ENVIRONMENT", "Environment", "Outcome", "Reset", "SpecError", "Step",
    "SyntheticEnvironment", "Tool", "ToolCall", "ToolEnvironment", "ToolError", "ToolResult", "TurnParse",
    "call_with_timeout", "check_spec", "execute_batch", "format_calls", "make_environment", "make_tasks",
    "parse_error_result", "parse_hermes", "parse_toolrl", "parse_turn", "read_tasks", "render_observation",
    "step_parsed", "tool_messages", "validate_arguments", "write_tasks",
]
