"""Deterministic mutations of a ground-truth turn and realistic rollout mixes, for reward tests and benchmarks.

Each mutation takes a ground-truth text and returns a response text, or None when it does not apply (e.g. no
<tool_call> block, or no parameter value to change).
"""
from __future__ import annotations

import json
import random
from typing import Any, Callable

from toolrl_jax.rewards.parsing import CALL_CLOSE, CALL_OPEN


def _split_calls(text: str) -> tuple[str, list[Any], str] | None:
    """(text up to and including "<tool_call>", parsed call lines, text from "</tool_call>") or None."""
    head, sep, rest = text.partition(CALL_OPEN)
    block, sep2, tail = rest.partition(CALL_CLOSE)
    if not sep or not sep2:
        return None
    try:
        calls = [json.loads(line) for line in block.strip().split("\n")]
    except ValueError:
        return None
    return head + sep, calls, sep2 + tail


def _render(head: str, calls: list[Any], tail: str) -> str:
    return head + "\n" + "\n".join(json.dumps(c, ensure_ascii=False) for c in calls) + "\n" + tail


def _with_calls(text: str, edit: Callable[[list[Any]], list[Any] | None]) -> str | None:
    parts = _split_calls(text)
    if parts is None:
        return None
    head, calls, tail = parts
    new_calls = edit([json.loads(json.dumps(c)) for c in calls])  # deep copy
    return None if new_calls is None else _render(head, new_calls, tail)


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "_changed"
    return "changed"


def _change_first_value(calls: list[Any]) -> list[Any] | None:
    for call in calls:
        if call["parameters"]:
            key = next(iter(call["parameters"]))
            call["parameters"][key] = _changed(call["parameters"][key])
            return calls
    return None


def _rename_parameters(calls: list[Any]) -> list[Any]:
    return [{("arguments" if k == "parameters" else k): v for k, v in c.items()} for c in calls]


def _break_first_line(text: str) -> str | None:
    """Drop the last character (a closing brace) of the first call line."""
    parts = _split_calls(text)
    if parts is None:
        return None
    head, calls, tail = parts
    lines = [json.dumps(c, ensure_ascii=False) for c in calls]
    lines[0] = lines[0][:-1]
    return head + "\n" + "\n".join(lines) + "\n" + tail


MUTATIONS: dict[str, Callable[[str], str | None]] = {
    "identity": lambda t: t,
    "drop_last_call": lambda t: _with_calls(t, lambda c: c[:-1]),
    "reverse_order": lambda t: _with_calls(t, lambda c: c[::-1]),
    "change_value": lambda t: _with_calls(t, _change_first_value),
    "extra_key": lambda t: _with_calls(t, lambda c: [{**c[0], "parameters": {**c[0]["parameters"], "zz_extra": 3}}]
                                       + c[1:]),
    "duplicate_call": lambda t: _with_calls(t, lambda c: c + [c[0]]),
    "arguments_key": lambda t: _with_calls(t, _rename_parameters),
    "bad_json": lambda t: _break_first_line(t),
    "missing_newline": lambda t: None if _split_calls(t) is None else t.replace(CALL_OPEN + "\n", CALL_OPEN, 1),
    "no_think": lambda t: t.partition("</think>")[2].lstrip("\n") or None,
    "response_only": lambda t: "<think> I can answer directly. </think>\n<response> Sorry, I cannot help. </response>",
    "truncated": lambda t: t[: len(t) // 2],
}

_WORDS = ("the user wants to call tool with parameter value check whether I should first need city date "
          "because however let me verify required optional default format json string number").split()
_NAMES = ("get_weather", "search_hotels", "convert_currency", "Get News", "calc_bmi", "lookup_stock")
_KEYS = ("city", "date", "amount", "from", "to", "query", "page", "limit", "verbose", "symbol")


def synthetic_ground_truth(rng: random.Random) -> str:
    """A random ToolRL-style ground truth: 1-3 calls with 0-4 parameters (12% response-only)."""
    if rng.random() < 0.12:
        return ("<think> I should directly respond to the user's need. </think>\n"
                "<response> Please give the date. </response>")
    calls = []
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        params = {k: rng.choice([rng.choice(_WORDS), rng.randint(0, 500), rng.random() < 0.5, "New York"])
                  for k in rng.sample(_KEYS, rng.randint(0, 4))}
        calls.append({"name": rng.choice(_NAMES), "parameters": params})
    lines = "\n".join(json.dumps(c) for c in calls)
    return f"<think> I should use the appropriate tool. </think>\n<tool_call>\n{lines}\n</tool_call>"


def _long_think(gt: str, rng: random.Random) -> str:
    think = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(50, 400)))
    return f"<think> {think} </think>" + gt.partition("</think>")[2]


def rollout_mix(n: int, gts: list[str], seed: int) -> tuple[list[str], list[str]]:
    """n realistic (response, ground truth) pairs, 4 per GT as in a GRPO group: a long generated <think>
    (50-400 words), then 40% correct, 40% mutated (a random MUTATIONS entry), 20% garbage tag soup."""
    rng = random.Random(seed)
    mutations = [m for name, m in MUTATIONS.items() if name != "identity"]
    responses, targets = [], []
    for i in range(n):
        gt = gts[i // 4 % len(gts)]  # GRPO: 4 responses per prompt share a ground truth
        base = _long_think(gt, rng)
        u = rng.random()
        if u < 0.4:
            response = base
        elif u < 0.8:
            response = rng.choice(mutations)(base) or base[: len(base) // 3]
        else:
            response = "".join(rng.choice(["<think>", "</think>", "{", "\"", "\n", " ", "<tool_call>", "ok"] + _WORDS)
                               for _ in range(rng.randint(0, 600)))
        responses.append(response)
        targets.append(gt)
    return responses, targets
