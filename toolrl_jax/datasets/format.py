"""The ToolRL text format: system prompt with the tool list, dialogue history, and assistant turns.

Every string here reproduces the byte layout of the ToolRL data files (the `instruction` / `input` / `output`
fields of the RL parquet and of SFT400), so that examples built from raw sources are indistinguishable in format
from the published ones:

* system prompt = `SYSTEM_HEADER` + one block per tool joined by "\\n" + `SYSTEM_FOOTER`; a tool block is
  `N. Name: <name>\\nDescription: <description>\\nParameters: <json>`, where the JSON maps each parameter to exactly
  {"description", "type", "default"} (default "" when the source has none; other schema keys are dropped) and
  is written with `json.dumps` defaults (ASCII escapes, ", " / ": " separators).
* user message = `HISTORY_HEADER` + "\\n" + blocks joined by "\\n\\n"; a block is `<user> ... </user>`, an assistant
  turn, or an assistant tool-call turn followed by "\\n<obs> ... </obs>".
* assistant turn = `<think> ... </think>` then "\\n<tool_call>\\n" + one `{"name", "parameters"}` JSON per line +
  "\\n</tool_call>" and/or "\\n<response> ... </response>".
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

SYSTEM_HEADER = (
    "You are a helpful multi-turn dialogue assistant capable of leveraging tool calls to solve user tasks and "
    "provide structured chat responses.\n\n**Available Tools**\nIn your response, you can use the following tools:\n")
SYSTEM_FOOTER = (
    "\n\n**Steps for Each Turn**\n"
    "1. **Think:** Recall relevant context and analyze the current user goal.\n"
    "2. **Decide on Tool Usage:** If a tool is needed, specify the tool and its parameters.\n"
    "3. **Respond Appropriately:** If a response is needed, generate one while maintaining consistency across user "
    "queries.\n\n"
    "**Output Format**\n"
    "```plaintext\n"
    "<think> Your thoughts and reasoning </think>\n"
    "<tool_call>\n"
    '{"name": "Tool name", "parameters": {"Parameter name": "Parameter content", "... ...": "... ..."}}\n'
    '{"name": "... ...", "parameters": {"... ...": "... ...", "... ...": "... ..."}}\n'
    "...\n"
    "</tool_call>\n"
    "<response> AI's final response </response>\n"
    "```\n\n"
    "**Important Notes**\n"
    "1. You must always include the `<think>` field to outline your reasoning. Provide at least one of `<tool_call>` "
    "or `<response>`. Decide whether to use `<tool_call>` (possibly multiple times), `<response>`, or both.\n"
    "2. You can invoke multiple tool calls simultaneously in the `<tool_call>` fields. Each tool call should be a "
    "JSON object with a \"name\" field and an \"parameters\" field containing a dictionary of parameters. If no "
    "parameters are needed, leave the \"parameters\" field an empty dictionary.\n"
    "3. Refer to the previous dialogue records in the history, including the user's queries, previous "
    "`<tool_call>`, `<response>`, and any tool feedback noted as `<obs>` (if exists).")
HISTORY_HEADER = "**Dialogue Records History**"

# The placeholder thoughts of the RL ground truths (and of earlier assistant turns in the history).
THINK_CALL = "I should use the appropriate tool with proper parameters to respond to the user's need."
THINK_RESPOND = "I should directly respond to the user's need."

_PARAM_KEYS = ("description", "type", "default")


class FormatError(ValueError):
    """Raw data that cannot be put into the ToolRL format (names the offending field)."""


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """One tool as ToolRL shows it: name, description, and {param: {description, type, default}}."""
    name: str
    description: str
    parameters: Mapping[str, Mapping[str, Any]]

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any]) -> "ToolSpec":
        """From a raw tool dict: JSON-schema style (`parameters.properties`, as ToolACE) or flat xLAM/Hammer style
        (`parameters` maps each parameter to its {description, type, default?, required?})."""
        if not isinstance(raw, Mapping):
            raise FormatError(f"tool must be a dict, got {type(raw).__name__}")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise FormatError(f"tool has no string 'name': {raw!r:.200}")
        description = raw.get("description", "")
        if description is None:
            description = ""
        if not isinstance(description, str):
            raise FormatError(f"tool {name!r}: 'description' must be a string")
        params = raw.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise FormatError(f"tool {name!r}: 'parameters' must be a dict, got {type(params).__name__}")
        if isinstance(params.get("properties"), Mapping) and params.get("type") in ("object", "dict"):
            params = params["properties"]
        normalized: dict[str, dict[str, Any]] = {}
        for key, spec in params.items():
            if not isinstance(spec, Mapping):
                raise FormatError(f"tool {name!r}: parameter {key!r} must be a dict, got {type(spec).__name__}")
            normalized[str(key)] = {k: spec.get(k, "") for k in _PARAM_KEYS}
        return cls(name=name, description=description, parameters=normalized)

    def render(self, number: int) -> str:
        """The numbered block of the system prompt."""
        return (f"{number}. Name: {self.name}\nDescription: {self.description}\n"
                f"Parameters: {json.dumps(dict(self.parameters))}")


def render_tools(tools: Sequence[ToolSpec]) -> str:
    """The tool blocks, numbered from 1, joined by newlines."""
    return "\n".join(tool.render(i + 1) for i, tool in enumerate(tools))


def render_system_prompt(tools: Sequence[ToolSpec], header: str = SYSTEM_HEADER, footer: str = SYSTEM_FOOTER) -> str:
    """The full ToolRL system prompt (or a variant with another header/footer around the same tool blocks)."""
    return header + render_tools(tools) + footer


_BLOCK_START = re.compile(r"(?m)^(\d+)\. Name: ")


def parse_tool_blocks(system_prompt: str, header: str = SYSTEM_HEADER, footer: str = SYSTEM_FOOTER) -> list[ToolSpec]:
    """Inverse of `render_system_prompt`: the tools listed in a ToolRL system prompt (raises FormatError)."""
    if not system_prompt.startswith(header):
        raise FormatError("system prompt does not start with the ToolRL header")
    end = system_prompt.rfind(footer)
    if end < len(header):
        raise FormatError("system prompt does not contain the ToolRL footer")
    body = system_prompt[len(header):end]
    tools = []
    decoder = json.JSONDecoder()
    pos = 0
    while pos < len(body):
        match = _BLOCK_START.match(body, pos)
        if match is None or int(match.group(1)) != len(tools) + 1:
            raise FormatError(f"expected tool block {len(tools) + 1} at offset {pos}")
        name_end = body.index("\nDescription: ", match.end())
        desc_end = body.index("\nParameters: ", name_end)
        params, params_end = decoder.raw_decode(body, desc_end + len("\nParameters: "))
        tools.append(ToolSpec(name=body[match.end():name_end],
                              description=body[name_end + len("\nDescription: "):desc_end], parameters=params))
        if params_end == len(body):
            break
        if body[params_end] != "\n":
            raise FormatError(f"unexpected text after tool block {len(tools)}")
        pos = params_end + 1
    return tools


# ----------------------------------------------------------------------------------------------------------------
# Assistant turns and history.
# ----------------------------------------------------------------------------------------------------------------

def format_call(name: str, parameters: Mapping[str, Any]) -> str:
    """One tool-call line: {"name": ..., "parameters": {...}} (key order kept)."""
    return json.dumps({"name": name, "parameters": dict(parameters)})


def format_assistant_turn(calls: Sequence[tuple[str, Mapping[str, Any]]] = (), response: str | None = None,
                          think: str | None = None) -> str:
    """An assistant turn in ToolRL layout. `think` defaults to the placeholder thought matching the turn."""
    if not calls and response is None:
        raise FormatError("an assistant turn needs tool calls, a response, or both")
    if think is None:
        think = THINK_CALL if calls else THINK_RESPOND
    parts = [f"<think> {think} </think>"]
    if calls:
        parts.append("<tool_call>\n" + "\n".join(format_call(n, p) for n, p in calls) + "\n</tool_call>")
    if response is not None:
        parts.append(f"<response> {response} </response>")
    return "\n".join(parts)


def format_user(text: str) -> str:
    return f"<user> {text} </user>"


def format_obs(text: str) -> str:
    return f"<obs> {text} </obs>"


def render_history(blocks: Sequence[str]) -> str:
    """The user message: the history header, then the dialogue blocks separated by blank lines."""
    return HISTORY_HEADER + "\n" + "\n\n".join(blocks)


def prompt_messages(system: str, history_blocks: Sequence[str]) -> list[dict[str, str]]:
    """The two-message prompt of a ToolRL example."""
    return [{"role": "system", "content": system}, {"role": "user", "content": render_history(history_blocks)}]

