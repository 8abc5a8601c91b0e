"""A built-in executable environment with small in-memory tools, and a seeded generator of multi-step tasks.

Tools (JSON-schema specs in `TOOL_SPECS`), in three groups a task exposes as needed:

* files: list_files(), read_file(path), write_file(path, content) over an in-memory {path: text} store;
* calculator: add(a, b), multiply(a, b) on numbers (plain arithmetic, nothing is evaluated);
* tickets: list_tickets(assignee, status?), get_ticket(id), create_ticket(title, assignee), close_ticket(id).

Every task needs 2-4 dependent calls over 2-3 turns: a later call's arguments come from an earlier call's result
(a number read from a file, a ticket id found by a search). A task is a JSON dict holding the request, the initial
state, the expected final state, an optional expected final answer, and the ground-truth calls as a list of turns
(so a per-turn ToolRL reward can be computed). `score` compares the final state (and answer) with the expected one.

Splits: "train" uses four task kinds; "heldout" uses those four plus four kinds never trained on, and every task in
it draws file names, user names, ticket titles and numbers from pools disjoint from the train pools, so no held-out
task can equal a train task. Numbers stay small and names short so that a ~135M model can learn some of the tasks.
The ToolRL prompt style renders the tools with the project's ToolRL system prompt (toolrl_jax.datasets.format).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
from collections.abc import Callable, Mapping
from typing import Any

from toolrl_jax.datasets.format import (
    SYSTEM_FOOTER,
    SYSTEM_HEADER,
    ToolSpec,
    format_assistant_turn,
    format_user,
    prompt_messages,
    render_system_prompt,
)
from toolrl_jax.environments.calls import format_calls
from toolrl_jax.environments.execution import Tool, ToolEnvironment, ToolError
from toolrl_jax.environments.protocol import Outcome, Reset, ToolCall

ENV_NAME = "synthetic"
SPLITS = ("train", "heldout")
PROMPT_STYLES = ("toolrl", "compact", "hermes", "minimal")
DONE_RESPONSE = "Done."  # the reference final answer of tasks judged on their final state alone

COMPACT_HEADER = "You can call these tools:\n"
COMPACT_FOOTER = (
    "\n\nTo call tools, answer as\n"
    "<think> reasoning </think>\n"
    "<tool_call>\n"
    '{"name": "tool name", "parameters": {"key": "value"}}\n'
    "</tool_call>\n"
    "with one line per call. Results come back as <obs> ... </obs>. When the task is done, answer as\n"
    "<think> reasoning </think>\n"
    "<response> answer </response>")
HERMES_SYSTEM = ("You are a helpful assistant. Use the tools to complete the user's task, one step at a time. "
                 "When it is done, reply with a short final answer and no tool call.")


def _prop(type_: str, description: str, **extra: Any) -> dict[str, Any]:
    return {"type": type_, "description": description, **extra}


def _spec(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"name": name, "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required}}


_PATH = _prop("string", "File path, e.g. a.txt.")
_NUMBER_A, _NUMBER_B = _prop("number", "First number."), _prop("number", "Second number.")
_TICKET_ID = _prop("integer", "Ticket id.")
TOOL_SPECS: dict[str, dict[str, Any]] = {spec["name"]: spec for spec in [
    _spec("list_files", "List the paths of all files.", {}, []),
    _spec("read_file", "Read the text of a file.", {"path": _PATH}, ["path"]),
    _spec("write_file", "Write text to a file, replacing what it held.",
          {"path": _PATH, "content": _prop("string", "The text to write.")}, ["path", "content"]),
    _spec("add", "Add two numbers.", {"a": _NUMBER_A, "b": _NUMBER_B}, ["a", "b"]),
    _spec("multiply", "Multiply two numbers.", {"a": _NUMBER_A, "b": _NUMBER_B}, ["a", "b"]),
    _spec("list_tickets", "List the ids of the tickets assigned to a person, optionally only open or closed ones.",
          {"assignee": _prop("string", "Person's name."),
           "status": _prop("string", "open or closed.", enum=["open", "closed"])}, ["assignee"]),
    _spec("get_ticket", "Get a ticket's title, assignee and status.", {"id": _TICKET_ID}, ["id"]),
    _spec("create_ticket", "Create an open ticket; returns its id.",
          {"title": _prop("string", "Ticket title."), "assignee": _prop("string", "Person's name.")},
          ["title", "assignee"]),
    _spec("close_ticket", "Close an open ticket.", {"id": _TICKET_ID}, ["id"]),
]}
TOOL_GROUPS: dict[str, tuple[str, ...]] = {
    "files": ("list_files", "read_file", "write_file"),
    "calculator": ("add", "multiply"),
    "tickets": ("list_tickets", "get_ticket", "create_ticket", "close_ticket"),
}


# ----------------------------------------------------------------------------------------------------------------
# State and tools.
# ----------------------------------------------------------------------------------------------------------------

def _tidy(value: int | float) -> int | float:
    """Integral floats as ints (2.0 * 3 -> 6), others rounded to 10 decimals (0.1 + 0.2 -> 0.3)."""
    if isinstance(value, float) and math.isfinite(value):
        return int(value) if value.is_integer() and abs(value) < 2 ** 53 else round(value, 10)
    return value


class SyntheticState:
    """The mutable world of one trajectory: {path: text} files and a list of tickets. Its methods are the tools."""

    def __init__(self, state: Mapping[str, Any]) -> None:
        self.files: dict[str, str] = dict(copy.deepcopy(state.get("files", {})))
        self.tickets: list[dict[str, Any]] = copy.deepcopy(list(state.get("tickets", [])))

    def snapshot(self) -> dict[str, Any]:
        """A JSON copy of the state (files sorted by path, tickets by id)."""
        return {"files": dict(sorted(self.files.items())),
                "tickets": sorted(copy.deepcopy(self.tickets), key=lambda t: t["id"])}

    def _ticket(self, ticket_id: int) -> dict[str, Any]:
        for ticket in self.tickets:
            if ticket["id"] == ticket_id:
                return ticket
        raise ToolError(f"no ticket with id {ticket_id}")

    def list_files(self) -> list[str]:
        return sorted(self.files)

    def read_file(self, path: str) -> str:
        if path not in self.files:
            raise ToolError(f"no file {path!r}; list_files shows the files")
        return self.files[path]

    def write_file(self, path: str, content: str) -> str:
        if not path.strip():
            raise ToolError("path must not be empty")
        self.files[path] = content
        return f"wrote {len(content)} characters to {path}"

    def add(self, a: int | float, b: int | float) -> int | float:
        return _tidy(a + b)

    def multiply(self, a: int | float, b: int | float) -> int | float:
        return _tidy(a * b)

    def list_tickets(self, assignee: str, status: str | None = None) -> list[int]:
        return sorted(t["id"] for t in self.tickets
                      if t["assignee"] == assignee and (status is None or t["status"] == status))

    def get_ticket(self, id: int) -> dict[str, Any]:  # noqa: A002 - the tool's parameter name
        return dict(self._ticket(id))

    def create_ticket(self, title: str, assignee: str) -> dict[str, int]:
        new_id = max((t["id"] for t in self.tickets), default=0) + 1
        self.tickets.append({"id": new_id, "title": title, "assignee": assignee, "status": "open"})
        return {"id": new_id}

    def close_ticket(self, id: int) -> str:  # noqa: A002
        ticket = self._ticket(id)
        if ticket["status"] == "closed":
            raise ToolError(f"ticket {id} is already closed")
        ticket["status"] = "closed"
        return f"closed ticket {id}"


# ----------------------------------------------------------------------------------------------------------------
# Comparing states and answers.
# ----------------------------------------------------------------------------------------------------------------

def _as_number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def same_text(got: str, want: str, *, answer: bool = False) -> bool:
    """Equal up to surrounding/repeated whitespace, or equal as numbers ("84" == "84.0"). answer=True also ignores
    case, surrounding quotes and a final period, as a final answer may be phrased loosely."""
    def norm(text: str) -> str:
        text = " ".join(text.split())
        if answer:
            text = text.strip("\"'`").rstrip(".").strip().casefold()
        return text

    got_n, want_n = norm(got), norm(want)
    if got_n == want_n:
        return True
    got_v, want_v = _as_number(got_n), _as_number(want_n)
    return got_v is not None and want_v is not None and got_v == want_v


def state_differences(got: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two state snapshots (empty when they match)."""
    diffs = []
    got_files, want_files = got["files"], want["files"]
    for path in sorted(set(got_files) | set(want_files)):
        if path not in got_files:
            diffs.append(f"file {path} missing")
        elif path not in want_files:
            diffs.append(f"unexpected file {path}")
        elif not same_text(got_files[path], want_files[path]):
            diffs.append(f"file {path} holds {got_files[path][:40]!r}, expected {want_files[path][:40]!r}")
    got_tickets = {t["id"]: t for t in got["tickets"]}
    want_tickets = {t["id"]: t for t in want["tickets"]}
    for ticket_id in sorted(set(got_tickets) | set(want_tickets)):
        have, need = got_tickets.get(ticket_id), want_tickets.get(ticket_id)
        if have is None:
            diffs.append(f"ticket {ticket_id} missing")
        elif need is None:
            diffs.append(f"unexpected ticket {ticket_id}")
        else:
            for key in ("title", "assignee", "status"):
                equal = same_text(have[key], need[key]) if key == "title" else have[key] == need[key]
                if not equal:
                    diffs.append(f"ticket {ticket_id} {key} is {have[key]!r}, expected {need[key]!r}")
    return diffs


