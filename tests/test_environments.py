"""The host-side environment layer (toolrl_jax.environments): argument checks, safe execution with timeouts,
parallel stepping, tool-call parsing in both formats, the synthetic environment and its task splits, the registry.
Pure Python, no JAX; the whole file runs in a few seconds."""
from __future__ import annotations

import copy
import json
import re
import threading
import time

import pytest

from toolrl_jax.datasets.format import HISTORY_HEADER, SYSTEM_HEADER
from toolrl_jax.environments import (
    ENVIRONMENT_NAMES,
    ENVIRONMENTS,
    Outcome,
    Reset,
    SpecError,
    Step,
    SyntheticEnvironment,
    Tool,
    ToolCall,
    ToolEnvironment,
    ToolError,
    ToolResult,
    call_with_timeout,
    check_spec,
    execute_batch,
    format_calls,
    make_environment,
    make_tasks,
    parse_error_result,
    parse_hermes,
    parse_toolrl,
    parse_turn,
    read_tasks,
    render_observation,
    step_parsed,
    tool_messages,
    validate_arguments,
    write_tasks,
)
from toolrl_jax.environments.synthetic import (
    COMPACT_HEADER,
    HELDOUT_KINDS,
    POOLS,
    TRAIN_KINDS,
    ground_truth_calls,
    make_task,
    reference_turns,
    same_text,
)
from toolrl_jax.rewards.parsing import parse_ground_truth


def _spec(name, properties=None, required=()):
    return {"name": name, "description": f"{name} tool",
            "parameters": {"type": "object", "properties": properties or {}, "required": list(required)}}


class _TestEnv(ToolEnvironment):
    """Tools that echo, count, raise, fail politely, and hang until released."""

    def __init__(self, **limits):
        super().__init__(**limits)
        self.release = threading.Event()
        self.ran: list[str] = []
        self._tools = {tool.name: tool for tool in [
            Tool(_spec("echo", {"text": {"type": "string"}}, ["text"]), self._echo),
            Tool(_spec("count", {"n": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
                                 "mode": {"type": "string", "enum": ["up", "down"]}}, ["n"]), self._count),
            Tool(_spec("boom"), self._boom),
            Tool(_spec("fail"), self._fail),
            Tool(_spec("slow"), self._slow),
            Tool(_spec("big"), lambda: "x" * 50),
        ]}

    def _echo(self, text):
        self.ran.append("echo")
        return text

    def _count(self, n, tags=(), mode="up"):
        self.ran.append("count")
        return {"n": n, "type": type(n).__name__, "tags": list(tags), "mode": mode}

    def _boom(self):
        self.ran.append("boom")
        raise ValueError("kaput")

    def _fail(self):
        raise ToolError("no such thing")

    def _slow(self):
        self.release.wait(10)
        return "late"

    def tools(self):
        return self._tools

    def reset(self, example):
        return Reset(messages=[], tools=[tool.spec for tool in self._tools.values()])

    def score(self, final_answer):
        return Outcome(success=final_answer == "ok", reward=float(final_answer == "ok"))


def _run(task, turns=None, **kwargs):
    """A synthetic environment reset on `task` after replaying `turns` (default: all ground-truth turns)."""
    env = SyntheticEnvironment(**kwargs)
    env.reset(task)
    for turn in ground_truth_calls(task) if turns is None else turns:
        env.step(turn)
    return env


# ----------------------------------------------------------------------------------------------------------------
# Argument checks.
# ----------------------------------------------------------------------------------------------------------------

SPEC = _spec("f", {"a": {"type": "number"}, "n": {"type": "integer"}, "s": {"type": "str"},
                   "flag": {"type": "boolean"}, "mode": {"type": "string", "enum": ["x", "y"]},
                   "xs": {"type": "array", "items": {"type": "integer"}}}, ["a", "n"])


def test_validate_arguments_accepts_and_coerces_json_schema_integers():
    args, error = validate_arguments(SPEC, {"a": 1.5, "n": 3.0, "s": "t", "flag": False, "mode": "y", "xs": [1, 2]})
    assert error is None
    assert args == {"a": 1.5, "n": 3, "s": "t", "flag": False, "mode": "y", "xs": [1, 2]}
    assert type(args["n"]) is int


