"""Converters from raw tool-use datasets (in their own formats) to single-step ToolRL examples.

* ToolACE, ShareGPT form: {"system": "... [tool JSON list] ...", "tools": "[]" or a JSON list, "conversations":
  [{"from": human|gpt|function_call|observation, "value": str}]}. Every assistant step (a function_call turn or a
  gpt turn) becomes one example whose prompt holds the dialogue so far. In this form some call names are cut to
  their last word ("API" for "Market Trends API"); the full name is recovered from the tool list (unique suffix
  match, disambiguated by the observation's name) or the row is reported. Call arguments are written as strings
  by default (`string_values`), as in ToolRL's RL mix, whose ToolACE ground truths carry "1", "2025.0", "True".
  Response text has blank lines collapsed to single newlines, as in ToolRL's data.
* Hammer (masked): {"instruction": "[BEGIN OF AVAILABLE TOOLS]\\n[...]\\n[END OF AVAILABLE TOOLS] ... [BEGIN OF
  QUERY]\\n...\\n[END OF QUERY]", "input": "", "output": "```\\n[{name, arguments}]\\n```"}.
* xLAM: {"query": str, "tools": list or JSON string, "answers": list or JSON string of {name, arguments}}.

Rows that cannot be converted never raise: they are recorded in a `ConversionReport` with file, row and reason. A
missing required field is such a row (never a default): xLAM `query`/`tools`/`answers`, Hammer `instruction`/
`output` (and `input` when the instruction has no query block), ToolACE `conversations` (and `system` when `tools`
is empty) and each turn's `from`/`value`, and `name`/`arguments` of every call. Rows of a raw file that cannot be
read (a JSONL line that is not UTF-8 or not JSON, a record with bytes that are not UTF-8) are reported the same
way; positions are "row N (0-based)" for JSON lists and "line N" (1-based) for JSONL files.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from toolrl_jax.datasets.example import ToolRLExample
from toolrl_jax.datasets.format import (
    FormatError,
    ToolSpec,
    format_assistant_turn,
    format_obs,
    format_user,
    prompt_messages,
    render_system_prompt,
)
from toolrl_jax.datasets.records import Records, RowIssue, RowUnit, read_json_records, row_label

EmptyCallPolicy = Literal["skip", "response"]
# Reference turn for a query no listed tool can serve, used when empty_calls="response".
NO_TOOL_RESPONSE = "None of the available tools can be used to answer this request."


@dataclasses.dataclass(frozen=True)
class ConversionIssue:
    """A raw row (or one step of it) that was not turned into an example, and why."""
    source: str
    file: str
    row: int
    reason: str
    step: int | None = None
    unit: RowUnit = "row"

    def __str__(self) -> str:
        where = f"{self.file}: {row_label(self.row, self.unit)}"
        if self.step is not None:
            where += f", step {self.step}"
        return f"[{self.source}] {where}: {self.reason}"


@dataclasses.dataclass
class ConversionReport:
    """Counts and issues of a conversion run. `failed` are unusable rows/steps; `skipped` are deliberate drops
    (e.g. empty call lists under empty_calls="skip")."""
    rows_read: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: dict[str, int] = dataclasses.field(default_factory=dict)
    failed: list[ConversionIssue] = dataclasses.field(default_factory=list)
    skipped: list[ConversionIssue] = dataclasses.field(default_factory=list)

    def _bump(self, table: dict[str, int], source: str, n: int = 1) -> None:
        table[source] = table.get(source, 0) + n

    def merge(self, other: "ConversionReport") -> "ConversionReport":
        for source, n in other.rows_read.items():
            self._bump(self.rows_read, source, n)
        for source, n in other.examples.items():
            self._bump(self.examples, source, n)
        self.failed.extend(other.failed)
        self.skipped.extend(other.skipped)
        return self

    def add_unreadable(self, source: str, issues: Iterable[RowIssue]) -> None:
        """Rows of `source` that could not be read (or were left out), as failed rows."""
        for issue in issues:
            self._bump(self.rows_read, source)
            self.failed.append(ConversionIssue(source, issue.path, issue.row, issue.reason, unit=issue.unit))

    def to_dict(self) -> dict[str, Any]:
        return {"rows_read": dict(self.rows_read), "examples": dict(self.examples),
                "num_failed": len(self.failed), "num_skipped": len(self.skipped),
                "failed": [dataclasses.asdict(i) for i in self.failed],
                "skipped": [dataclasses.asdict(i) for i in self.skipped]}

    def summary(self) -> str:
        lines = [f"{s}: {self.rows_read.get(s, 0)} rows -> {self.examples.get(s, 0)} examples"
                 for s in sorted(set(self.rows_read) | set(self.examples))]
        lines.append(f"failed: {len(self.failed)}, skipped: {len(self.skipped)}")
        return "\n".join(lines)


class _Converter:
    """Shared bookkeeping: emits examples, records issues."""

    def __init__(self, source: str, path: str, report: ConversionReport, unit: RowUnit):
        self.source, self.path, self.report, self.unit = source, path, report, unit
        self.examples: list[ToolRLExample] = []

    def emit(self, system: str, blocks: Sequence[str], ground_truth: str) -> None:
        self.examples.append(ToolRLExample(prompt_messages=prompt_messages(system, blocks), ground_truth=ground_truth,
                                           index=len(self.examples), source=self.source))
        self.report._bump(self.report.examples, self.source)

    def fail(self, row: int, reason: str, step: int | None = None) -> None:
        self.report.failed.append(ConversionIssue(self.source, self.path, row, reason, step, self.unit))

    def skip(self, row: int, reason: str, step: int | None = None) -> None:
        self.report.skipped.append(ConversionIssue(self.source, self.path, row, reason, step, self.unit))


RawRecords = Iterable[Any] | Records[Any]  # a plain list (rows numbered from 0) or the records of a file


def _numbered(records: RawRecords) -> tuple[Iterable[tuple[int, Any]], RowUnit]:
    """(position, record) pairs and their unit: a `Records` keeps its file positions, a plain list counts from 0."""
    if isinstance(records, Records):
        return records.rows, records.unit
    return enumerate(records), "row"


def _required(record: Mapping[str, Any], key: str, kinds: type | tuple[type, ...] = str, where: str = "") -> Any:
    """record[key], or FormatError naming the missing (or mistyped) field."""
    if key not in record:
        raise FormatError(f"{where}missing required field {key!r}")
    value = record[key]
    if not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
        raise FormatError(f"{where}field {key!r} must be {names}, got {type(value).__name__}")
    return value


def _object(record: Any, where: str = "") -> Mapping[str, Any]:
    if not isinstance(record, Mapping):
        raise FormatError(f"{where}expected an object, got {type(record).__name__}")
    return record


def _maybe_json(value: Any, what: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise FormatError(f"{what} is not valid JSON: {err}") from None
    return value


def _tools_from_list(raw_tools: Any) -> list[ToolSpec]:
    raw_tools = _maybe_json(raw_tools, "tool list")
    if not isinstance(raw_tools, list):
        raise FormatError(f"tool list must be a JSON list, got {type(raw_tools).__name__}")
    tools = [ToolSpec.from_raw(t) for t in raw_tools]
    if not tools:
        raise FormatError("empty tool list")
    return tools


def _parse_calls(raw: Any, what: str) -> list[tuple[str, dict[str, Any]]]:
    """[(name, arguments)] from a call dict or list of them ({name, arguments|parameters})."""
    raw = _maybe_json(raw, what)
    if isinstance(raw, Mapping):
        raw = [raw]
    if not isinstance(raw, list):
        raise FormatError(f"{what} must be a call object or a list of them, got {type(raw).__name__}")
    calls = []
    for j, call in enumerate(raw):
        where = f"{what}[{j}]: "
        name = _required(_object(call, where), "name", where=where)
        if not name:
            raise FormatError(f"{where}empty 'name'")
        key = "arguments" if "arguments" in call or "parameters" not in call else "parameters"
        args = _maybe_json(_required(call, key, object, where), f"{what}[{j}].{key}")
        if args is None:
            args = {}
        if not isinstance(args, Mapping):
            raise FormatError(f"{what}[{j}].{key} must be an object, got {type(args).__name__}")
        calls.append((name, dict(args)))
    return calls


def _check_known(calls: Sequence[tuple[str, Mapping[str, Any]]], tools: Sequence[ToolSpec]) -> None:
    names = {t.name for t in tools}
    for name, _ in calls:
        if name not in names:
            raise FormatError(f"call to {name!r}, which is not in the tool list")


def _collapse_blank_lines(text: str) -> str:
    return re.sub(r"\n{2,}", "\n", text).strip()


# ----------------------------------------------------------------------------------------------------------------
# ToolACE (ShareGPT form).
# ----------------------------------------------------------------------------------------------------------------

_USER_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant")
_CALL_ROLES = ("function_call",)
_OBS_ROLES = ("observation", "tool")


def _toolace_tools(record: Mapping[str, Any]) -> list[ToolSpec]:
    tools_field = record.get("tools")
    if tools_field not in (None, "", "[]", []):
        return _tools_from_list(tools_field)
    system = _required(record, "system", where="'tools' is empty: ")
    start = system.find("[{")
    if start < 0:
        raise FormatError("no tool JSON list found in 'system'")
    try:
        raw_tools, _ = json.JSONDecoder().raw_decode(system, start)
    except json.JSONDecodeError as err:
        raise FormatError(f"tool list in 'system' is not valid JSON: {err}") from None
    return _tools_from_list(raw_tools)


def _resolve_name(name: str, args: Mapping[str, Any], tools: Sequence[ToolSpec], observed: str | None,
                  earlier: Mapping[str, str]) -> str:
    """The full tool name for a possibly truncated call name (raises FormatError when unknown or ambiguous).

    A candidate is a listed tool whose name ends with the call name after a separator (" ", "/", "-", ".").
    Ties are broken, in order, by the observation's name, by which candidates accept every argument key, and by
    how the same short name was resolved earlier in the dialogue.
    """
    names = [t.name for t in tools]
    if name in names:
        return name
    suffix = re.compile(r"[\s/\-.]" + re.escape(name) + r"$")
    candidates = sorted({n for n in names if suffix.search(n)})
    if not candidates:
        raise FormatError(f"call name {name!r} matches no listed tool")
    if len(candidates) == 1:
        return candidates[0]
    if observed in candidates:
        return observed
    params = {t.name: set(t.parameters) for t in tools}
    fitting = [n for n in candidates if set(args) <= params[n]]
    if args and len(fitting) == 1:
        return fitting[0]
    if earlier.get(name) in candidates:
        return earlier[name]
    raise FormatError(f"call name {name!r} is ambiguous among {candidates}")


def _stringify(value: Any) -> Any:
    """ToolRL's ToolACE argument values: scalars as Python writes them, containers as JSON text."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)) or value is None:
        return str(value)
    return json.dumps(value)