# ----------------------------------------------------------------------------------------------------------------
# The environment.
# ----------------------------------------------------------------------------------------------------------------

_TASK_KEYS = ("request", "tools", "state", "expected_state", "expected_answer", "ground_truth")


MINIMAL_FOOTER = ("\nAnswer with <think> reasoning </think>, then either calls, one per line, in <tool_call>\n"
                  "{\"name\": \"tool\", \"parameters\": {...}}\n</tool_call> (results come back as <obs> ... </obs>), "
                  "or, when done, <response> answer </response>.")


def minimal_prompt(specs: list[dict[str, Any]]) -> str:
    """The tools as one-line signatures, `name(param: type, ...): description`, and the call format in two
    sentences: the shortest prompt (a third of the compact one's tokens), for CPU-sized runs."""
    lines = []
    for spec in specs:
        params = ", ".join(f"{name}: {prop.get('type', 'any')}" for name, prop in
                           spec["parameters"].get("properties", {}).items())
        lines.append(f"- {spec['name']}({params}): {spec['description']}")
    return "Tools:\n" + "\n".join(lines) + MINIMAL_FOOTER


def system_prompt(specs: list[dict[str, Any]], prompt_style: str) -> str:
    """The system prompt listing `specs`: ToolRL's full prompt, a compact variant, one-line signatures ("minimal"),
    or a short Hermes-style one (the chat template then lists the tools)."""
    if prompt_style == "hermes":
        return HERMES_SYSTEM
    if prompt_style == "minimal":
        return minimal_prompt(specs)
    tools = [ToolSpec.from_raw(spec) for spec in specs]
    if prompt_style == "compact":
        return render_system_prompt(tools, COMPACT_HEADER, COMPACT_FOOTER)
    return render_system_prompt(tools, SYSTEM_HEADER, SYSTEM_FOOTER)