@pytest.mark.parametrize("arguments, message", [
    ({"a": 1}, "missing required argument(s): 'n'"),
    ({}, "missing required argument(s): 'a', 'n'"),
    ({"a": 1, "n": 2, "zz": 0}, "unexpected argument(s): 'zz' (expected: 'a', 'n', 's', 'flag', 'mode', 'xs')"),
    ({"a": "12", "n": 2}, "argument 'a' must be number, got string '12'"),
    ({"a": 1, "n": 2.5}, "argument 'n' must be integer, got number 2.5"),
    ({"a": 1, "n": True}, "argument 'n' must be integer, got boolean True"),
    ({"a": float("nan"), "n": 1}, "argument 'a' must be number, got non-finite number nan"),
    ({"a": 1, "n": 1, "flag": 1}, "argument 'flag' must be boolean, got integer 1"),
    ({"a": 1, "n": 1, "mode": "z"}, "argument 'mode' must be one of ['x', 'y'], got 'z'"),
    ({"a": 1, "n": 1, "xs": [1, "2"]}, "argument 'xs'[1] must be integer, got string '2'"),
    ([1, 2], "arguments must be a JSON object, got array"),
    ("a=1", "arguments must be a JSON object, got string"),
])
def test_validate_arguments_reports_each_problem(arguments, message):
    args, error = validate_arguments(SPEC, arguments)
    assert args is None
    assert error == message


def test_validate_arguments_lists_all_problems_at_once():
    _, error = validate_arguments(SPEC, {"a": "x", "q": 1})
    assert error == ("missing required argument(s): 'n'; unexpected argument(s): 'q' (expected: 'a', 'n', 's', "
                     "'flag', 'mode', 'xs'); argument 'a' must be number, got string 'x'")


@pytest.mark.parametrize("spec", [
    {"description": "no name", "parameters": {"type": "object", "properties": {}}},
    {"name": "f", "parameters": {"type": "array", "properties": {}}},
    {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "matrix"}}}},
    {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}},
])
def test_bad_tool_specs_are_refused_at_declaration(spec):
    with pytest.raises(SpecError):
        check_spec(spec)
    with pytest.raises(SpecError):
        Tool(spec, lambda: None)


# ----------------------------------------------------------------------------------------------------------------
# Execution: every error path is a result, never an exception.
# ----------------------------------------------------------------------------------------------------------------

def test_a_good_call_returns_its_value_as_text():
    env = _TestEnv()
    step = env.step([ToolCall("echo", {"text": "hi"}), ToolCall("count", {"n": 2.0, "tags": ["a"]})])
    assert step == Step(results=[ToolResult("echo", "hi", False),
                                 ToolResult("count", '{"n": 2, "type": "int", "tags": ["a"], "mode": "up"}', False)],
                        done=False, reward=None)
    assert env.ran == ["echo", "count"]
    assert env.calls_made == 2


def test_unknown_tool_is_an_error_naming_the_available_tools():
    env = _TestEnv()
    [result] = env.step([ToolCall("delete_everything", {})]).results
    assert result == ToolResult("delete_everything", "Error: unknown tool 'delete_everything'; available tools: big, "
                                                     "boom, count, echo, fail, slow", True)
    assert env.ran == []


@pytest.mark.parametrize("arguments, problem", [
    ({}, "missing required argument(s): 'text'"),
    ({"text": 5}, "argument 'text' must be string, got integer 5"),
    ({"text": "a", "extra": 1}, "unexpected argument(s): 'extra' (expected: 'text')"),
])
def test_bad_arguments_are_an_error_and_the_tool_does_not_run(arguments, problem):
    env = _TestEnv()
    [result] = env.step([ToolCall("echo", arguments)]).results
    assert result.error
    assert result.content == f"Error: invalid arguments for echo: {problem}"
    assert env.ran == []


def test_exceptions_inside_tools_become_error_results():
    env = _TestEnv()
    boom, fail, after = env.step([ToolCall("boom"), ToolCall("fail"), ToolCall("echo", {"text": "still"})]).results
    assert boom == ToolResult("boom", "Error: boom failed: ValueError: kaput", True)
    assert fail == ToolResult("fail", "Error: no such thing", True)
    assert after == ToolResult("echo", "still", False)  # later calls of the turn still run