def _observation_names(value: Any) -> list[str | None]:
    try:
        data = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        return []
    if isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, list):
        return []
    return [d.get("name") if isinstance(d, Mapping) else None for d in data]


def convert_toolace(records: RawRecords, path: str | Path = "<memory>", source: str = "toolace",
                    string_values: bool = True, report: ConversionReport | None = None) -> list[ToolRLExample]:
    """One example per assistant step of each ToolACE conversation (see module doc)."""
    report = report if report is not None else ConversionReport()
    rows, unit = _numbered(records)
    conv = _Converter(source, str(path), report, unit)
    for row, record in rows:
        report._bump(report.rows_read, source)
        try:
            tools = _toolace_tools(_object(record))
            turns = _required(record, "conversations", list)
            if not turns:
                raise FormatError("'conversations' is empty")
        except FormatError as err:
            conv.fail(row, str(err))
            continue
        system = render_system_prompt(tools)
        blocks: list[str] = []
        earlier: dict[str, str] = {}  # truncated call name -> full name resolved earlier in this dialogue
        i = step = 0
        while i < len(turns):
            nxt = turns[i + 1] if i + 1 < len(turns) and isinstance(turns[i + 1], Mapping) else {}
            try:
                turn = _object(turns[i], f"turn {i}: ")
                role = _required(turn, "from", where=f"turn {i}: ")
                value = _required(turn, "value", where=f"turn {i}: ")
                if role in _USER_ROLES:
                    blocks.append(format_user(value.strip()))
                elif role in _CALL_ROLES:
                    observed = _observation_names(nxt.get("value")) if nxt.get("from") in _OBS_ROLES else []
                    calls = _parse_calls(value, f"turn {i} function_call")
                    if not calls:
                        raise FormatError(f"turn {i}: empty function_call")
                    resolved = []
                    for j, (name, args) in enumerate(calls):
                        obs_name = observed[j] if len(observed) == len(calls) else None
                        if obs_name is None and len(set(observed)) == 1:
                            obs_name = observed[0]
                        full_name = _resolve_name(name, args, tools, obs_name, earlier)
                        earlier[name] = full_name
                        args = {k: _stringify(v) for k, v in args.items()} if string_values else args
                        resolved.append((full_name, args))
                    turn_text = format_assistant_turn(calls=resolved)
                    if not blocks:
                        raise FormatError(f"turn {i}: assistant step before any user turn")
                    conv.emit(system, blocks, turn_text)
                    step += 1
                    if nxt.get("from") in _OBS_ROLES:
                        if not isinstance(nxt.get("value"), str):
                            raise FormatError(f"turn {i + 1}: observation has no string 'value'")
                        turn_text += "\n" + format_obs(nxt["value"].strip())
                        i += 1
                    blocks.append(turn_text)
                elif role in _ASSISTANT_ROLES:
                    text = _collapse_blank_lines(value)
                    if not text:
                        raise FormatError(f"turn {i}: empty assistant reply")
                    turn_text = format_assistant_turn(response=text)
                    if not blocks:
                        raise FormatError(f"turn {i}: assistant step before any user turn")
                    conv.emit(system, blocks, turn_text)
                    step += 1
                    blocks.append(turn_text)
                elif role in _OBS_ROLES:
                    raise FormatError(f"turn {i}: observation without a preceding function_call")
                else:
                    raise FormatError(f"turn {i}: unknown role {role!r}")
            except FormatError as err:
                # The rest of the dialogue would carry a broken history: drop it, counting the lost steps.
                remaining = sum(1 for t in turns[i:] if isinstance(t, Mapping)
                                and t.get("from") in _CALL_ROLES + _ASSISTANT_ROLES)
                conv.fail(row, f"{err} (dropped {remaining} remaining assistant step(s))", step=step)
                break
            i += 1
    return conv.examples


