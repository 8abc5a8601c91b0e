"""The environment protocol: what a multi-turn rollout exchanges with the tools it drives.

One `Environment` object serves one trajectory. The rollout calls `reset(example)` once for the opening chat
messages and tool specs, then `step(calls)` after every assistant turn that holds tool calls, and finally
`score(final_answer)` for the outcome. Everything crossing this boundary is plain data (frozen dataclasses of
str / JSON values), so rollouts can run on the host next to a JAX sampler and be logged as JSON.

The shape follows peers, re-designed rather than copied: veRL's multi-turn tools (`BaseTool` with create / execute /
calc_reward / release, OpenAI-style JSON-schema tool specs), TRL's environment mode of `GRPOTrainer` (a stateful
object per episode with reset and step) and OpenEnv/gym-style reset/step/done. Unlike veRL, one object owns all of a
trajectory's tools and its state, so the final-state check (`score`) sees everything the calls did.
"""
from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

CALL_FORMATS = ("toolrl", "hermes")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call the model asked for: a tool name and its arguments (JSON values, not yet validated)."""

    name: str
    arguments: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """{"name", "arguments"}: the JSON form used in task files (ground-truth call sequences)."""
        return {"name": self.name, "arguments": dict(self.arguments)}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> "ToolCall":
        """Inverse of `to_json` (task data, not model output: raises ValueError on a malformed call)."""
        if not isinstance(value, Mapping) or not isinstance(value.get("name"), str) \
                or not isinstance(value.get("arguments"), Mapping):
            raise ValueError(f'expected {{"name": str, "arguments": {{...}}}}, got {value!r:.200}')
        return cls(value["name"], dict(value["arguments"]))


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """What one call returned, as the text the model will read. error=True for every failure (unknown tool, bad
    arguments, an exception in the tool, a timeout, unparsable output): the content then says what went wrong."""

    name: str
    content: str
    error: bool = False


@dataclasses.dataclass(frozen=True)
class Reset:
    """The start of a trajectory.

    messages: the opening chat messages ({"role", "content"}), system prompt first.
    tools: JSON-schema specs of the tools ({"name", "description", "parameters": {"type": "object", "properties",
      "required"}}) as BFCL / ToolACE / OpenAI function calling write them. For call_format "hermes" they are meant
      for the chat template's `tools=`; for "toolrl" the system prompt already lists them.
    call_format: how the model is told to write calls ("toolrl" or "hermes"), so the rollout parses accordingly.
    """

    messages: list[dict[str, str]]
    tools: list[dict[str, Any]]
    call_format: str = "toolrl"


@dataclasses.dataclass(frozen=True)
class Step:
    """The outcome of one assistant turn's calls: one result per call, in call order. done: the environment ends
    the trajectory (e.g. its call budget is spent). reward: an optional per-step reward (None: none given)."""

    results: list[ToolResult]
    done: bool = False
    reward: float | None = None


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The verdict on a finished trajectory: success of the final-state / final-answer checks, a scalar reward,
    and JSON-serialisable details for logs (which check failed and why)."""

    success: bool
    reward: float
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


class Environment(abc.ABC):
    """A per-trajectory environment. Implementations must never raise on model output: every bad call becomes an
    error `ToolResult`, and only the environment's own declared functions ever run (model text is data, never
    code). `ToolEnvironment` (execution.py) implements `step` with those guarantees for a set of declared tools.

    multi_user_turns: the task has several user turns (BFCL multi-turn). An assistant turn without calls then ends
    the current user turn: the rollout calls `step([])`, and the Step's `user_messages` (a `bfcl.TurnStep` field)
    open the next one, or `done` ends the trajectory. False: an answer ends the trajectory.
    """

    multi_user_turns: bool = False

    @abc.abstractmethod
    def reset(self, example: Mapping[str, Any]) -> Reset:
        """Start the trajectory for `example` (a JSON-serialisable task dict); returns the opening messages."""

    @abc.abstractmethod
    def step(self, calls: Sequence[ToolCall]) -> Step:
        """Run one assistant turn's calls in order and return their results."""

    @abc.abstractmethod
    def score(self, final_answer: str | None) -> Outcome:
        """Check the final state (and the final answer text, None when the model gave none)."""

    def close(self) -> None:
        """Release resources when the trajectory is over (nothing by default; cf. veRL's `release`)."""
        return None