class SyntheticEnvironment(ToolEnvironment):
    """One trajectory of a synthetic task (see the module docstring). Tools are exposed per task (its `tools`
    list); a call to any other name is an unknown-tool error.

    prompt_style: "toolrl" (ToolRL's system prompt and history layout), "compact" (a short instruction block,
      same call format), "minimal" (one-line tool signatures, same call format) or "hermes" (short system prompt;
      tools go to the chat template; Hermes call format).
    Other keyword arguments are ToolEnvironment's limits; the tools are instant, so the timeout is short.
    """

    def __init__(self, *, prompt_style: str = "toolrl", timeout_s: float | None = 1.0, **limits: Any) -> None:
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"unknown prompt_style {prompt_style!r}; expected one of {PROMPT_STYLES}")
        super().__init__(timeout_s=timeout_s, **limits)
        self.prompt_style = prompt_style
        self.example: dict[str, Any] | None = None
        self.world: SyntheticState | None = None
        self._tools: dict[str, Tool] = {}

    def reset(self, example: Mapping[str, Any]) -> Reset:
        """Load the task's initial state (a copy: the example is never changed) and build its opening messages.
        Raises ValueError on a malformed task (task data, not model output)."""
        missing = [key for key in _TASK_KEYS if key not in example]
        if missing:
            raise ValueError(f"synthetic task {example.get('id')!r} lacks {missing}")
        unknown = [name for name in example["tools"] if name not in TOOL_SPECS]
        if unknown:
            raise ValueError(f"synthetic task {example.get('id')!r} lists unknown tools {unknown}")
        self.example = copy.deepcopy(dict(example))
        self.world = SyntheticState(example["state"])
        self._tools = {name: Tool(TOOL_SPECS[name], getattr(self.world, name)) for name in example["tools"]}
        self.calls_made, self.timeouts, self.stop_reason = 0, 0, None
        specs = [copy.deepcopy(TOOL_SPECS[name]) for name in example["tools"]]
        system = system_prompt(specs, self.prompt_style)
        if self.prompt_style == "hermes":
            messages = [{"role": "system", "content": system}, {"role": "user", "content": example["request"]}]
            return Reset(messages=messages, tools=specs, call_format="hermes")
        return Reset(messages=prompt_messages(system, [format_user(example["request"])]), tools=specs,
                     call_format="toolrl")

    def tools(self) -> Mapping[str, Tool]:
        return self._tools

    def state(self) -> dict[str, Any]:
        """The current state snapshot (JSON)."""
        if self.world is None:
            raise RuntimeError("reset() first")
        return self.world.snapshot()

    def score(self, final_answer: str | None) -> Outcome:
        """Success when the final state equals the expected one and, for tasks that ask a question, the final
        answer equals the expected answer (loosely, see `same_text`). Reward 1.0 on success, else 0.0."""
        if self.example is None:
            raise RuntimeError("reset() first")
        diffs = state_differences(self.state(), self.example["expected_state"])
        expected_answer = self.example["expected_answer"]
        answer_ok = None if expected_answer is None else \
            (final_answer is not None and same_text(final_answer, expected_answer, answer=True))
        success = not diffs and answer_ok is not False
        details = {"kind": self.example.get("kind"), "state_match": not diffs, "answer_match": answer_ok,
                   "state_diff": diffs[:8], "calls_made": self.calls_made}
        return Outcome(success=success, reward=1.0 if success else 0.0, details=details)