# ----------------------------------------------------------------------------------------------------------------
# Single-turn sources: Hammer (masked) and xLAM.
# ----------------------------------------------------------------------------------------------------------------

def _between(text: str, begin: str, end: str, what: str) -> str:
    start = text.find(begin)
    stop = text.find(end, start + len(begin)) if start >= 0 else -1
    if start < 0 or stop < 0:
        raise FormatError(f"{what}: missing {begin!r} ... {end!r}")
    return text[start + len(begin):stop].strip()


def _check_policy(empty_calls: str) -> None:
    if empty_calls not in ("skip", "response"):
        raise ValueError(f"empty_calls must be 'skip' or 'response', got {empty_calls!r}")


SingleTurn = tuple[list[ToolSpec], str, list[tuple[str, dict[str, Any]]]]


def _convert_single_turn(records: RawRecords, path: str | Path, source: str, empty_calls: EmptyCallPolicy,
                         report: ConversionReport | None, extract: Callable[[Mapping[str, Any]], SingleTurn]
                         ) -> list[ToolRLExample]:
    """One example per record from `extract(record) -> (tools, query, calls)` (which raises FormatError)."""
    _check_policy(empty_calls)
    report = report if report is not None else ConversionReport()
    rows, unit = _numbered(records)
    conv = _Converter(source, str(path), report, unit)
    for row, record in rows:
        report._bump(report.rows_read, source)
        try:
            tools, query, calls = extract(_object(record))
            if not query.strip():
                raise FormatError("empty query")
            system = render_system_prompt(tools)
            blocks = [format_user(query.strip())]
            if not calls:
                if empty_calls == "skip":
                    conv.skip(row, "no tool call in the reference (empty_calls='skip')")
                else:
                    conv.emit(system, blocks, format_assistant_turn(response=NO_TOOL_RESPONSE))
                continue
            _check_known(calls, tools)
            conv.emit(system, blocks, format_assistant_turn(calls=calls))
        except FormatError as err:
            conv.fail(row, str(err))
    return conv.examples


