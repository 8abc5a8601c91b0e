"""Differential tests against the official BFCL checker (the optional bfcl-eval package; skipped without it).

Every single-turn item's gold output plus seeded random mutations of it (dropped / extra / renamed
parameters, perturbed values, shuffled or duplicated calls) must get the same verdict from our checker and
the official one; the multi-turn checker is compared the same way on mutated ground-truth call sequences.
"""
from __future__ import annotations

import copy
import random
import sys
import types

import pytest

from toolrl_jax.evaluation.bfcl import ast_checker, categories, data, multi_turn, oracle, values
from toolrl_jax.evaluation.parsing import parse_tool_calls

pytest.importorskip("bfcl_eval", reason="the official checker lives in the optional bfcl-eval package")


@pytest.fixture(scope="module")
def official():
    """bfcl_eval's AST checker and type converters. Its model registry (which imports every provider SDK) is
    replaced by a stub: prompting models keep dotted function names, which is all the checker asks it."""
    class _Config:
        underscore_to_dot = False

    class _Registry(dict):
        def __missing__(self, key):
            return _Config()

    saved = sys.modules.get("bfcl_eval.constants.model_config")
    stub = types.ModuleType("bfcl_eval.constants.model_config")
    stub.MODEL_CONFIG_MAPPING = _Registry()
    sys.modules["bfcl_eval.constants.model_config"] = stub
    try:
        from bfcl_eval.constants.enums import Language
        from bfcl_eval.eval_checker.ast_eval import ast_checker as official_ast
        from bfcl_eval.eval_checker.ast_eval.type_convertor import java_type_converter, js_type_converter
        from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_checker
    except ImportError as error:
        pytest.skip(f"bfcl_eval checker not importable: {error}")
    finally:
        if saved is None:
            sys.modules.pop("bfcl_eval.constants.model_config", None)
        else:
            sys.modules["bfcl_eval.constants.model_config"] = saved
    languages = {"python": Language.PYTHON, "java": Language.JAVA, "javascript": Language.JAVASCRIPT}
    return types.SimpleNamespace(ast=official_ast, languages=languages, java=java_type_converter,
                                 js=js_type_converter, multi_turn=multi_turn_checker)


def _mutate_value(rng: random.Random, value):
    if isinstance(value, bool):
        return rng.choice([not value, str(value).lower(), int(value)])
    if isinstance(value, int):
        return rng.choice([value + 1, float(value), str(value), True])
    if isinstance(value, float):
        return rng.choice([value + 0.5, int(value), str(value)])
    if isinstance(value, str):
        if value[-1:] in ("L", "f", "n"):
            return rng.choice([value[:-1], value + "x", value.upper()])
        return rng.choice([value.upper(), value.replace(" ", "-"), f" {value}.", f"'{value}'", f'"{value}"',
                           value + "x", "", value.replace(", ", ","), "true"])
    if isinstance(value, list):
        options = [list(reversed(value)), value[:-1], value + [value[0] if value else 1], [],
                   [str(x) for x in value]]
        if value:
            changed = list(value)
            index = rng.randrange(len(changed))
            changed[index] = _mutate_value(rng, changed[index])
            options.append(changed)
        return rng.choice(options)
    if isinstance(value, dict):
        changed = dict(value)
        if changed and rng.random() < 0.5:
            key = rng.choice(list(changed))
            if rng.random() < 0.5:
                del changed[key]
            else:
                changed[key] = _mutate_value(rng, changed[key])
        else:
            changed["zz"] = 1
        return changed
    return value


def _mutate_calls(rng: random.Random, calls: list[dict]) -> list[dict]:
    calls = copy.deepcopy(calls)
    if not calls:
        return calls
    target, roll = rng.choice(calls), rng.random()
    if roll < 0.1:
        target["name"] += "_x"
    elif roll < 0.2 and target["parameters"]:
        del target["parameters"][rng.choice(list(target["parameters"]))]
    elif roll < 0.25:
        target["parameters"]["zzz"] = 1
    elif roll < 0.3:
        calls.append(copy.deepcopy(target))
    elif roll < 0.35:
        calls.remove(target)
    elif roll < 0.4:
        rng.shuffle(calls)
    elif target["parameters"]:
        key = rng.choice(list(target["parameters"]))
        target["parameters"][key] = _mutate_value(rng, target["parameters"][key])
    return calls


@pytest.mark.parametrize("category", categories.NON_LIVE_AST + categories.LIVE_AST)
def test_ast_verdicts_match_the_official_checker(shared_dir, official, category):
    rng = random.Random(category)
    mutations = 12 if category in ("java", "javascript") else 4
    disagreements = []
    language = official.languages[ast_checker.language_of(category)]
    for item in data.load_category(shared_dir / "bench" / "bfcl_v3", category):
        gold = [{"name": c.name, "parameters": c.parameters}
                for c in parse_tool_calls(oracle.oracle_output(category, item.functions, item.answer))]
        for k in range(mutations + 1):
            calls = gold if k == 0 else _mutate_calls(rng, gold)
            decoded = [{c["name"]: c["parameters"]} for c in calls]
            ours = ast_checker.check_ast(category, item.functions, decoded, item.answer).valid
            theirs = official.ast.ast_checker(copy.deepcopy(item.functions), copy.deepcopy(decoded),
                                              copy.deepcopy(item.answer), language, category, "reference")["valid"]
            if ours != theirs:
                disagreements.append((item.id, decoded, theirs, ours))
    assert not disagreements, disagreements[:5]