def test_timeout_gives_an_error_and_later_calls_are_not_held_up():
    env = _TestEnv(timeout_s=0.05, max_timeouts=2)
    try:
        start = time.monotonic()
        slow, echo = env.step([ToolCall("slow"), ToolCall("echo", {"text": "next"})]).results
        assert time.monotonic() - start < 2.0
        assert slow == ToolResult("slow", "Error: slow timed out after 0.05 s", True)
        assert echo == ToolResult("echo", "next", False)  # a fresh thread, not queued behind the runaway
        assert env.timeouts == 1 and env.stop_reason is None
        step = env.step([ToolCall("slow"), ToolCall("echo", {"text": "after"})])
        assert step.done  # the second timeout stops the environment: leaked threads are bounded
        assert step.results[0].content == "Error: slow timed out after 0.05 s"
        assert step.results[1] == ToolResult(
            "echo", "Error: not run: the environment stopped after 2 timed-out tool calls", True)
        assert env.ran == ["echo"]
    finally:
        env.release.set()


def test_call_with_timeout_inline_and_threaded():
    assert call_with_timeout(lambda x: x + 1, {"x": 1}, None).value == 2
    assert call_with_timeout(lambda x: x + 1, {"x": 1}, 1.0).value == 2
    outcome = call_with_timeout(lambda: 1 / 0, {}, 1.0)
    assert isinstance(outcome.exception, ZeroDivisionError) and not outcome.timed_out
    release = threading.Event()
    try:
        assert call_with_timeout(lambda: release.wait(10), {}, 0.02).timed_out
    finally:
        release.set()


def test_per_turn_and_per_trajectory_call_budgets():
    env = _TestEnv(max_calls_per_step=2, max_calls=3)
    step = env.step([ToolCall("echo", {"text": str(i)}) for i in range(3)])
    assert [r.content for r in step.results] == ["0", "1", "Error: not run: at most 2 tool calls per turn"]
    assert not step.done
    step = env.step([ToolCall("echo", {"text": "a"}), ToolCall("echo", {"text": "b"})])
    assert [r.content for r in step.results] == [
        "a", "Error: not run: the budget of 3 tool calls for this task is spent"]
    assert step.done and env.calls_made == 3


def test_long_results_are_truncated():
    env = _TestEnv(max_result_chars=10)
    [result] = env.step([ToolCall("big")]).results
    assert result.content == "x" * 10 + "... [truncated 40 characters]"


def test_invalid_limits_are_refused():
    with pytest.raises(ValueError, match="timeout_s"):
        _TestEnv(timeout_s=0)
    with pytest.raises(ValueError, match="max_calls"):
        _TestEnv(max_calls=0)


def test_model_text_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    task = make_task("train", 0, 0)  # a files task
    env = SyntheticEnvironment()
    env.reset(task)
    text = ('<think> x </think>\n<tool_call>\n'
            + json.dumps({"name": "read_file", "parameters": {"path": payload}}) + "\n"
            + json.dumps({"name": "write_file", "parameters": {"path": "evil.txt", "content": payload}}) + "\n"
            + json.dumps({"name": payload, "parameters": {}}) + "\n</tool_call>")
    parsed = parse_turn(text, "toolrl")
    assert parsed.error is None and parsed.calls[0].arguments["path"] == payload
    read, write, unknown = step_parsed(env, parsed).results
    assert read.error and read.content == f"Error: no file {payload!r}; list_files shows the files"
    assert write == ToolResult("write_file", f"wrote {len(payload)} characters to evil.txt", False)
    assert env.state()["files"]["evil.txt"] == payload  # stored as a plain string
    assert unknown.error and unknown.content.startswith(f"Error: unknown tool {payload!r}")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# Parallel stepping.
# ----------------------------------------------------------------------------------------------------------------

def test_execute_batch_in_parallel_equals_a_serial_loop_in_input_order():
    tasks = make_tasks("train", 12, seed=3) + make_tasks("heldout", 12, seed=3)
    calls = [ground_truth_calls(task)[0] + [ToolCall("list_files")] for task in tasks]

    def fresh():
        envs = [SyntheticEnvironment() for _ in tasks]
        for env, task in zip(envs, tasks):
            env.reset(task)
        return envs

    serial_envs, parallel_envs = fresh(), fresh()
    serial = [env.step(c) for env, c in zip(serial_envs, calls)]
    parallel = execute_batch(parallel_envs, calls, max_workers=4)
    assert parallel == serial
    assert [env.state() for env in parallel_envs] == [env.state() for env in serial_envs]
    # Results belong to their own trajectory: the first call's result is each task's own first value.
    first = tasks[0]["ground_truth"][0][0]
    assert first["name"] == "read_file"
    assert parallel[0].results[0].content == tasks[0]["state"]["files"][first["arguments"]["path"]]


