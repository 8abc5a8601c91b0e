"""Java / JavaScript argument values for BFCL's AST checker.

In the Java and JavaScript categories the model passes every argument as a *string written in the
language's syntax* (``"42L"``, ``"new int[]{1, 2}"``, ``"{key: 'v'}"``). BFCL converts that string to a
Python value according to the declared parameter type and then runs the ordinary checks. A string that
does not look like the declared type is kept as a string (it may then still match a variable-name
answer). These functions reproduce BFCL v3's conversion rules, including their regex-level quirks
(e.g. elements of a ``new String[]{..}`` array keep their quotes, ``char`` values are never unquoted),
because scores must match the official checker.
"""
from __future__ import annotations

import re
from typing import Any

JAVA_TYPES: dict[str, type] = {
    "byte": int, "short": int, "integer": int, "long": int,
    "float": float, "double": float,
    "boolean": bool, "char": str, "String": str, "any": str,
    "Array": list, "ArrayList": list, "Queue": list, "Stack": list,
    "Set": set, "HashMap": dict, "Hashtable": dict,
}
JS_TYPES: dict[str, type] = {
    "String": str, "integer": int, "float": float, "Bigint": int,
    "Boolean": bool, "dict": dict, "array": list, "any": str,
}
# Declared types whose element type (``items.type``) is also converted.
JAVA_COLLECTION_TYPES = ("Array", "ArrayList")
JS_COLLECTION_TYPES = ("array",)


class UnsupportedTypeError(ValueError):
    """A declared type the official converter has no rule for (a data problem, not a model error)."""


def _matches(pattern: str, text: str) -> bool:
    return re.match(pattern, text) is not None


def _convert(convert, text: str) -> Any:
    """``convert(text)``, or ``text`` unchanged when it fails (e.g. a stray trailing newline)."""
    try:
        return convert(text)
    except ValueError:
        return text


_INT = r"^-?\d+$"
_JAVA_FLOAT = r"^-?\d+(\.\d+)?([eE][+-]?\d+)?[fF]$"
_JAVA_DOUBLE = r"^-?\d+(\.\d+)?([eE][+-]?\d+)?$"
_JAVA_LONG = r"^-?\d+[lL]$"
_JS_FLOAT = r"^-?\d+(\.\d+)?$"
_JS_BIGINT = r"^-?\d+n$"