JAVA_CASES = [
    ("42", "integer", None), ("-7", "long", None), ("7L", "long", None), ("3.5f", "float", None),
    ("3e2F", "float", None), ("3.5", "float", None), ("2.25", "double", None), ("1e-3", "double", None),
    ("true", "boolean", None), ("TRUE", "boolean", None), ("'a'", "char", None), ("x y", "String", None),
    ("obj", "any", None), ("new int[]{1, 2, 3}", "Array", "integer"), ("new String[] {a, b}", "Array", "String"),
    ('new String[]{"a", "b"}', "Array", "String"), ("new long[]{1L, 2, 3L}", "Array", "long"),
    ("new int[]{}", "Array", "integer"), ("[1, 2]", "Array", "integer"),
    ('new ArrayList<>(Arrays.asList("a", "b"))', "ArrayList", "String"),
    ("new ArrayList<Integer>(Arrays.asList(1, 2))", "ArrayList", "integer"),
    ("new ArrayList<Character>() {{ add('a'); add('b'); }}", "ArrayList", "char"),
    ("new ArrayList<>()", "ArrayList", "String"), ('new ArrayList<>(Arrays.asList(1, "x", true))', "ArrayList", None),
    ('new HashMap<String, String>() {{ put("k", "v"); put("n", 3); }}', "HashMap", None),
    ("new HashMap<>()", "HashMap", None), ("map", "HashMap", None), ("5L\n", "long", None),
]
JS_CASES = [
    ("'abc'", "String", None), ('"abc"', "String", None), ("abc", "String", None), ("'", "String", None),
    ("12", "integer", None), ("1.5", "integer", None), ("1.5", "float", None), ("2", "float", None),
    ("12n", "Bigint", None), ("12", "Bigint", None), ("true", "Boolean", None), ("yes", "Boolean", None),
    ("x", "any", None), ("[1, 2, 3]", "array", "integer"), ("['a', \"b\"]", "array", "String"),
    ("new Array(1, 2)", "array", "integer"), ("[[1, 2], [3, 4]]", "array", "array"), ("[]", "array", None),
    ("[1.5, 'x', true]", "array", None), ("arr", "array", "String"), ("{}", "dict", None),
    ("{a: 1, b: 'x', c: true}", "dict", None), ("{'k': [1, 2], n: {m: 1}}", "dict", None), ("obj", "dict", None),
    ("[1, 2]", "array", "float"),
]


@pytest.mark.parametrize("text, kind, item_kind", JAVA_CASES)
def test_java_conversion_matches_official(official, text, kind, item_kind):
    try:
        expected = official.java.java_type_converter(text, kind, item_kind)
    except ValueError:
        pytest.skip("the official converter crashes on this input")
    assert values.java_value(text, kind, item_kind) == expected


@pytest.mark.parametrize("text, kind, item_kind", JS_CASES)
def test_js_conversion_matches_official(official, text, kind, item_kind):
    assert values.js_value(text, kind, item_kind) == official.js.js_type_converter(text, kind, item_kind)


def _mutate_turns(rng: random.Random, turns: list[list[str]]) -> list[list[str]]:
    turns = copy.deepcopy(turns)
    filled = [i for i, calls in enumerate(turns) if calls]
    if not filled:
        return turns
    calls, roll = turns[rng.choice(filled)], rng.random()
    if roll < 0.25:
        calls.pop(rng.randrange(len(calls)))
    elif roll < 0.4:
        calls.append(rng.choice(calls))
    elif roll < 0.55:
        index = rng.randrange(len(calls))
        name, args, kwargs = multi_turn.parse_call(calls[index])
        for key, value in kwargs.items():
            kwargs[key] = value + "x" if isinstance(value, str) else value
            break
        rendered = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
        calls[index] = f"{name}({', '.join(rendered)})"
    elif roll < 0.65:
        calls.clear()
    elif roll < 0.75:
        rng.shuffle(calls)
    elif roll < 0.85:
        calls.insert(0, "ls()")
    else:
        calls.append("no_such_function(a=1)")
    return turns


@pytest.mark.parametrize("category", categories.MULTI_TURN)
def test_multi_turn_verdicts_match_the_official_checker(shared_dir, official, category):
    rng = random.Random(category)
    disagreements = []
    for item in data.load_category(shared_dir / "bench" / "bfcl_v3", category, limit=25):
        entry = {"id": item.id, "initial_config": item.initial_config, "involved_classes": item.involved_classes}
        for k in range(4):
            turns = item.answer if k == 0 else _mutate_turns(rng, item.answer)
            steps = []
            for calls in turns:  # split each turn into steps of 1-3 calls
                split, start = [], 0
                while start < len(calls):
                    size = rng.randint(1, 3)
                    split.append(calls[start:start + size])
                    start += size
                steps.append(split)
            # The official checker keeps API instances in module globals keyed by this name: make it unique.
            theirs = official.multi_turn.multi_turn_checker(copy.deepcopy(steps), item.answer, copy.deepcopy(entry),
                                                            category, f"ref_{category}_{k}")["valid"]
            ours = multi_turn.check_multi_turn(item, steps).valid
            if ours != theirs:
                disagreements.append((item.id, steps, theirs, ours))
    assert not disagreements, disagreements[:3]