def _hammer_record(record: Mapping[str, Any]) -> SingleTurn:
    instruction = _required(record, "instruction")
    output = _required(record, "output")
    tools = _tools_from_list(_between(instruction, "[BEGIN OF AVAILABLE TOOLS]", "[END OF AVAILABLE TOOLS]",
                                      "instruction"))
    if "[BEGIN OF QUERY]" in instruction:
        query = _between(instruction, "[BEGIN OF QUERY]", "[END OF QUERY]", "instruction")
    else:
        query = _required(record, "input", where="no [BEGIN OF QUERY] in 'instruction': ")
    output = re.sub(r"^```(?:json)?\s*|\s*```$", "", output.strip())
    return tools, query, _parse_calls(output or "[]", "output")


def _xlam_record(record: Mapping[str, Any]) -> SingleTurn:
    query = _required(record, "query")
    tools = _tools_from_list(_required(record, "tools", (list, str)))
    return tools, query, _parse_calls(_required(record, "answers", (list, str)), "answers")


def convert_hammer(records: RawRecords, path: str | Path = "<memory>", source: str = "hammer",
                   empty_calls: EmptyCallPolicy = "skip",
                   report: ConversionReport | None = None) -> list[ToolRLExample]:
    """One example per Hammer record (tools and query from `instruction`, calls from `output`)."""
    return _convert_single_turn(records, path, source, empty_calls, report, _hammer_record)


def convert_xlam(records: RawRecords, path: str | Path = "<memory>", source: str = "xlam",
                 empty_calls: EmptyCallPolicy = "skip",
                 report: ConversionReport | None = None) -> list[ToolRLExample]:
    """One example per xLAM record {query, tools, answers}."""
    return _convert_single_turn(records, path, source, empty_calls, report, _xlam_record)


CONVERTERS = {"toolace": convert_toolace, "hammer": convert_hammer, "xlam": convert_xlam}


def convert_file(kind: str, path: str | Path, report: ConversionReport | None = None,
                 **options: Any) -> list[ToolRLExample]:
    """Loads and converts one raw file of `kind` ("toolace" | "hammer" | "xlam"). Rows that cannot be read go to
    `report.failed` like rows that cannot be converted; a file that cannot be read at all raises DataFileError."""
    if kind not in CONVERTERS:
        raise ValueError(f"unknown raw source kind {kind!r}; expected one of {sorted(CONVERTERS)}")
    records = read_json_records(path)
    report = report if report is not None else ConversionReport()
    source = options.pop("source", kind)
    report.add_unreadable(source, records.issues)
    return CONVERTERS[kind](records, path=records.path, source=source, report=report, **options)