# ----------------------------------------------------------------------------------------------------------------
# Tasks.
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Pools:
    """The values one split draws from; train and held-out pools are disjoint, so their tasks are too."""

    files: tuple[str, ...]
    outputs: tuple[str, ...]
    users: tuple[str, ...]
    titles: tuple[str, ...]
    numbers: tuple[int, ...]
    factors: tuple[int, ...]
    addends: tuple[int, ...]


POOLS = {
    "train": Pools(files=("a.txt", "b.txt", "c.txt", "d.txt", "notes/x.txt", "notes/y.txt"),
                   outputs=("out.txt", "res.txt"), users=("bob", "ann", "joe", "kim"),
                   titles=("fix login", "update docs", "add tests", "clean logs"),
                   numbers=tuple(range(2, 13)), factors=tuple(range(2, 6)), addends=tuple(range(1, 10))),
    "heldout": Pools(files=("m.txt", "n.txt", "p.txt", "q.txt", "notes/u.txt", "notes/v.txt"),
                     outputs=("new.txt", "ans.txt"), users=("eve", "max", "sue", "tom"),
                     titles=("renew cert", "move server", "check backup", "rotate keys"),
                     numbers=tuple(range(13, 21)), factors=tuple(range(6, 10)), addends=tuple(range(10, 20))),
}


@dataclasses.dataclass(frozen=True)
class _Draft:
    """A task before bookkeeping: what a kind's generator returns."""

    request: str
    groups: tuple[str, ...]
    state: dict[str, Any]
    expected_state: dict[str, Any]
    ground_truth: list[list[ToolCall]]
    expected_answer: str | None = None


def _state(files: Mapping[str, str] | None = None, tickets: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"files": dict(sorted((files or {}).items())), "tickets": sorted(tickets or [], key=lambda t: t["id"])}


def _call(name: str, **arguments: Any) -> ToolCall:
    return ToolCall(name, arguments)


def _tickets_for(rng: random.Random, pools: Pools, user: str) -> tuple[list[dict[str, Any]], int]:
    """Three tickets: one open for `user` (the target, whose id is returned), one closed for `user`, one open for
    someone else; ids 1-3 in random order, distinct titles."""
    other = rng.choice([u for u in pools.users if u != user])
    titles = rng.sample(pools.titles, 3)
    ids = rng.sample([1, 2, 3], 3)
    tickets = [{"id": ids[0], "title": titles[0], "assignee": user, "status": "open"},
               {"id": ids[1], "title": titles[1], "assignee": user, "status": "closed"},
               {"id": ids[2], "title": titles[2], "assignee": other, "status": "open"}]
    return tickets, ids[0]