def test_execute_batch_refuses_shared_environments_and_mismatched_lengths():
    env = _TestEnv()
    with pytest.raises(ValueError, match="more than once"):
        execute_batch([env, env], [[], []])
    with pytest.raises(ValueError, match="2 environments but 1 call lists"):
        execute_batch([_TestEnv(), _TestEnv()], [[]])
    with pytest.raises(ValueError, match="max_workers"):
        execute_batch([env], [[]], max_workers=0)


# ----------------------------------------------------------------------------------------------------------------
# Parsing tool calls.
# ----------------------------------------------------------------------------------------------------------------

def test_toolrl_turn_with_two_calls_and_a_response():
    text = ('<think> read both </think>\n<tool_call>\n{"name": "read_file", "parameters": {"path": "a.txt"}}\n'
            '{"name": "add", "parameters": {"a": 1, "b": 2.5}}\n</tool_call>\n<response> working </response>')
    parsed = parse_turn(text, "toolrl")
    assert parsed.error is None and parsed.format == "toolrl"
    assert parsed.calls == (ToolCall("read_file", {"path": "a.txt"}), ToolCall("add", {"a": 1, "b": 2.5}))
    assert parsed.final_answer == "working"


def test_toolrl_response_only_is_a_final_answer():
    parsed = parse_toolrl("<think> done </think>\n<response> 42 </response>")
    assert parsed == parse_toolrl("<think> done </think>\n<response> 42 </response>")
    assert (parsed.calls, parsed.final_answer, parsed.error) == ((), "42", None)
    assert parse_toolrl("<response> cut off").final_answer == "cut off"  # truncated generation


@pytest.mark.parametrize("text, error", [
    ("just words", "no <tool_call> or <response> block"),
    ("<tool_call>\n{\"name\": \"f\", \"parameters\": {}}", "found 1 <tool_call> and 0 </tool_call>"),
    ("</tool_call> <tool_call>", "found 1 <tool_call> and 1 </tool_call>"),
    ("<tool_call>\n{\"name\": \"f\", \"parameters\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"g\", "
     "\"parameters\": {}}\n</tool_call>", "found 2 <tool_call> and 2 </tool_call>"),
    ("<tool_call>\n{\"name\": \"f\", \"parameters\": {}}\nnot json\n</tool_call>", "tool_call line 2: JSONDecodeError"),
    ("<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>", "tool_call line 1: expected"),
    ("<tool_call>\n{\"name\": \"\", \"parameters\": {}}\n</tool_call>", "tool_call line 1: expected"),
    ("<tool_call>\n[1, 2]\n</tool_call>", "tool_call line 1: expected"),
    ("<tool_call>\n" + "[" * 100000 + "\n</tool_call>", "tool_call line 1: RecursionError"),
])
def test_malformed_toolrl_turns_give_errors_and_no_calls(text, error):
    parsed = parse_toolrl(text)
    assert parsed.calls == ()
    assert parsed.error is not None and error in parsed.error


def test_hermes_turn_with_several_blocks_and_string_arguments():
    text = ('<tool_call>\n{"name": "read_file", "arguments": {"path": "a.txt"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "multiply", "arguments": "{\\"a\\": 3, \\"b\\": 7}"}\n</tool_call>')
    parsed = parse_hermes(text)
    assert parsed.error is None and parsed.format == "hermes"
    assert parsed.calls == (ToolCall("read_file", {"path": "a.txt"}), ToolCall("multiply", {"a": 3, "b": 7}))
    assert parsed.final_answer is None


def test_hermes_text_without_calls_is_the_final_answer():
    assert parse_hermes("<think> hmm </think>\nThe title is add tests.").final_answer == "The title is add tests."
    assert parse_hermes("   ").final_answer is None


@pytest.mark.parametrize("text, error", [
    ("<tool_call>\n{not json}\n</tool_call>", "<tool_call> block 1: not one JSON object (JSONDecodeError"),
    ('<tool_call>{"name": "f"}</tool_call>', '<tool_call> block 1: missing "arguments"'),
    ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', '"arguments" must be a JSON object, got [1]'),
    ('<tool_call>{"name": "f", "arguments": "x=1"}</tool_call>', '"arguments" is a string but not JSON'),
    ('<tool_call>{"name": "f", "arguments": "[1]"}</tool_call>', '"arguments" must be a JSON object, got [1]'),
    ('<tool_call>{"name": 3, "arguments": {}}</tool_call>', "<tool_call> block 1: expected"),
    ('<tool_call>{"name": "f", "arguments": {}}', "unbalanced or nested tags: 1 <tool_call> and 0 </tool_call>"),
    ('<tool_call><tool_call>{}</tool_call></tool_call>', "unbalanced or nested tags: 2 <tool_call>"),
    ('<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>oops</tool_call>', "block 2: not one JSON"),
])
def test_malformed_hermes_turns_give_errors_and_no_calls(text, error):
    parsed = parse_hermes(text)
    assert parsed.calls == ()
    assert parsed.error is not None and error in parsed.error


