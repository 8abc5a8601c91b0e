"""Parse ToolRL-format assistant turns into tool calls (never raises on model output).

A ToolRL turn looks like ``<think>..</think>\n<tool_call>\n{"name": .., "parameters": {..}}\n..</tool_call>``.
The evaluation protocol the paper used reads the *last* ``<tool_call>`` block, one JSON object per line,
silently drops lines that are not valid calls, and drops calls to a tool named "None" (the prompt tells
the model to call "None" when nothing fits). This is deliberately more lenient than the training reward's
parser (``toolrl_jax.rewards.parsing``: first block, any bad line voids the turn): each follows its own protocol.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One parsed call: the tool name and its parameter dict (JSON values)."""

    name: str
    parameters: dict[str, Any]

    def to_bfcl(self) -> dict[str, dict[str, Any]]:
        """BFCL's decoded-call form: ``{name: {param: value}}``."""
        return {self.name: dict(self.parameters)}

    def to_python(self) -> str:
        """Python call syntax ``name(k=v, ...)`` with ``repr`` values (BFCL's executable form)."""
        args = ", ".join(f"{key}={value!r}" for key, value in self.parameters.items())
        return f"{self.name}({args})"


@dataclasses.dataclass(frozen=True)
class ParsedTurn:
    """Everything the scorers need from one assistant turn."""

    calls: tuple[ToolCall, ...]
    has_tool_call_tag: bool
    malformed_lines: int  # non-empty lines in the block that were not a valid call
    none_calls: int  # calls to the "None" tool (meaning: no tool fits)
    response: str | None  # text inside the last <response>..</response>, if any


_RESPONSE_RE = re.compile(r"<response>(.*?)(?:</response>|$)", re.DOTALL)
_BLOCK_TAGS_RE = re.compile(r"<(think|tool_call|response)>.*?(?:</\1>|$)", re.DOTALL)


def is_none_tool(name: str) -> bool:
    """True for the placeholder tool "None" (any case, surrounding spaces ignored)."""
    return name.strip().lower() == "none"


def _call_from_json(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    name, params = obj.get("name"), obj.get("parameters")
    if not isinstance(name, str) or not isinstance(params, dict):
        return None
    return ToolCall(name=name, parameters=params)


def json_lines(block: str) -> list[Any]:
    """JSON values of the lines of ``block`` that parse (other lines are skipped)."""
    values = []
    for line in block.strip().split("\n"):
        line = line.strip()
        if not line:
            continue
        try:
            values.append(json.loads(line))
        except (json.JSONDecodeError, RecursionError):
            continue
    return values


def last_tool_call_block(text: str) -> str | None:
    """Content of the last ``<tool_call>`` block (up to ``</tool_call>`` or the end), or None."""
    if "<tool_call>" not in text:
        return None
    return text.split("<tool_call>")[-1].split("</tool_call>")[0]


def parse_turn(text: str) -> ParsedTurn:
    """Parse one assistant turn the way the ToolRL evaluation does."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    block = last_tool_call_block(text)
    calls: list[ToolCall] = []
    malformed = none_calls = 0
    if block is not None:
        lines = [line for line in block.strip().split("\n") if line.strip()]
        for line in lines:
            try:
                call = _call_from_json(json.loads(line))
            except (json.JSONDecodeError, RecursionError):
                call = None
            if call is None:
                malformed += 1
            elif is_none_tool(call.name):
                none_calls += 1
            else:
                calls.append(call)
    responses = _RESPONSE_RE.findall(text)
    return ParsedTurn(
        calls=tuple(calls),
        has_tool_call_tag=block is not None,
        malformed_lines=malformed,
        none_calls=none_calls,
        response=responses[-1].strip() if responses else None,
    )


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Valid, non-"None" calls of the last ``<tool_call>`` block of ``text``."""
    return list(parse_turn(text).calls)


def final_answer(text: str) -> str:
    """The user-facing answer of a turn: the last ``<response>`` body, else the text without tag blocks."""
    turn = parse_turn(text)
    if turn.response is not None:
        return turn.response
    return _BLOCK_TAGS_RE.sub(" ", text if isinstance(text, str) else "").strip()


def strict_correct(text: str, gold: tuple[dict, ...] | list[dict]) -> bool:
    """The valid, non-"None" calls of ``text``'s last block equal the gold ``{"name", "parameters"}`` calls exactly,
    as a multiset (no call predicted for an empty gold list)."""
    remaining = list(gold)
    for call in parse_tool_calls(text):
        wanted = {"name": call.name, "parameters": call.parameters}
        if wanted not in remaining:
            return False
        remaining.remove(wanted)
    return not remaining


def calls_to_python_list(calls: list[ToolCall] | tuple[ToolCall, ...]) -> str:
    """``[f(a=1), g(b='x')]``: the string BFCL's prompting handlers decode; ``[]`` for no call."""
    return "[" + ", ".join(call.to_python() for call in calls) + "]"