def _scale_file(rng: random.Random, pools: Pools) -> _Draft:
    src, other = rng.sample(pools.files, 2)
    dst, x, y, k = rng.choice(pools.outputs), rng.choice(pools.numbers), rng.choice(pools.numbers), \
        rng.choice(pools.factors)
    files = {src: str(x), other: str(y)}
    return _Draft(
        request=f"Read the file {src}; it holds a number. Multiply that number by {k} and write the result to {dst}.",
        groups=("files", "calculator"), state=_state(files), expected_state=_state({**files, dst: str(x * k)}),
        ground_truth=[[_call("read_file", path=src)], [_call("multiply", a=x, b=k)],
                      [_call("write_file", path=dst, content=str(x * k))]])


def _sum_files(rng: random.Random, pools: Pools) -> _Draft:
    a, b, other = rng.sample(pools.files, 3)
    dst = rng.choice(pools.outputs)
    x, y, z = (rng.choice(pools.numbers) for _ in range(3))
    files = {a: str(x), b: str(y), other: str(z)}
    return _Draft(
        request=f"The files {a} and {b} each hold a number. Add the two numbers and write the sum to {dst}.",
        groups=("files", "calculator"), state=_state(files), expected_state=_state({**files, dst: str(x + y)}),
        ground_truth=[[_call("read_file", path=a), _call("read_file", path=b)], [_call("add", a=x, b=y)],
                      [_call("write_file", path=dst, content=str(x + y))]])


def _close_ticket(rng: random.Random, pools: Pools) -> _Draft:
    user = rng.choice(pools.users)
    tickets, target = _tickets_for(rng, pools, user)
    closed = [{**t, "status": "closed"} if t["id"] == target else t for t in tickets]
    return _Draft(
        request=f"Close the open ticket assigned to {user}.", groups=("tickets",), state=_state(tickets=tickets),
        expected_state=_state(tickets=closed),
        ground_truth=[[_call("list_tickets", assignee=user, status="open")], [_call("close_ticket", id=target)]])


def _ticket_title(rng: random.Random, pools: Pools) -> _Draft:
    user = rng.choice(pools.users)
    tickets, target = _tickets_for(rng, pools, user)
    title = next(t["title"] for t in tickets if t["id"] == target)
    return _Draft(
        request=f"What is the title of the open ticket assigned to {user}? Answer with the title only.",
        groups=("tickets",), state=_state(tickets=tickets), expected_state=_state(tickets=tickets),
        ground_truth=[[_call("list_tickets", assignee=user, status="open")], [_call("get_ticket", id=target)]],
        expected_answer=title)


def _add_to_file(rng: random.Random, pools: Pools) -> _Draft:
    src, other = rng.sample(pools.files, 2)
    dst, x, y, c = rng.choice(pools.outputs), rng.choice(pools.numbers), rng.choice(pools.numbers), \
        rng.choice(pools.addends)
    files = {src: str(x), other: str(y)}
    return _Draft(
        request=f"Read the number in {src}, add {c} to it, and write the result to {dst}.",
        groups=("files", "calculator"), state=_state(files), expected_state=_state({**files, dst: str(x + c)}),
        ground_truth=[[_call("read_file", path=src)], [_call("add", a=x, b=c)],
                      [_call("write_file", path=dst, content=str(x + c))]])


def _file_to_ticket(rng: random.Random, pools: Pools) -> _Draft:
    src, other = rng.sample(pools.files, 2)
    user = rng.choice(pools.users)
    title, *others = rng.sample(pools.titles, 3)
    existing = [{"id": 1, "title": others[0], "assignee": rng.choice(pools.users), "status": "open"},
                {"id": 2, "title": others[1], "assignee": rng.choice(pools.users), "status": "closed"}]
    files = {src: title, other: others[0]}
    created = {"id": 3, "title": title, "assignee": user, "status": "open"}
    return _Draft(
        request=f"The file {src} holds a task title. Create a ticket with that title assigned to {user}.",
        groups=("files", "tickets"), state=_state(files, existing), expected_state=_state(files, existing + [created]),
        ground_truth=[[_call("read_file", path=src)], [_call("create_ticket", title=title, assignee=user)]])