def test_auto_format_picks_the_format_that_parses():
    toolrl = '<tool_call>\n{"name": "f", "parameters": {"x": 1}}\n{"name": "g", "parameters": {}}\n</tool_call>'
    hermes = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n' \
             '{"name": "g", "arguments": {}}\n</tool_call>'
    for text, fmt in ((toolrl, "toolrl"), (hermes, "hermes")):
        parsed = parse_turn(text)
        assert parsed.format == fmt and parsed.error is None
        assert parsed.calls == (ToolCall("f", {"x": 1}), ToolCall("g", {}))
    broken_hermes = parse_turn('<tool_call>{"name": "f", "arguments": [1]}</tool_call>')
    assert broken_hermes.format == "hermes" and "must be a JSON object" in broken_hermes.error
    broken_toolrl = parse_turn('<tool_call>\n{"name": "f"}\n</tool_call>')
    assert broken_toolrl.format == "toolrl" and "tool_call line 1" in broken_toolrl.error
    with pytest.raises(ValueError, match="unknown tool-call format 'xml'"):
        parse_turn("", "xml")


@pytest.mark.parametrize("garbage", [None, 17, "", "<tool_call>", "</tool_call>", "<<<>>>{}", "\x00\xff" * 50,
                                     "<tool_call>\n" + "9" * 5000 + "\n</tool_call>"])
def test_parsing_garbage_never_raises(garbage):
    for fmt in ("toolrl", "hermes", "auto"):
        parsed = parse_turn(garbage, fmt)
        assert parsed.calls == ()
        assert parsed.error is not None or parsed.final_answer is not None or garbage in ("", None)


@pytest.mark.parametrize("fmt", ["toolrl", "hermes"])
def test_format_calls_round_trips(fmt):
    calls = [ToolCall("read_file", {"path": "a.txt"}), ToolCall("add", {"a": 1, "b": 2})]
    assert parse_turn(format_calls(calls, fmt), fmt).calls == tuple(calls)
    assert parse_turn(format_calls(calls, fmt), "auto").calls == tuple(calls)


def test_results_rendered_for_the_model():
    results = [ToolResult("read_file", "12"), ToolResult("add", "Error: bad", True)]
    assert render_observation(results) == "<obs> read_file: 12\nadd: Error: bad </obs>"
    assert tool_messages(results) == [{"role": "tool", "name": "read_file", "content": "12"},
                                      {"role": "tool", "name": "add", "content": "Error: bad"}]


def test_malformed_text_becomes_one_error_result_and_nothing_runs():
    env = _TestEnv()
    step = step_parsed(env, parse_turn("<tool_call>\n{oops}\n</tool_call>", "toolrl"))
    assert step.results == [parse_error_result("tool_call line 1: JSONDecodeError: Expecting property name "
                                               "enclosed in double quotes: line 1 column 2 (char 1)")]
    assert step.results[0].content.startswith("Error: could not parse your tool calls: tool_call line 1")
    assert step.results[0].error and not step.done
    assert env.calls_made == 0 and env.ran == []
    ok = step_parsed(env, parse_turn('<tool_call>\n{"name": "echo", "parameters": {"text": "y"}}\n</tool_call>'))
    assert ok.results == [ToolResult("echo", "y", False)]


# ----------------------------------------------------------------------------------------------------------------
# The synthetic environment.
# ----------------------------------------------------------------------------------------------------------------

HAND_TASK = {
    "env": "synthetic", "id": "hand", "kind": "scale_file", "request": "Read a.txt, multiply by 7, write out.txt.",
    "tools": ["read_file", "write_file", "multiply"],
    "state": {"files": {"a.txt": "6"}, "tickets": []},
    "expected_state": {"files": {"a.txt": "6", "out.txt": "42"}, "tickets": []},
    "expected_answer": None,
    "ground_truth": [[{"name": "read_file", "arguments": {"path": "a.txt"}}],
                     [{"name": "multiply", "arguments": {"a": 6, "b": 7}}],
                     [{"name": "write_file", "arguments": {"path": "out.txt", "content": "42"}}]],
}


