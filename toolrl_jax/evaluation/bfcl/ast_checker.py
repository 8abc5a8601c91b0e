"""BFCL v3 AST checker: is a list of decoded calls an acceptable answer to a single-turn item?

Rules (BFCL v3, reproduced so scores match the official leaderboard):
- Function count: ``simple``/``java``/``javascript``/``live_simple`` need exactly one call, checked against
  the item's (first) function doc; ``multiple`` categories need as many calls as answers (one) and check
  against the doc named by the answer; ``parallel*`` categories match answers to calls in any order
  (greedy, answer by answer).
- Per call: the name must equal the doc's name; every required parameter present; every given parameter
  declared *and* listed in the possible answer; every answer parameter given unless its options include
  ``""`` (= may be omitted).
- Types: Python types by the doc's type name; ``int`` is accepted for ``float``; tuples become lists; arrays
  check element types one level deep. If the possible answers have a different type than declared, the
  value is treated as a variable name and only compared exactly.
- Values: strings compare after ``standardize_string`` (lowercase, drop spaces and ``,./-_*^``, ``'``->``"``);
  lists compare element-wise (strings standardised, order matters); dicts key by key against each option
  dict; lists of dicts position by position; anything else by ``in``.
- Java/JavaScript: every value must be a string in the language's syntax; it is converted by type first
  (see ``values.py``).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from toolrl_jax.evaluation.bfcl import values as lang_values

PYTHON_TYPES: dict[str, type] = {
    "string": str, "integer": int, "float": float, "boolean": bool,
    "array": list, "tuple": list, "dict": dict, "any": str,
}
_PYTHON_COLLECTION_TYPES = ("array", "tuple")


@dataclasses.dataclass(frozen=True)
class CheckResult:
    valid: bool
    error: str = ""
    error_type: str = ""


_OK = CheckResult(True)


def _fail(error_type: str, error: str) -> CheckResult:
    return CheckResult(False, error, error_type)


def language_of(category: str) -> str:
    """"java", "javascript" or "python" for a BFCL category name."""
    if "javascript" in category:
        return "javascript"
    if "java" in category:
        return "java"
    return "python"


def standardize_string(text: str) -> str:
    """BFCL's string normalisation: drop spaces and ``,./-_*^``, lowercase, single -> double quotes."""
    return re.sub(r"[ ,./\-_*^]", "", text).lower().replace("'", '"')


def _standardize(value: Any) -> Any:
    return standardize_string(value) if type(value) is str else value


def _first_answer_type(options: list) -> type | None:
    for option in options:
        if option != "":
            return type(option)
    return None


def _type_check(value: Any, options: list, expected: type, item_expected: type | None) -> tuple[bool, bool]:
    """(valid, is_variable). A value whose type matches the answers' type, not the declared one, is a variable."""
    answer_type = _first_answer_type(options)
    is_variable = answer_type is not None and answer_type is not expected
    if type(value) is expected:
        if item_expected is None:
            return True, is_variable
        for option in options:
            if type(option) is not list:
                return True, is_variable  # e.g. "" (optional): nothing to check the elements against
            if all(_type_check(item, option, item_expected, None)[0] for item in value):
                return True, is_variable
        return False, is_variable
    if answer_type is not None and type(value) is answer_type:
        return True, True
    return False, is_variable


def _as_option_list(option: Any) -> list | None:
    if isinstance(option, (list, str)):  # "" (omitted) behaves as the empty list, as upstream
        return list(option)
    return None


def _list_check(value: list, options: list) -> bool:
    standardized = [_standardize(item) for item in value]
    for option in options:
        items = _as_option_list(option)
        if items is not None and standardized == [_standardize(item) for item in items]:
            return True
    return False


def _choices(choices: Any) -> list:
    """An option dict's value as a list of choices. Upstream indexes it, so a bare string acts as the list
    of its characters (such an answer cannot be met); other scalars count as a single choice."""
    return list(choices) if isinstance(choices, (list, str)) else [choices]


def _dict_matches(value: Any, option: Any) -> bool:
    if not isinstance(value, dict) or not isinstance(option, dict):
        return False
    for key, item in value.items():
        if key not in option:
            return False
        if _standardize(item) not in [_standardize(choice) for choice in _choices(option[key])]:
            return False
    for key, choices in option.items():
        omittable = "" in choices if isinstance(choices, (list, str)) else False
        if key not in value and not omittable:
            return False
    return True


def _dict_check(value: Any, options: list) -> bool:
    return any(_dict_matches(value, option) for option in options if option != "")


def _list_of_dicts_check(value: list, options: list) -> bool:
    for option in options:
        if not isinstance(option, (list, str)) or len(option) != len(value):
            continue
        if all(_dict_check(item, [option_item]) for item, option_item in zip(value, option)):
            return True
    return False