def _title_to_file(rng: random.Random, pools: Pools) -> _Draft:
    user = rng.choice(pools.users)
    tickets, target = _tickets_for(rng, pools, user)
    title = next(t["title"] for t in tickets if t["id"] == target)
    dst = rng.choice(pools.outputs)
    return _Draft(
        request=f"Write the title of ticket {target} to {dst}.", groups=("files", "tickets"),
        state=_state({}, tickets), expected_state=_state({dst: title}, tickets),
        ground_truth=[[_call("get_ticket", id=target)], [_call("write_file", path=dst, content=title)]])


def _product_answer(rng: random.Random, pools: Pools) -> _Draft:
    a, b = rng.sample(pools.files, 2)
    x, y = rng.choice(pools.numbers), rng.choice(pools.numbers)
    files = {a: str(x), b: str(y)}
    return _Draft(
        request=f"The files {a} and {b} each hold a number. What is their product? Answer with the number only.",
        groups=("files", "calculator"), state=_state(files), expected_state=_state(files),
        ground_truth=[[_call("read_file", path=a), _call("read_file", path=b)], [_call("multiply", a=x, b=y)]],
        expected_answer=str(x * y))


TRAIN_KINDS: dict[str, Callable[[random.Random, Pools], _Draft]] = {
    "scale_file": _scale_file, "sum_files": _sum_files, "close_ticket": _close_ticket, "ticket_title": _ticket_title}
HELDOUT_KINDS: dict[str, Callable[[random.Random, Pools], _Draft]] = {
    "add_to_file": _add_to_file, "file_to_ticket": _file_to_ticket, "title_to_file": _title_to_file,
    "product_answer": _product_answer}


def make_task(split: str, index: int, seed: int = 0) -> dict[str, Any]:
    """Task `index` of `split` for `seed` (deterministic: the same arguments always give the same task). Kinds
    cycle in a fixed order: train over TRAIN_KINDS, heldout over TRAIN_KINDS then HELDOUT_KINDS."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    kinds = dict(TRAIN_KINDS) if split == "train" else {**TRAIN_KINDS, **HELDOUT_KINDS}
    kind = list(kinds)[index % len(kinds)]
    rng = random.Random(f"{ENV_NAME}/{split}/{seed}/{index}")  # str seeds hash deterministically (sha512)
    draft = kinds[kind](rng, POOLS[split])
    tools = [name for group in draft.groups for name in TOOL_GROUPS[group]]
    return {
        "env": ENV_NAME,
        "id": f"{ENV_NAME}-{split}-{seed}-{index}",
        "split": split,
        "kind": kind,
        "seen_kind": kind in TRAIN_KINDS,
        "request": draft.request,
        "tools": tools,
        "state": draft.state,
        "expected_state": draft.expected_state,
        "expected_answer": draft.expected_answer,
        "ground_truth": [[call.to_json() for call in turn] for turn in draft.ground_truth],
    }


def make_tasks(split: str = "train", count: int = 100, seed: int = 0) -> list[dict[str, Any]]:
    """`count` tasks of `split` (JSON dicts; see make_task)."""
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    return [make_task(split, index, seed) for index in range(count)]


def ground_truth_calls(example: Mapping[str, Any]) -> list[list[ToolCall]]:
    """The task's reference calls, one list per assistant turn."""
    return [[ToolCall.from_json(call) for call in turn] for turn in example["ground_truth"]]


def reference_turns(example: Mapping[str, Any], call_format: str = "toolrl") -> list[str]:
    """The reference assistant turns as text: one per tool-call turn, then the final answer turn (the expected
    answer, or DONE_RESPONSE). ToolRL turns use the layout and placeholder thoughts of ToolRL's ground truths, so
    the single-turn ToolRL reward can score each turn against them."""
    answer = example["expected_answer"] if example["expected_answer"] is not None else DONE_RESPONSE
    turns = ground_truth_calls(example)
    if call_format == "toolrl":
        return [format_assistant_turn(calls=[(c.name, c.arguments) for c in turn]) for turn in turns] + \
            [format_assistant_turn(response=answer)]
    if call_format == "hermes":
        return [format_calls(turn, "hermes") for turn in turns] + [answer]
    raise ValueError(f"unknown call format {call_format!r}; expected 'toolrl' or 'hermes'")