def test_hand_written_task_succeeds_and_a_wrong_value_fails():
    env = SyntheticEnvironment()
    env.reset(HAND_TASK)
    assert env.step([ToolCall("read_file", {"path": "a.txt"})]).results == [ToolResult("read_file", "6")]
    assert env.step([ToolCall("multiply", {"a": 6, "b": 7})]).results == [ToolResult("multiply", "42")]
    assert env.step([ToolCall("write_file", {"path": "out.txt", "content": "42.0"})]).results == [
        ToolResult("write_file", "wrote 4 characters to out.txt")]
    assert env.score(None).success  # "42.0" equals "42" as a number
    env.step([ToolCall("write_file", {"path": "out.txt", "content": "41"})])
    outcome = env.score("done")
    assert outcome == Outcome(False, 0.0, {"kind": "scale_file", "state_match": False, "answer_match": None,
                                           "state_diff": ["file out.txt holds '41', expected '42'"], "calls_made": 4})


def test_synthetic_tools_compute_and_fail_as_documented():
    env = SyntheticEnvironment()
    env.reset({**HAND_TASK, "tools": ["add", "multiply", "get_ticket", "close_ticket", "create_ticket",
                                      "list_tickets", "list_files"],
               "state": {"files": {"b.txt": "1", "a.txt": "2"},
                         "tickets": [{"id": 4, "title": "t", "assignee": "bob", "status": "closed"}]}})
    results = env.step([ToolCall("multiply", {"a": 2.5, "b": 2}), ToolCall("add", {"a": 0.1, "b": 0.2}),
                        ToolCall("list_files"), ToolCall("close_ticket", {"id": 4}),
                        ToolCall("get_ticket", {"id": 9}), ToolCall("create_ticket", {"title": "n", "assignee": "x"}),
                        ToolCall("list_tickets", {"assignee": "bob", "status": "done"})]).results
    assert [r.content for r in results] == [
        "5", "0.3", '["a.txt", "b.txt"]', "Error: ticket 4 is already closed", "Error: no ticket with id 9",
        '{"id": 5}', "Error: invalid arguments for list_tickets: argument 'status' must be one of ['open', "
                     "'closed'], got 'done'"]
    assert [r.error for r in results] == [False, False, False, True, True, False, True]


def test_tasks_are_deterministic_and_seed_dependent():
    assert make_tasks("train", 20, seed=5) == make_tasks("train", 20, seed=5)
    assert make_tasks("heldout", 20, seed=5) == make_tasks("heldout", 20, seed=5)
    assert make_tasks("train", 20, seed=5) != make_tasks("train", 20, seed=6)
    assert make_tasks("train", 30, seed=1)[:10] == make_tasks("train", 10, seed=1)  # a prefix does not depend on count


def test_first_train_task_is_pinned():
    """String seeds hash with sha512, so tasks are the same in every process; this pins one against drift."""
    task = make_task("train", 0, 0)
    assert task["id"] == "synthetic-train-0-0" and task["kind"] == "scale_file" and task["seen_kind"]
    assert task["request"] == ("Read the file d.txt; it holds a number. Multiply that number by 3 and write the "
                               "result to out.txt.")
    assert task["state"] == {"files": {"b.txt": "11", "d.txt": "7"}, "tickets": []}
    assert task["expected_state"]["files"]["out.txt"] == "21"  # 7 * 3
    assert task["ground_truth"] == [[{"name": "read_file", "arguments": {"path": "d.txt"}}],
                                    [{"name": "multiply", "arguments": {"a": 7, "b": 3}}],
                                    [{"name": "write_file", "arguments": {"path": "out.txt", "content": "21"}}]]
    assert task["tools"] == ["list_files", "read_file", "write_file", "add", "multiply"]


def test_same_calls_give_same_results_and_states():
    for task in make_tasks("heldout", 16, seed=2):
        runs = []
        for _ in range(2):
            env = SyntheticEnvironment()
            env.reset(task)
            results = [env.step(turn) for turn in ground_truth_calls(task)]
            runs.append((results, env.state(), env.score(task["expected_answer"])))
        assert runs[0] == runs[1]


def _tasks():
    return [task for seed in (0, 1) for split in ("train", "heldout") for task in make_tasks(split, 24, seed)]


def test_every_task_is_solved_by_replaying_its_ground_truth_and_the_kind_bookkeeping_is_right():
    for task in _tasks():
        env = _run(task)
        outcome = env.score(task["expected_answer"])
        assert outcome.success and outcome.reward == 1.0, (task["id"], outcome.details)
        assert env.state() == task["expected_state"]
        assert 2 <= sum(len(turn) for turn in task["ground_truth"]) <= 4
        assert 2 <= len(task["ground_truth"]) <= 3


