"""The text side of tool use: read tool calls and a final answer out of an assistant turn, and write tool results
back as text. Parsing never raises on model output: malformed text gives a `TurnParse` with `error` set, which the
environment turns into an error message for the model (execution.step_parsed).

Two call formats:

* "toolrl": ToolRL's layout, `<think> .. </think>` then one `<tool_call>` block holding one JSON object per line,
  `{"name": .., "parameters": {..}}`, and/or `<response> .. </response>` (the final answer). The block is read with
  the training reward's own parser (toolrl_jax.rewards.parsing.parse_response), so the calls executed are exactly
  the calls the reward scores: one block, every line a JSON object, else the whole turn is malformed.
* "hermes": the Hermes / Qwen2.5 function-calling layout (as Qwen's chat template writes it and vLLM's hermes
  parser reads it): one or more `<tool_call>\\n{"name": .., "arguments": {..}}\\n</tool_call>` blocks, one call
  each; `arguments` may also be a JSON string holding the object (OpenAI's wire form). A turn without blocks is a
  final answer (its text, `<think>` blocks removed).

Both are all-or-nothing: if any call is malformed none is returned, so a turn never half-runs.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Any

from toolrl_jax.datasets.format import format_call, format_obs
from toolrl_jax.environments.protocol import ToolCall, ToolResult
from toolrl_jax.rewards.parsing import CALL_CLOSE, CALL_OPEN, parse_response

PARSE_FORMATS = ("toolrl", "hermes", "auto")
PARSE_ERROR_NAME = "tool_call"  # the `name` of the result that reports unparsable tool-call text

_RESPONSE_RE = re.compile(r"<response>(.*?)(?:</response>|$)", re.DOTALL)
_HERMES_BLOCK_RE = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)
_THINK_RE = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class TurnParse:
    """What an assistant turn asks for.

    calls: the tool calls, in the order written (empty when none, or when the turn is malformed).
    final_answer: the answer text (ToolRL: the last <response> body, even beside calls; Hermes: the text of a turn
      without tool calls), None when the turn has none.
    error: why the turn's tool-call text is malformed (None when it is fine).
    format: the format it was read as ("toolrl" or "hermes").
    """

    calls: tuple[ToolCall, ...]
    final_answer: str | None
    error: str | None
    format: str


def _short(value: Any, limit: int = 120) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _last_response(text: str) -> str | None:
    """The last <response> body (to the end of the text when unclosed, e.g. a truncated generation), stripped."""
    bodies = _RESPONSE_RE.findall(text)
    return bodies[-1].strip() if bodies else None


def parse_toolrl(text: str) -> TurnParse:
    """Parse a ToolRL-format turn. Never raises."""
    if not isinstance(text, str):
        return TurnParse((), None, f"expected text, got {type(text).__name__}", "toolrl")
    answer = _last_response(text)
    parsed = parse_response(text)
    opens, closes = parsed.tag_counts[0], parsed.tag_counts[1]
    if opens == 0 and closes == 0:
        error = None if answer is not None else "no <tool_call> or <response> block"
        return TurnParse((), answer, error, "toolrl")
    if opens != 1 or closes != 1 or text.index(CALL_OPEN) > text.index(CALL_CLOSE):
        return TurnParse((), answer, f"expected one <tool_call> ... </tool_call> block with one JSON object per "
                                     f"line, found {opens} <tool_call> and {closes} </tool_call>", "toolrl")
    if parsed.calls is None:
        return TurnParse((), answer, parsed.call_error, "toolrl")
    calls = []
    for i, value in enumerate(parsed.calls):
        if not (isinstance(value, dict) and isinstance(value.get("name"), str) and value["name"]
                and isinstance(value.get("parameters"), dict)):
            return TurnParse((), answer, f'tool_call line {i + 1}: expected {{"name": "...", "parameters": {{...}}}}'
                                         f", got {_short(value)}", "toolrl")
        calls.append(ToolCall(value["name"], value["parameters"]))
    return TurnParse(tuple(calls), answer, None, "toolrl")


def _hermes_call(i: int, block: str) -> tuple[ToolCall | None, str | None]:
    try:
        value = json.loads(block.strip())
    except Exception as error:  # noqa: BLE001 - JSONDecodeError, RecursionError, huge-int ValueError, ...
        return None, f"<tool_call> block {i}: not one JSON object ({type(error).__name__}: {str(error)[:120]})"
    if not (isinstance(value, dict) and isinstance(value.get("name"), str) and value["name"]):
        return None, f'<tool_call> block {i}: expected {{"name": "...", "arguments": {{...}}}}, got {_short(value)}'
    if "arguments" not in value:
        return None, f'<tool_call> block {i}: missing "arguments" (use {{}} for none)'
    arguments = value["arguments"]
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except Exception as error:  # noqa: BLE001
            return None, f"<tool_call> block {i}: \"arguments\" is a string but not JSON ({type(error).__name__})"
    if not isinstance(arguments, dict):
        return None, f'<tool_call> block {i}: "arguments" must be a JSON object, got {_short(arguments)}'
    return ToolCall(value["name"], arguments), None


def parse_hermes(text: str) -> TurnParse:
    """Parse a Hermes / Qwen2.5-format turn. Never raises."""
    if not isinstance(text, str):
        return TurnParse((), None, f"expected text, got {type(text).__name__}", "hermes")
    opens, closes = text.count(CALL_OPEN), text.count(CALL_CLOSE)
    if opens == 0 and closes == 0:
        answer = _THINK_RE.sub("", text).strip()
        return TurnParse((), answer or None, None, "hermes")
    blocks = _HERMES_BLOCK_RE.findall(text)
    if opens != closes or len(blocks) != opens:
        return TurnParse((), None, f"unbalanced or nested tags: {opens} <tool_call> and {closes} </tool_call>; "
                                   f"write each call as <tool_call>{{...}}</tool_call>", "hermes")
    calls = []
    for i, block in enumerate(blocks, start=1):
        call, error = _hermes_call(i, block)
        if error is not None:
            return TurnParse((), None, error, "hermes")
        calls.append(call)
    return TurnParse(tuple(calls), None, None, "hermes")


def parse_turn(text: str, format: str = "auto") -> TurnParse:
    """Parse an assistant turn as `format`: "toolrl", "hermes", or "auto" (ToolRL if it parses cleanly, else
    Hermes if that does; when neither does, the error of the format the text looks like: Hermes when it mentions
    "arguments"). Never raises on `text`; raises ValueError for an unknown `format` (a caller bug)."""
    if format == "toolrl":
        return parse_toolrl(text)
    if format == "hermes":
        return parse_hermes(text)
    if format != "auto":
        raise ValueError(f"unknown tool-call format {format!r}; expected one of {PARSE_FORMATS}")
    toolrl = parse_toolrl(text)
    if toolrl.error is None:
        return toolrl
    hermes = parse_hermes(text)
    if hermes.error is None or (isinstance(text, str) and '"arguments"' in text):
        return hermes
    return toolrl


# ----------------------------------------------------------------------------------------------------------------
# Writing calls and results as text.
# ----------------------------------------------------------------------------------------------------------------

def format_calls(calls: Sequence[ToolCall], call_format: str) -> str:
    """The tool-call text of a turn: ToolRL's single block (one {"name", "parameters"} line per call) or one Hermes
    block per call. `parse_turn(format_calls(c, f), f).calls == tuple(c)`."""
    if call_format == "toolrl":
        return CALL_OPEN + "\n" + "\n".join(format_call(c.name, c.arguments) for c in calls) + "\n" + CALL_CLOSE
    if call_format == "hermes":
        return "\n".join(f'{CALL_OPEN}\n{json.dumps({"name": c.name, "arguments": dict(c.arguments)})}\n{CALL_CLOSE}'
                         for c in calls)
    raise ValueError(f"unknown tool-call format {call_format!r}; expected 'toolrl' or 'hermes'")


def parse_error_result(error: str) -> ToolResult:
    """The result that tells the model its tool-call text could not be read."""
    return ToolResult(name=PARSE_ERROR_NAME, content=f"Error: could not parse your tool calls: {error}", error=True)


def render_observation(results: Sequence[ToolResult]) -> str:
    """ToolRL's feedback block for one turn's results: `<obs> name: content ... </obs>`, one line per result."""
    return format_obs("\n".join(f"{result.name}: {result.content}" for result in results))


def tool_messages(results: Sequence[ToolResult]) -> list[dict[str, str]]:
    """Hermes / Qwen2.5 feedback: one {"role": "tool", "name", "content"} message per result, in call order."""
    return [{"role": "tool", "name": result.name, "content": result.content} for result in results]