def _declared_types(spec: dict, language: str) -> tuple[str, type, str | None, type | None]:
    """(type name, Python type, element type name, element Python type) of a parameter spec."""
    type_name = spec.get("type")
    table = {"java": lang_values.JAVA_TYPES, "javascript": lang_values.JS_TYPES}.get(language, PYTHON_TYPES)
    collections = {"java": lang_values.JAVA_COLLECTION_TYPES, "javascript": lang_values.JS_COLLECTION_TYPES}
    if type_name not in table:
        raise lang_values.UnsupportedTypeError(f"parameter type {type_name!r} is not a {language} type")
    item_name = None
    item_type = None
    if type_name in collections.get(language, _PYTHON_COLLECTION_TYPES):
        item_name = (spec.get("items") or {}).get("type")
        if item_name not in table:
            raise lang_values.UnsupportedTypeError(f"array element type {item_name!r} is not a {language} type")
        item_type = table[item_name]
    return type_name, table[type_name], item_name, item_type


def check_param(name: str, value: Any, spec: dict, options: list, language: str) -> CheckResult:
    """Check one argument against its declared spec and its list of acceptable values."""
    try:
        type_name, expected, item_name, item_expected = _declared_types(spec, language)
    except lang_values.UnsupportedTypeError as error:
        return _fail("type_error:unsupported", f"{name!r}: {error}")
    if language in ("java", "javascript"):
        if type(value) is not str:
            return _fail(f"type_error:{language}", f"{name!r} must be a {language} value written as a string, "
                                                   f"got {type(value).__name__}")
        convert = lang_values.java_value if language == "java" else lang_values.js_value
        try:
            value = convert(value, type_name, item_name)
        except lang_values.UnsupportedTypeError as error:
            return _fail("type_error:unsupported", f"{name!r}: {error}")
    if type_name == "tuple" and type(value) is tuple:
        value = list(value)
    if language == "python" and type_name == "float" and type(value) is int:
        value = float(value)

    valid, is_variable = _type_check(value, options, expected, item_expected)
    if not valid:
        return _fail("type_error", f"{name!r}: expected {type_name}, got {type(value).__name__} {value!r}")
    if not is_variable:
        if expected is dict:
            ok = _dict_check(value, options)
        elif expected is list and item_expected is dict:
            ok = _list_of_dicts_check(value, options)
        elif expected is str:
            ok = standardize_string(value) in [standardize_string(o) for o in options if type(o) is str]
        elif expected is list:
            ok = _list_check(value, options)
        else:
            ok = value in options
        if not ok:
            return _fail("value_error", f"{name!r}: {value!r} is not one of {options!r}")
        return _OK
    if value not in options:
        return _fail("value_error", f"{name!r}: {value!r} is not one of {options!r}")
    return _OK


def check_call(doc: dict, call: dict, answer: dict, language: str) -> CheckResult:
    """Check one decoded call ``{name: params}`` against one answer ``{name: {param: [options]}}``."""
    answer_params: dict = next(iter(answer.values()))
    func_name = doc["name"]
    if func_name not in call:
        return _fail("wrong_func_name", f"expected a call to {func_name!r}, got {list(call)!r}")
    params = call[func_name]
    if not isinstance(params, dict):
        return _fail("wrong_format", f"parameters of {func_name!r} are not a dict")
    properties: dict = doc.get("parameters", {}).get("properties", {})
    for required in doc.get("parameters", {}).get("required", []):
        if required not in params:
            return _fail("missing_required", f"missing required parameter {required!r}")
    for param, value in params.items():
        if param not in properties or param not in answer_params:
            return _fail("unexpected_param", f"unexpected parameter {param!r}")
        result = check_param(param, value, properties[param], answer_params[param], language)
        if not result.valid:
            return result
    for param, options in answer_params.items():
        if param not in params and "" not in options:
            return _fail("missing_optional", f"parameter {param!r} must be given")
    return _OK


def _find_doc(functions: list[dict], name: str) -> dict | None:
    return next((doc for doc in functions if doc.get("name") == name), None)


def check_ast(category: str, functions: list[dict], calls: list[dict], answers: list[dict]) -> CheckResult:
    """Score one AST item: ``calls`` and ``answers`` are lists of single-key ``{name: ...}`` dicts."""
    language = language_of(category)
    if "parallel" in category:
        if len(calls) != len(answers):
            return _fail("wrong_count", f"expected {len(answers)} calls, got {len(calls)}")
        used: set[int] = set()
        for answer in answers:
            doc = _find_doc(functions, next(iter(answer)))
            if doc is None:
                return _fail("missing_doc", f"no function doc for answer {next(iter(answer))!r}")
            match = next((i for i, call in enumerate(calls)
                          if i not in used and check_call(doc, call, answer, language).valid), None)
            if match is None:
                return _fail("no_match", f"no call matches answer {answer!r}")
            used.add(match)
        return _OK
    if "multiple" in category:
        if len(calls) != len(answers):
            return _fail("wrong_count", f"expected {len(answers)} calls, got {len(calls)}")
        doc = _find_doc(functions, next(iter(answers[0])))
        if doc is None:
            return _fail("missing_doc", f"no function doc for answer {next(iter(answers[0]))!r}")
        return check_call(doc, calls[0], answers[0], language)
    if len(calls) != 1:
        return _fail("wrong_count", f"expected 1 call, got {len(calls)}")
    return check_call(functions[0], calls[0], answers[0], language)


def check_relevance(category: str, calls: list[dict]) -> CheckResult:
    """Irrelevance items pass with no call; relevance items pass with at least one call."""
    if "irrelevance" in category:
        return _OK if not calls else _fail("irrelevance", "called a tool although none fits")
    return _OK if calls else _fail("relevance", "no tool call although one fits")