def test_every_task_fails_when_the_final_state_or_answer_is_wrong():
    for task in _tasks():
        turns = ground_truth_calls(task)
        if task["expected_answer"] is None:  # state tasks: the last turn changes the state
            partial = _run(task, turns[:-1]).score(None)
            assert not partial.success and not partial.details["state_match"], task["id"]
        else:
            env = _run(task)
            assert not env.score(None).success and not env.score("wrong").success
            assert env.score(" " + task["expected_answer"].upper() + ". ").success  # loose answer match
        extra = _run(task)
        extra.step([ToolCall("write_file", {"path": "junk.txt", "content": "1"})]) if "write_file" in task["tools"] \
            else extra.step([ToolCall("create_ticket", {"title": "junk", "assignee": "bob"})])
        outcome = extra.score(task["expected_answer"])
        assert not outcome.success and outcome.details["state_diff"][0].startswith("unexpected"), task["id"]


def test_generated_numbers_match_the_requests():
    """Recompute the expected files from the request text and initial state, independently of the generator."""
    checked = 0
    for task in _tasks():
        files, want = task["state"]["files"], task["expected_state"]["files"]
        request = task["request"]
        if task["kind"] == "scale_file":
            src, k, dst = re.fullmatch(r"Read the file (\S+); it holds a number\. Multiply that number by (\d+) and "
                                       r"write the result to (\S+)\.", request).groups()
            assert want[dst] == str(int(files[src]) * int(k))
        elif task["kind"] == "sum_files":
            a, b, dst = re.fullmatch(r"The files (\S+) and (\S+) each hold a number\. Add the two numbers and write "
                                     r"the sum to (\S+)\.", request).groups()
            assert want[dst] == str(int(files[a]) + int(files[b]))
        elif task["kind"] == "add_to_file":
            src, c, dst = re.fullmatch(r"Read the number in (\S+), add (\d+) to it, and write the result to (\S+)\.",
                                       request).groups()
            assert want[dst] == str(int(files[src]) + int(c))
        elif task["kind"] == "product_answer":
            a, b = re.match(r"The files (\S+) and (\S+) each", request).groups()
            assert task["expected_answer"] == str(int(files[a]) * int(files[b]))
        else:
            continue
        checked += 1
    assert checked >= 40


def test_train_and_heldout_are_disjoint():
    train = [task for seed in range(3) for task in make_tasks("train", 200, seed)]
    heldout = [task for seed in range(3) for task in make_tasks("heldout", 200, seed)]
    assert {task["kind"] for task in train} == set(TRAIN_KINDS)
    assert {task["kind"] for task in heldout} == set(TRAIN_KINDS) | set(HELDOUT_KINDS)
    assert not set(TRAIN_KINDS) & set(HELDOUT_KINDS)
    for field in ("files", "outputs", "users", "titles", "numbers", "factors", "addends"):
        assert not set(getattr(POOLS["train"], field)) & set(getattr(POOLS["heldout"], field)), field
    assert not {task["request"] for task in train} & {task["request"] for task in heldout}
    dump = lambda task: json.dumps([task["state"], task["ground_truth"]], sort_keys=True)  # noqa: E731
    assert not {dump(task) for task in train} & {dump(task) for task in heldout}
    assert not {task["id"] for task in train} & {task["id"] for task in heldout}


def test_tasks_round_trip_through_jsonl(tmp_path):
    tasks = make_tasks("heldout", 8, seed=4)
    path = write_tasks(tasks, tmp_path / "tasks" / "heldout.jsonl")
    assert path.read_text().count("\n") == 8
    back = read_tasks(path)
    assert back == tasks
    assert _run(back[3]).score(back[3]["expected_answer"]).success
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n\n[1]\n')
    with pytest.raises(ValueError, match="bad.jsonl:3: a task must be a JSON object"):
        read_tasks(tmp_path / "bad.jsonl")


