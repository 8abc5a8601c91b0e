"""Check a call's arguments against its tool's JSON-schema spec before anything runs.

Covers the subset of JSON Schema that tool specs use (BFCL, ToolACE, OpenAI function calling): an object with
`properties`, `required`, per-property `type` (a name or a list of names), `enum`, and `items.type` for arrays.
Extra arguments are refused (as `additionalProperties: false`), so a typo in a key is an error the model sees rather
than a silently ignored value. Type names also accept the Python spellings of ToolRL's data ("str", "int", "float",
"bool", "list", "dict"). As in JSON Schema (draft 6 on), an "integer" may be written 3.0; it is passed on as 3.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

_TYPE_ALIASES = {
    "string": "string", "str": "string",
    "integer": "integer", "int": "integer",
    "number": "number", "float": "number",
    "boolean": "boolean", "bool": "boolean",
    "array": "array", "list": "array", "tuple": "array",
    "object": "object", "dict": "object",
    "null": "null", "any": "any",
}


class SpecError(ValueError):
    """A tool spec (environment code, not model output) that is not a usable JSON-schema function spec."""


def check_spec(spec: Mapping[str, Any]) -> None:
    """Raise SpecError unless `spec` is {"name": str, "description"?, "parameters": {"type": "object",
    "properties": {...}, "required": [...]}} with known type names and `required` naming declared properties."""
    name = spec.get("name") if isinstance(spec, Mapping) else None
    if not isinstance(name, str) or not name:
        raise SpecError(f"tool spec needs a non-empty string 'name': {spec!r:.200}")
    params = spec.get("parameters")
    if not isinstance(params, Mapping) or params.get("type") != "object" \
            or not isinstance(params.get("properties"), Mapping):
        raise SpecError(f"tool {name!r}: 'parameters' must be {{'type': 'object', 'properties': {{...}}}}")
    properties = params["properties"]
    for key, prop in properties.items():
        if not isinstance(prop, Mapping):
            raise SpecError(f"tool {name!r}: property {key!r} must be a dict")
        for type_name in _type_names(prop):
            if type_name not in _TYPE_ALIASES:
                raise SpecError(f"tool {name!r}: property {key!r} has unknown type {type_name!r}")
    required = params.get("required", [])
    if not isinstance(required, list) or any(key not in properties for key in required):
        raise SpecError(f"tool {name!r}: 'required' must list declared properties, got {required!r}")


def _type_names(prop: Mapping[str, Any]) -> list[str]:
    declared = prop.get("type")
    if declared is None:
        return []
    return [declared] if isinstance(declared, str) else list(declared)


def _matches(value: Any, type_name: str) -> bool:
    kind = _TYPE_ALIASES[type_name]
    if kind == "any":
        return True
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or \
            (isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if kind == "number":
        return (isinstance(value, int) and not isinstance(value, bool)) or \
            (isinstance(value, float) and math.isfinite(value))
    if kind == "array":
        return isinstance(value, list)
    if kind == "object":
        return isinstance(value, dict)
    return value is None  # "null"


def _json_type(value: Any) -> str:
    """The JSON name of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number" if math.isfinite(value) else "non-finite number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_value(key: str, value: Any, prop: Mapping[str, Any]) -> tuple[Any, str | None]:
    """(value to pass on, None) or (None, error message) for one argument."""
    names = _type_names(prop)
    if names and not any(_matches(value, name) for name in names):
        wanted = " or ".join(_TYPE_ALIASES[name] for name in names)
        return None, f"argument {key!r} must be {wanted}, got {_json_type(value)} {_short(value)}"
    if "enum" in prop and value not in prop["enum"]:
        return None, f"argument {key!r} must be one of {list(prop['enum'])!r}, got {_short(value)}"
    item_names = _type_names(prop["items"]) if isinstance(prop.get("items"), Mapping) else []
    if item_names and isinstance(value, list):
        for i, item in enumerate(value):
            if not any(_matches(item, name) for name in item_names):
                wanted = " or ".join(_TYPE_ALIASES[name] for name in item_names)
                return None, f"argument {key!r}[{i}] must be {wanted}, got {_json_type(item)} {_short(item)}"
    if isinstance(value, float) and names and all(_TYPE_ALIASES[name] == "integer" for name in names):
        value = int(value)
    return value, None


def validate_arguments(spec: Mapping[str, Any], arguments: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(arguments to call the tool with, None), or (None, a message for the model naming every problem).

    Never raises on model-provided `arguments`; `spec` must have passed `check_spec`.
    """
    if not isinstance(arguments, Mapping):
        return None, f"arguments must be a JSON object, got {_json_type(arguments)}"
    params = spec["parameters"]
    properties = params["properties"]
    problems = []
    missing = [key for key in params.get("required", []) if key not in arguments]
    if missing:
        problems.append("missing required argument(s): " + ", ".join(repr(k) for k in missing))
    extra = [key for key in arguments if key not in properties]
    if extra:
        expected = ", ".join(repr(k) for k in properties) or "none"
        problems.append("unexpected argument(s): " + ", ".join(repr(str(k)) for k in extra) +
                        f" (expected: {expected})")
    clean: dict[str, Any] = {}
    for key, value in arguments.items():
        if key in properties:
            value, problem = _check_value(key, value, properties[key])
            if problem is None:
                clean[key] = value
            else:
                problems.append(problem)
    if problems:
        return None, "; ".join(problems)
    return clean, None
