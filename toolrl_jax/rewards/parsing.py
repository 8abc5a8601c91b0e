"""Parsing of assistant turns and ground truths, done once per sample and reused by every reward component.

The string operations mirror the original implementation exactly (`split(...)[1]`, `str.count`, `str.split()`),
because the reward must match it to floating-point equality. Parsing model output never raises: any failure is
recorded in the parse result. Ground truths are data: a malformed one raises `GroundTruthError`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<response>", "</response>"
COUNTED_TAGS = (CALL_OPEN, CALL_CLOSE, RESPONSE_OPEN, RESPONSE_CLOSE)

# (assistant header, end-of-turn token) per chat-template family.
_TURN_MARKERS = {
    "qwen": ("<|im_start|>assistant", "<|im_end|>"),
    "llama": ("<|start_header_id|>assistant<|end_header_id|>", "<|eot_id|>"),
}
_FAMILY_ALIASES = {"qwen": "qwen", "qwen2": "qwen", "qwen2.5": "qwen", "llama": "llama", "llama3": "llama"}


class GroundTruthError(ValueError):
    """A ground-truth assistant turn that the reward cannot use (bad JSON or call structure)."""


def extract_assistant_turn(decoded_text: str, family: str | None) -> str:
    """The last assistant turn of `decoded_text`, stripped: after the last assistant header, before the stop token.

    Works on a full decode (prompt + response) and on a response-only decode (no header: the whole text up to
    the stop token). family: "qwen"/"qwen2"/"qwen2.5" (ChatML) or "llama"/"llama3"; None returns the text
    unchanged (the original's fallback for unknown models).
    """
    if family is None:
        return decoded_text
    key = _FAMILY_ALIASES.get(family.lower())
    if key is None:
        raise ValueError(f"unknown chat family {family!r}; expected one of {sorted(_FAMILY_ALIASES)} or None")
    header, stop = _TURN_MARKERS[key]
    return decoded_text.rpartition(header)[2].partition(stop)[0].strip()


def _tool_call_block_lines(text: str) -> list[str]:
    """Lines of the first <tool_call> block, as `text.split("<tool_call>")[1].split("</tool_call>")[0].strip()`."""
    segment = text.partition(CALL_OPEN)[2].partition(CALL_OPEN)[0]
    return segment.partition(CALL_CLOSE)[0].strip().split("\n")


def _json_lines(lines: list[str]) -> tuple[list[Any] | None, str | None]:
    """json.loads of every line, or (None, reason) at the first failure. Never raises."""
    values = []
    for i, line in enumerate(lines):
        try:
            values.append(json.loads(line))
        except Exception as e:  # JSONDecodeError, RecursionError (deep nesting), ValueError (huge ints), ...
            return None, f"tool_call line {i + 1}: {type(e).__name__}: {str(e)[:200]}"
    return values, None


@dataclasses.dataclass(frozen=True)
class ParsedResponse:
    """Everything the reward reads from one response, computed once.

    calls: the JSON value of each line of the first <tool_call> block (not yet checked to be call dicts: the
    original checks structure lazily, see reward.py), or None when the tags are missing or a line is not JSON.
    """

    text: str
    tag_counts: tuple[int, int, int, int]  # str.count of COUNTED_TAGS
    think_words: int | None  # words between the last <think> and the next </think>; None if a tag is missing
    calls: list[Any] | None
    call_error: str | None


def parse_response(text: str) -> ParsedResponse:
    """Parse one assistant turn (already extracted and stripped). Never raises on any string."""
    counts = tuple(text.count(tag) for tag in COUNTED_TAGS)
    if THINK_OPEN in text and THINK_CLOSE in text:
        think = text.rpartition(THINK_OPEN)[2].partition(THINK_CLOSE)[0].strip()
        think_words = len(think.split())
    else:
        think_words = None
    if counts[0] > 0 and counts[1] > 0:
        calls, error = _json_lines(_tool_call_block_lines(text))
    else:
        calls, error = None, "missing <tool_call> or </tool_call>"
    return ParsedResponse(text, counts, think_words, calls, error)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class ParsedGroundTruth:
    """A reference assistant turn: which blocks it has (they pick the format pattern) and its calls."""

    text: str
    has_tool_call: bool  # "<tool_call>" in text
    has_response: bool  # "<response>" in text
    calls: list[dict[str, Any]] | None  # None when the GT has no <tool_call>


def parse_ground_truth(text: str) -> ParsedGroundTruth:
    """Parse a ground truth; raises GroundTruthError if its tool calls are not `{"name": str, "parameters": dict}`."""
    if not isinstance(text, str):
        raise GroundTruthError(f"ground truth must be a str, got {type(text).__name__}")
    has_call = CALL_OPEN in text
    calls = None
    if has_call:
        calls, error = _json_lines(_tool_call_block_lines(text))
        if calls is None:
            raise GroundTruthError(f"ground truth {error}; text starts {text[:200]!r}")
        for i, call in enumerate(calls):
            if not (isinstance(call, dict) and isinstance(call.get("name"), str)
                    and isinstance(call.get("parameters"), dict)):
                raise GroundTruthError(
                    f"ground truth tool_call line {i + 1} is not {{\"name\": str, \"parameters\": {{...}}}}: "
                    f"{json.dumps(call)[:200]}"
                )
    return ParsedGroundTruth(text, has_call, RESPONSE_OPEN in text, calls)