def test_reset_builds_toolrl_messages_and_leaves_the_example_alone():
    task = make_task("train", 2, 0)  # close_ticket
    before = copy.deepcopy(task)
    env = SyntheticEnvironment()
    reset = env.reset(task)
    _run(task)
    assert task == before
    assert reset.call_format == "toolrl"
    assert [tool["name"] for tool in reset.tools] == ["list_tickets", "get_ticket", "create_ticket", "close_ticket"]
    system, user = reset.messages
    assert system["role"] == "system" and system["content"].startswith(SYSTEM_HEADER)
    assert "1. Name: list_tickets\n" in system["content"] and "read_file" not in system["content"]
    assert user == {"role": "user", "content": f"{HISTORY_HEADER}\n<user> {task['request']} </user>"}
    # Tools of other groups are not declared for this task.
    [result] = env.step([ToolCall("read_file", {"path": "a.txt"})]).results
    assert result.error and result.content.startswith("Error: unknown tool 'read_file'")


def test_compact_and_hermes_prompt_styles():
    task = make_task("train", 0, 0)
    compact = SyntheticEnvironment(prompt_style="compact").reset(task)
    assert compact.messages[0]["content"].startswith(COMPACT_HEADER + "1. Name: list_files\n")
    assert "<obs>" in compact.messages[0]["content"]
    hermes = SyntheticEnvironment(prompt_style="hermes").reset(task)
    assert hermes.call_format == "hermes"
    assert hermes.messages[1] == {"role": "user", "content": task["request"]}
    assert [t["name"] for t in hermes.tools] == task["tools"]
    assert hermes.tools[1]["parameters"]["required"] == ["path"]
    with pytest.raises(ValueError, match="unknown prompt_style 'xml'"):
        SyntheticEnvironment(prompt_style="xml")


def test_reference_turns_parse_back_to_the_ground_truth_and_suit_the_toolrl_reward():
    for task in make_tasks("heldout", 8, seed=0):
        calls = ground_truth_calls(task)
        toolrl = reference_turns(task, "toolrl")
        hermes = reference_turns(task, "hermes")
        assert len(toolrl) == len(hermes) == len(calls) + 1
        for text_t, text_h, turn in zip(toolrl, hermes, calls):
            assert parse_turn(text_t, "toolrl").calls == tuple(turn)
            assert parse_turn(text_h, "hermes").calls == tuple(turn)
            gt = parse_ground_truth(text_t)  # raises on a ground truth the reward cannot use
            assert gt.has_tool_call and [c["name"] for c in gt.calls] == [c.name for c in turn]
        answer = task["expected_answer"] or "Done."
        assert parse_turn(toolrl[-1], "toolrl").final_answer == answer
        assert parse_turn(hermes[-1], "hermes").final_answer == answer


def test_bad_task_data_raises():
    env = SyntheticEnvironment()
    with pytest.raises(ValueError, match="lacks \\['expected_state'\\]"):
        env.reset({k: v for k, v in HAND_TASK.items() if k != "expected_state"})
    with pytest.raises(ValueError, match="unknown tools \\['rm'\\]"):
        env.reset({**HAND_TASK, "tools": ["rm"]})
    with pytest.raises(ValueError, match="unknown split 'test'"):
        make_tasks("test", 1)


def test_same_text():
    assert same_text("84.0", " 84 ")
    assert not same_text("8", "84")
    assert same_text('"Update Docs."', "update docs", answer=True)
    assert not same_text("Update Docs", "update docs")  # state contents are case-sensitive


# ----------------------------------------------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------------------------------------------

def test_registry():
    env = make_environment("synthetic", prompt_style="compact", timeout_s=0.5)
    assert isinstance(env, SyntheticEnvironment) and env.prompt_style == "compact" and env.timeout_s == 0.5
    assert make_environment("synthetic") is not make_environment("synthetic")
    assert ENVIRONMENT_NAMES == ("none", "synthetic", "bfcl") and set(ENVIRONMENTS) == {"synthetic", "bfcl"}
    with pytest.raises(ValueError, match=r"unknown environment 'nope'; known environments: \['bfcl', 'synthetic'\]"):
        make_environment("nope")
    with pytest.raises(ValueError, match="single-turn task"):
        make_environment("none")


def test_minimal_prompt_lists_signatures_in_under_half_the_compact_prompt():
    task = make_tasks("train", 1, seed=0)[0]
    minimal = SyntheticEnvironment(prompt_style="minimal").reset(task)
    compact = SyntheticEnvironment(prompt_style="compact").reset(task)
    text = minimal.messages[0]["content"]
    assert minimal.call_format == "toolrl" and minimal.messages[1] == compact.messages[1]
    assert "- read_file(path: string): Read the text of a file." in text
    assert all(f"- {name}(" in text for name in task["tools"]) and "<think>" in text and "<response>" in text
    assert len(text) < len(compact.messages[0]["content"]) / 2
