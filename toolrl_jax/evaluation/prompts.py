"""ToolRL-format prompts: the system prompt with the rendered tool list, and the flattened dialogue.

ToolRL puts the whole dialogue history into ONE user message (``**Dialogue Records History**`` followed by
``<user>``, assistant turns and ``<obs>`` blocks) under a system prompt that lists the tools as
``N. Name: ..`` / ``Description: ..`` / ``Parameters: <json of the parameters' properties>``.
Template text lives in ``templates/`` (one trailing newline of a template file is ignored, except by
``exact_template``); the system template's literal ``{tools}`` is replaced by the tool list. At evaluation the system
prompt ends with a newline, as the originals' ``SYS`` strings do (ToolRL ``benchmarks/BFCL/rlla_qwen.py`` and
``benchmarks/Bamboogle/generate.py``: ``<|im_start|>system\n{SYS}<|im_end|>`` with SYS ending in "\n"); the
training data has none and is not changed.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from toolrl_jax.datasets.format import HISTORY_HEADER

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TOOLS_PLACEHOLDER = "{tools}"
EVAL_SYSTEM_END = "\n"  # the originals' evaluation system prompts end with a newline

Message = dict[str, Any]


def read_template(path: str | Path) -> str:
    """A template file's text without its final newline."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt template not found: {path}")
    text = path.read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text


def default_template(name: str) -> str:
    return read_template(TEMPLATE_DIR / name)


def exact_template(name: str) -> str:
    """A packaged template's exact text, final newline included (for texts that end with one, like JUDGE_SYS)."""
    return (TEMPLATE_DIR / name).read_text(encoding="utf-8")


def render_tool(index: int, function: dict) -> str:
    """``N. Name: ..\\nDescription: ..\\nParameters: {..}`` for one function doc."""
    parameters = function.get("parameters") or {}
    properties = parameters.get("properties", {}) if isinstance(parameters, dict) else {}
    return (f"{index}. Name: {function['name']}\nDescription: {function.get('description', '')}\n"
            f"Parameters: {json.dumps(properties)}")


def render_tools(functions: list[dict]) -> str:
    return "\n".join(render_tool(i, function) for i, function in enumerate(functions, start=1))


def system_prompt(template: str, functions: list[dict]) -> str:
    """The system prompt: ``template`` with its ``{tools}`` placeholder replaced by the tool list."""
    if TOOLS_PLACEHOLDER not in template:
        raise ValueError(f"system prompt template has no {TOOLS_PLACEHOLDER} placeholder")
    return template.replace(TOOLS_PLACEHOLDER, render_tools(functions))


@dataclasses.dataclass(frozen=True)
class DialogueStyle:
    """How user turns and tool results are written into the flattened history."""

    user_suffix: str = ""  # appended on a new line inside every <user> block
    after_observation: str = ""  # a closing <user> note when the history ends with tool results


def render_history(messages: list[Message], style: DialogueStyle) -> str:
    """Flatten chat messages (user / assistant / tool; system ignored) into ToolRL's user prompt.

    Tool messages carry ``name`` (the call as written, e.g. ``cd(folder='x')``) and ``content``.
    """
    text = HISTORY_HEADER + "\n"
    for position, message in enumerate(messages):
        role, content = message.get("role"), str(message.get("content", "")).strip()
        if role == "user":
            suffix = f"\n{style.user_suffix}" if style.user_suffix else ""
            text += f"<user> {content}{suffix} </user>\n"
        elif role == "assistant":
            text += f"\n{content}\n"
        elif role == "tool":
            text += (f"<obs> You have made the tool call {str(message.get('name', '')).strip()}. "
                     f"Execution returns: {content} </obs>\n")
            if position == len(messages) - 1 and style.after_observation:
                text += f"\n<user> {style.after_observation} </user>\n"
    return text.strip()


def chat(system: str, user: str) -> list[Message]:
    """The two-message conversation every ToolRL prompt is."""
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """All prompt text one evaluation run uses (defaults: the files in ``templates/``)."""

    system: str
    bfcl_single_turn: DialogueStyle
    bfcl_multi_turn: DialogueStyle
    bfcl_missed_function: str  # user turn that announces held-out functions; ``{functions}`` is filled in
    bamboogle: DialogueStyle
    bamboogle_tool: dict

    @classmethod
    def load(cls, system_template_path: str | Path | None = None) -> "PromptSet":
        """Default templates, with the system prompt taken from ``system_template_path`` if given."""
        system = read_template(system_template_path) if system_template_path else default_template("toolrl_system.txt")
        if TOOLS_PLACEHOLDER not in system:
            raise ValueError(f"system prompt template {system_template_path} has no {TOOLS_PLACEHOLDER} placeholder")
        after_observation = default_template("bfcl_after_observation.txt")
        return cls(
            system=system,
            bfcl_single_turn=DialogueStyle(default_template("bfcl_single_turn_suffix.txt")),
            bfcl_multi_turn=DialogueStyle(default_template("bfcl_multi_turn_suffix.txt"), after_observation),
            bfcl_missed_function=default_template("bfcl_missed_function.txt"),
            bamboogle=DialogueStyle(default_template("bamboogle_suffix.txt"),
                                    default_template("bamboogle_after_observation.txt")),
            bamboogle_tool=json.loads(default_template("bamboogle_search_tool.json")),
        )

    def system_prompt(self, functions: list[dict]) -> str:
        """The evaluation system prompt for ``functions``: the template with the tool list, then a newline."""
        return system_prompt(self.system, functions) + EVAL_SYSTEM_END
