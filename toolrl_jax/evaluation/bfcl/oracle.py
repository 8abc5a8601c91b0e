"""Turn BFCL possible answers into model outputs (the first acceptable value of every parameter).

Used to sanity-check the pipeline: an oracle's outputs must score 100% on every item whose answers can be
met under the official rules. Java / JavaScript values are written as strings in the language's syntax,
in the form BFCL's converter reads back.
"""
from __future__ import annotations

import json
from typing import Any

from toolrl_jax.evaluation.bfcl.ast_checker import language_of


def _first(options: list, required: bool = False) -> tuple[bool, Any]:
    """(present, value): the first option, where ``""`` means "leave the parameter out".

    A required parameter takes its first non-empty option instead (some answers list ``""`` first for a
    parameter the doc requires, which the checker would reject).
    """
    if required:
        options = [option for option in options if option != ""]
    if not options or options[0] == "":
        return False, None
    return True, options[0]


def _choose_dict(option: Any) -> Any:
    if not isinstance(option, dict):
        return option
    chosen = {}
    for key, choices in option.items():
        present, value = _first(choices if isinstance(choices, list) else [choices])
        if present:
            chosen[key] = value
    return chosen


def _choose(spec: dict, option: Any) -> Any:
    kind = spec.get("type")
    item_kind = (spec.get("items") or {}).get("type")
    if kind in ("dict", "HashMap") and isinstance(option, dict):
        return _choose_dict(option)
    if kind == "array" and item_kind == "dict" and isinstance(option, list):
        return [_choose_dict(element) for element in option]
    return option


def _java_scalar(value: Any, kind: str | None) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if kind == "long" and isinstance(value, int):
        return f"{value}L"
    if kind == "float" and isinstance(value, (int, float)):
        return f"{value}f"
    return str(value)


def _java(value: Any, kind: str, item_kind: str | None) -> str:
    if isinstance(value, str):
        return value
    if kind == "Array" and isinstance(value, list):
        return "new Object[]{" + ", ".join(_java_scalar(v, item_kind) for v in value) + "}"
    if kind == "ArrayList" and isinstance(value, list):
        quote = item_kind in ("String", "char")
        parts = [f'"{v}"' if quote else _java_scalar(v, item_kind) for v in value]
        return "new ArrayList<>(Arrays.asList(" + ", ".join(parts) + "))"
    if kind == "HashMap" and isinstance(value, dict):
        puts = " ".join(f'put("{k}", {json.dumps(v) if isinstance(v, str) else _java_scalar(v, None)});'
                        for k, v in value.items())
        return "new HashMap<String, Object>() {{ " + puts + " }}"
    return _java_scalar(value, kind)


def _js_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, list):
        return "[" + ", ".join(_js_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_js_literal(v)}" for k, v in value.items()) + "}"
    return str(value)


def _js(value: Any, kind: str, item_kind: str | None) -> str:
    if isinstance(value, str):
        return value
    if kind == "Bigint" and isinstance(value, int):
        return f"{value}n"
    if kind in ("array", "dict"):
        return _js_literal(value)
    return _js_literal(value) if isinstance(value, bool) else str(value)


def answer_to_call(category: str, functions: list[dict], answer: dict, name: str | None = None) -> dict:
    """One answer ``{name: {param: [options]}}`` -> a call ``{"name", "parameters"}`` in model form."""
    answer_name, params = next(iter(answer.items()))
    name = name or answer_name
    doc = next((f for f in functions if f["name"] == name), {"parameters": {"properties": {}}})
    properties = doc.get("parameters", {}).get("properties", {})
    required = doc.get("parameters", {}).get("required", [])
    language = language_of(category)
    arguments = {}
    for param, options in params.items():
        if param not in properties and "" in options:
            continue  # an answer key the doc does not declare: leaving it out is the only way to pass
        present, option = _first(options, required=param in required)
        if not present:
            continue
        spec = properties.get(param, {})
        value = _choose(spec, option)
        kind, item_kind = spec.get("type"), (spec.get("items") or {}).get("type")
        if language == "java":
            value = _java(value, kind, item_kind)
        elif language == "javascript":
            value = _js(value, kind, item_kind)
        arguments[param] = value
    return {"name": name, "parameters": arguments}


def oracle_output(category: str, functions: list[dict], answers: list[dict] | None) -> str:
    """A ToolRL-format assistant turn answering an AST / relevance item correctly."""
    if answers is None:  # relevance categories
        if "irrelevance" in category:
            return "<think> No tool fits. </think>\n<response> I cannot help with that. </response>"
        doc = functions[0]
        required = doc.get("parameters", {}).get("required", [])
        call = {"name": doc["name"], "parameters": {param: "x" for param in required}}
        return "<think> oracle </think>\n<tool_call>\n" + json.dumps(call) + "\n</tool_call>"
    # Single-function categories are checked against the doc, whatever the answer's key says.
    single = not any(key in category for key in ("multiple", "parallel"))
    calls = [answer_to_call(category, functions, answer, functions[0]["name"] if single else None)
             for answer in answers]
    return "<think> oracle </think>\n<tool_call>\n" + "\n".join(json.dumps(c) for c in calls) + "\n</tool_call>"


def oracle_multi_turn_steps(answer_turns: list[list[str]], functions: list[dict]) -> list[str]:
    """One ToolRL turn per ground-truth turn, its calls written as JSON (an empty turn gets a plain response).

    Positional arguments of ground-truth calls are named after the function doc's parameters, in order.
    """
    from toolrl_jax.evaluation.bfcl.multi_turn import parse_call

    docs = {doc["name"]: doc for doc in functions}
    outputs = []
    for calls in answer_turns:
        lines = []
        for call in calls:
            name, args, kwargs = parse_call(call)
            names = list(docs.get(name, {}).get("parameters", {}).get("properties", {}))
            if len(args) > len(names):
                raise ValueError(f"cannot name the positional arguments of {call!r}")
            lines.append(json.dumps({"name": name, "parameters": {**dict(zip(names, args)), **kwargs}}))
        if lines:
            outputs.append("<think> oracle </think>\n<tool_call>\n" + "\n".join(lines) + "\n</tool_call>")
        else:
            outputs.append("<think> oracle </think>\n<response> I cannot do that with these tools. </response>")
    return outputs