def _number_or_text(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


# ----------------------------------------------------------------------------------------------- Java


def java_literal(text: str) -> Any:
    """A Java literal without a declared type (collection elements, map values)."""
    if text in ("true", "false"):
        return text == "true"
    if text.startswith('"') and text.endswith('"'):
        return text[1:-1]
    if _matches(_JAVA_LONG, text):
        return _convert(lambda t: int(t[:-1]), text)
    if _matches(_JAVA_FLOAT, text):
        return _convert(lambda t: float(re.sub(r"[fF]$", "", t)), text)
    return _number_or_text(text)


def _java_element(text: str, item_type: str | None, unquote_text: bool) -> Any:
    if unquote_text and item_type in ("char", "String"):
        return text[1:-1]
    return java_value(text, item_type) if item_type else java_literal(text)


def _java_array(text: str, item_type: str | None) -> Any:
    found = re.search(r"new\s+\w+\[\]\s*\{(.*?)\}", text)
    if not found:
        return text
    parts = [part.strip() for part in found.group(1).split(",")]
    return [_java_element(part, item_type, unquote_text=False) for part in parts if part]


def _java_arraylist(text: str, item_type: str | None) -> Any:
    found = re.search(r"new\s+ArrayList<\w*>\(Arrays\.asList\((.+?)\)\)", text)
    if found:
        parts = [part.strip() for part in found.group(1).split(",")]
        return [_java_element(part, item_type, unquote_text=True) for part in parts]
    found = re.search(r"new\s+ArrayList<\w*>\(\)\s*\{\{\s*(.+?)\s*\}\}", text, re.DOTALL)
    if found:
        parts = [part.strip() for part in re.findall(r"add\((.+?)\)", found.group(1))]
        return [_java_element(part, item_type, unquote_text=True) for part in parts]
    if re.search(r"new\s+ArrayList<\w*>\(\)", text):
        return []
    return text


def _java_hashmap(text: str) -> Any:
    found = re.search(r"new\s+HashMap<.*?>\s*\(\)\s*\{\s*\{?\s*(.*?)\s*\}?\s*\}", text, re.DOTALL)
    if found:
        body = found.group(1)
        if not body.strip():
            return {}
        return {key: java_literal(value.strip()) for key, value in re.findall(r"put\(\"(.*?)\",\s*(.*?)\)", body)}
    if re.search(r"new\s+HashMap<.*?>\s*\(\)", text):
        return {}
    return text


def java_value(text: str, java_type: str, item_type: str | None = None) -> Any:
    """Convert a Java-syntax string of declared type ``java_type`` (strings that don't fit stay strings)."""
    if java_type in ("byte", "short", "integer"):
        return int(text) if _matches(_INT, text) else text
    if java_type == "float":
        return _convert(lambda t: float(re.sub(r"[fF]$", "", t)), text) if _matches(_JAVA_FLOAT, text) else text
    if java_type == "double":
        return float(text) if _matches(_JAVA_DOUBLE, text) else text
    if java_type == "long":
        return _convert(lambda t: int(re.sub(r"[lL]$", "", t)), text) if _matches(_JAVA_LONG, text) else text
    if java_type == "boolean":
        return text == "true" if text in ("true", "false") else text
    if java_type in ("char", "String", "any"):
        return text
    if java_type == "Array":
        return _java_array(text, item_type)
    if java_type == "ArrayList":
        return _java_arraylist(text, item_type)
    if java_type == "HashMap":
        return _java_hashmap(text)
    raise UnsupportedTypeError(f"Java type {java_type!r} has no conversion rule")


# ----------------------------------------------------------------------------------------- JavaScript


def _quoted(text: str) -> bool:
    return (text.startswith('"') and text.endswith('"')) or (text.startswith("'") and text.endswith("'"))


def js_literal(text: str) -> Any:
    """A JavaScript literal without a declared type."""
    text = text.strip()
    if text in ("true", "false"):
        return text == "true"
    if _quoted(text):
        return text[1:-1]
    return _number_or_text(text)


_JS_2D_ARRAY = r"\[\s*\[.*?\]\s*(,\s*\[.*?\]\s*)*\]|\bnew\s+Array\(\s*\[.*?\]\s*(,\s*\[.*?\]\s*)*\)"
_JS_ARRAY = r"\[(.*?)\]|\bnew\s+Array\((.*?)\)"


def _js_array(code: str, item_type: str | None) -> Any:
    code = code.strip()
    try:
        nested = re.match(_JS_2D_ARRAY, code)
        if nested:
            rows = []
            for index, row in enumerate(re.findall(r"\[(.*?)\]", nested.group(0))):
                row = row.strip()
                if index == 0 and row.startswith("["):
                    row = row[1:]
                rows.append([js_literal(element) for element in row.split(",")])
            return rows
        flat = re.match(_JS_ARRAY, code)
        if not flat:
            return code
        body = flat.group(1) if flat.group(1) is not None else flat.group(2)
        body = (body or "").strip()
        elements = [element.strip() for element in body.split(",")] if body else []
        if not item_type:
            return [js_literal(element) for element in elements]
        # A quoted element of a collection item type is parsed as a collection of strings.
        return [
            js_value(element, item_type, "String" if element[:1] in ("'", '"') else None)
            for element in elements
        ]
    except Exception:  # noqa: BLE001 - the official converter falls back to the raw string on any error
        return code


def _js_object(code: str) -> Any:
    code = code.strip()
    if code == "{}":
        return {}
    found = re.match(r"\{(.*?)\}", code)
    if not found:
        return code
    try:
        result: dict[str, Any] = {}
        for key, value in re.findall(r"([^:]+):\s*(.*?)(?:,\s*(?=[^,]+:)|$)", found.group(1)):
            key, value = key.strip().strip("'\""), value.strip()
            if value.startswith("[") and value.endswith("]"):
                result[key] = _js_array(value, None)
            elif value.startswith("{") and value.endswith("}"):
                result[key] = _js_object(value)
            else:
                result[key] = js_literal(value.strip("'\""))
        return result
    except Exception:  # noqa: BLE001 - see _js_array
        return code


def js_value(text: str, js_type: str, item_type: str | None = None) -> Any:
    """Convert a JavaScript-syntax string of declared type ``js_type`` (misfits stay strings)."""
    if js_type == "String":
        return text[1:-1] if _quoted(text) else text
    if js_type == "integer":
        return int(text) if _matches(_INT, text) else text
    if js_type == "float":
        return float(text) if _matches(_JS_FLOAT, text) else text
    if js_type == "Bigint":
        return _convert(lambda t: int(t[:-1]), text) if _matches(_JS_BIGINT, text) else text
    if js_type == "Boolean":
        return text == "true" if text in ("true", "false") else text
    if js_type == "any":
        return text
    if js_type == "dict":
        return _js_object(text)
    if js_type == "array":
        return _js_array(text, item_type)
    raise UnsupportedTypeError(f"JavaScript type {js_type!r} has no conversion rule")
