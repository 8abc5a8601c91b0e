"""ToolRL prompt rendering (against the training data's own system prompts) and turn parsing."""
from __future__ import annotations

import json
import re

import pytest

from toolrl_jax.datasets import format as data_format
from toolrl_jax.evaluation import prompts
from toolrl_jax.evaluation.bfcl import data
from toolrl_jax.evaluation.parsing import calls_to_python_list, final_answer, parse_tool_calls, parse_turn

_TOOL_RE = re.compile(r"(\d+)\. Name: (.*?)\nDescription: (.*?)\nParameters: (.*?)(?=\n\d+\. Name: |$)", re.DOTALL)


def test_system_prompt_reproduces_the_sft_instructions_byte_for_byte(shared_dir):
    """Rebuild every SFT400 system prompt from its tools with the packaged template."""
    rows = json.loads((shared_dir / "data" / "toolrl" / "rlla_sft.json").read_text(encoding="utf-8"))
    template = prompts.PromptSet.load().system
    head, tail = template.split(prompts.TOOLS_PLACEHOLDER)
    for row in rows:
        instruction = row["instruction"]
        assert instruction.startswith(head) and instruction.endswith(tail)
        block = instruction[len(head):len(instruction) - len(tail)]
        functions = [{"name": name, "description": description, "parameters": {"properties": json.loads(params)}}
                     for _, name, description, params in _TOOL_RE.findall(block)]
        assert functions
        assert prompts.system_prompt(template, functions) == instruction
    # The training data builder writes the same prompt from its own constants.
    assert template == data_format.SYSTEM_HEADER + prompts.TOOLS_PLACEHOLDER + data_format.SYSTEM_FOOTER


def test_render_history_flattens_dialogue_like_toolrl():
    style = prompts.DialogueStyle(user_suffix="SUFFIX", after_observation="NEXT")
    messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": " list files "},
                {"role": "assistant", "content": "<think>x</think>\n<tool_call>\n{}\n</tool_call>"},
                {"role": "tool", "name": "ls(a=True)", "content": "{'files': []}"}]
    text = prompts.render_history(messages, style)
    assert text == ("**Dialogue Records History**\n<user> list files\nSUFFIX </user>\n\n"
                    "<think>x</think>\n<tool_call>\n{}\n</tool_call>\n"
                    "<obs> You have made the tool call ls(a=True). Execution returns: {'files': []} </obs>\n\n"
                    "<user> NEXT </user>")
    # The closing note appears only while the history ends with tool output.
    messages.append({"role": "assistant", "content": "<response>done</response>"})
    assert "NEXT" not in prompts.render_history(messages, style)


def test_custom_system_template_needs_the_placeholder(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("Tools:\n{tools}\nBe brief.\n")
    bad.write_text("no placeholder")
    prompt_set = prompts.PromptSet.load(good)
    doc = {"name": "f", "description": "d", "parameters": {"type": "dict", "properties": {"x": {"type": "integer"}}}}
    assert prompts.system_prompt(prompt_set.system, [doc]) == \
        'Tools:\n1. Name: f\nDescription: d\nParameters: {"x": {"type": "integer"}}\nBe brief.'
    with pytest.raises(ValueError, match="placeholder"):
        prompts.PromptSet.load(bad)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prompts.PromptSet.load(tmp_path / "missing.txt")


def test_language_hints_turn_java_types_into_strings():
    doc = {"name": "A.b", "description": "Does b.", "parameters": {"type": "dict", "properties": {
        "n": {"type": "long", "description": "N."},
        "xs": {"type": "ArrayList", "items": {"type": "String"}, "description": "Xs."},
        "o": {"type": "any", "description": "O."}}, "required": ["n"]}}
    shown = data.prompt_functions([doc], "java")[0]
    props = shown["parameters"]["properties"]
    assert shown["description"].endswith("Java 8 SDK syntax.")
    assert {spec["type"] for spec in props.values()} == {"string"}
    assert "This is Java long type parameter in string representation." in props["n"]["description"]
    assert "items" not in props["xs"] and "elements are of type String" in props["xs"]["description"]
    assert "any type of Java object" in props["o"]["description"]
    assert doc["parameters"]["properties"]["n"]["type"] == "long"  # the checker's copy is untouched
    python = data.prompt_functions([doc], "live_simple")[0]
    assert python["description"].endswith("Python 3 syntax.") and python["parameters"] == doc["parameters"]


def test_parse_turn_reads_the_last_block_and_skips_bad_lines():
    text = ('<think>first try</think>\n<tool_call>\n{"name": "old", "parameters": {}}\n</tool_call>\n'
            '<tool_call>\n{"name": "f", "parameters": {"a": 1}}\nnot json\n{"name": "g"}\n'
            '{"name": "None", "parameters": {}}\n{"name": "h", "parameters": {"b": [1, "x"]}}\n</tool_call>\n'
            '<response> ok </response>')
    turn = parse_turn(text)
    assert [(c.name, c.parameters) for c in turn.calls] == [("f", {"a": 1}), ("h", {"b": [1, "x"]})]
    assert turn.malformed_lines == 2 and turn.none_calls == 1 and turn.response == "ok"
    assert calls_to_python_list(turn.calls) == "[f(a=1), h(b=[1, 'x'])]"
    assert parse_tool_calls("no tags at all") == []
    assert parse_tool_calls('<tool_call>\n{"name": "f", "parameters": {}}') != []  # unterminated block still read
    assert final_answer("<think>hmm</think> Paris") == "Paris"
    assert final_answer("<think>hmm</think><response> Paris </response>") == "Paris"
