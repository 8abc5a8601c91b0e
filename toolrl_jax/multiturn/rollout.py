"""Multi-turn trajectory rollouts: the model generates, its tool calls run on the host, their results are appended,
and the model continues, for a batch of trajectories advancing in lockstep.

Each turn makes one generation call for every trajectory still running (key = the rollout key on turn 0, so a
one-turn rollout samples exactly what a plain `Sampler.generate` call with that key does, and `fold_in(key, turn)`
afterwards), with row budgets min(per-turn cap, tokens left in the trajectory's budget). The turns are parsed
(environments.calls), the calls of all trajectories run in parallel host threads (`execute_batch`), and each result
is appended as template tokens (templates.IncrementalChat: the model's own tokens are never re-tokenized).

A trajectory ends, with `finish_reason`:

* "answer": a complete turn without tool calls (its final answer is scored; in a multi-user-turn environment,
  the answer to its last user turn: earlier answers open the next user turn, `Environment.multi_user_turns`);
* "max_turns": the turn limit was reached; calls in the last turn are not run (as in veRL's agent loop: no turn
  would read their results);
* "env_done": the environment ended it (e.g. its call budget is spent); the results are not appended;
* "length": a turn hit its token budget without a stop token (per-turn cap or what was left of the trajectory's
  budget); an incomplete turn cannot be continued, and its calls are not run;
* "budget": the template tokens of the tool results would not fit in the trajectory's budget (leaving at least one
  token for the next turn); they are not appended, so the response ends at the model's stop token;
* "stop_token": the model stopped on a stop token that ends the text rather than the turn (e.g. <|endoftext|>
  where the template closes turns with <|im_end|>); its calls are not run.

"length" and "budget" set `truncated`. The loss mask is 1 exactly on the model's tokens (each turn's stop token
included), never on tool results or template text; the sampler's log-probs are kept aligned to the response (0
where the mask is 0). Peers: veRL's multi-turn `AsyncRolloutRequest` (loss mask over assistant tokens only,
tool-response tokens masked out), TRL's tool-calling `GRPOTrainer` environment mode (tool results appended between
generations) and Tunix's multi-turn agentic rollouts (trajectories stepped in batches with per-turn records).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from toolrl_jax.environments.calls import TurnParse, parse_error_result, parse_turn, render_observation, tool_messages
from toolrl_jax.environments.execution import execute_batch
from toolrl_jax.environments.protocol import Environment, Outcome, Reset, Step, ToolCall, ToolResult
from toolrl_jax.multiturn.generation import GenerateFn, Generation
from toolrl_jax.multiturn.templates import IncrementalChat

CALL_FORMATS = ("auto", "toolrl", "hermes")
FINISH_REASONS = ("answer", "max_turns", "env_done", "length", "budget", "stop_token")
TRUNCATING_REASONS = ("length", "budget")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"MultiTurnConfig.{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MultiTurnConfig:
    """How trajectories are rolled out.

    max_turns: assistant turns per trajectory at most.
    max_total_tokens: response budget of a whole trajectory: model and tool/template tokens after the prompt.
    max_new_tokens_per_turn: token cap of one assistant turn (its stop token included).
    tool_workers: host threads stepping environments in parallel (1: serial; results are the same).
    call_format: "auto" (each environment's `Reset.call_format`), or "toolrl" / "hermes" for every trajectory.
      It selects how turns are parsed and how results are written back: ToolRL `<obs>` user messages, or Hermes
      `tool` role messages with the tool specs passed to the chat template.
    """

    max_turns: int = 4
    max_total_tokens: int = 2048
    max_new_tokens_per_turn: int = 256
    tool_workers: int = 8
    call_format: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_total_tokens", "max_new_tokens_per_turn", "tool_workers"):
            _positive_int(name, getattr(self, name))
        if self.call_format not in CALL_FORMATS:
            raise ValueError(f"MultiTurnConfig.call_format must be one of {CALL_FORMATS}, got {self.call_format!r}")


@dataclasses.dataclass(frozen=True)
class TurnRecord:
    """One assistant turn of a trajectory.

    text: the model's text (without the stop token); calls: the calls it asked for (empty for an answer or a
    malformed turn); results: what came back (the parse error's message for a malformed turn; empty when nothing
    ran); num_errors: error results; parse_error: why the call text was malformed (None when fine);
    final_answer: the answer the turn gave, if any; stopped: ended with a stop token; num_tokens: model tokens incl.
    the stop token; generation_s: wall time of the turn's batched generation call (shared by its rows);
    tool_s: this trajectory's own environment step time.
    """

    text: str
    calls: tuple[ToolCall, ...]
    results: tuple[ToolResult, ...]
    num_errors: int
    parse_error: str | None
    final_answer: str | None
    stopped: bool
    num_tokens: int
    generation_s: float
    tool_s: float


@dataclasses.dataclass(frozen=True, eq=False)
class Trajectory:
    """A finished trajectory, ready for a policy-gradient update.

    prompt_ids [P] int32: the rendered opening prompt. response_ids [R] int32: everything after it, model tokens and
    tool/template tokens interleaved. loss_mask [R] int32: 1 exactly on model tokens (stop tokens included).
    logprobs [R] float32: the sampler's log-probs, 0 where the mask is 0. turns: per-turn records. outcome: the
    environment's verdict on `final_answer` (the last answer any turn gave). finish_reason: see FINISH_REASONS;
    truncated: cut by a token budget. messages: the conversation as chat messages (the prompt, each assistant turn
    and the tool results appended after it); tools: the specs given to the chat template (None for ToolRL prompts).
    """

    prompt_ids: np.ndarray
    response_ids: np.ndarray
    loss_mask: np.ndarray
    logprobs: np.ndarray
    turns: tuple[TurnRecord, ...]
    outcome: Outcome
    final_answer: str | None
    finish_reason: str
    truncated: bool
    call_format: str
    messages: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...] | None

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    @property
    def reward(self) -> float:
        return self.outcome.reward

    @property
    def success(self) -> bool:
        return self.outcome.success


def follow_up_messages(results: Sequence[ToolResult], call_format: str) -> list[dict[str, str]]:
    """The messages that carry a turn's results back: one ToolRL `<obs>` user message, or Hermes `tool` messages."""
    if call_format == "hermes":
        return tool_messages(results)
    return [{"role": "user", "content": render_observation(results)}]


class _TimedEnvironment(Environment):
    """Delegates to an environment and records how long its last `step` took (for per-trajectory tool time)."""

    def __init__(self, env: Environment) -> None:
        self.env = env
        self.seconds = 0.0

    def reset(self, example: Mapping[str, Any]) -> Reset:
        return self.env.reset(example)

    def step(self, calls: Sequence[ToolCall]) -> Step:
        start = time.perf_counter()
        try:
            return self.env.step(calls)
        finally:
            self.seconds = time.perf_counter() - start

    def score(self, final_answer: str | None) -> Outcome:
        return self.env.score(final_answer)


class _Run:
    """The mutable state of one trajectory while the batch advances."""

    def __init__(self, env: Environment, example: Mapping[str, Any], tokenizer: Any, config: MultiTurnConfig) -> None:
        self.env = _TimedEnvironment(env)
        reset = env.reset(example)
        self.call_format = reset.call_format if config.call_format == "auto" else config.call_format
        if self.call_format not in ("toolrl", "hermes"):
            raise ValueError(f"environment {type(env).__name__} asked for call format {self.call_format!r}; "
                             "expected 'toolrl' or 'hermes'")
        self.tools = tuple(reset.tools) if self.call_format == "hermes" and reset.tools else None
        self.chat = IncrementalChat(tokenizer, self.tools)
        self.messages: list[dict[str, Any]] = [dict(m) for m in reset.messages]
        self.prompt_ids = self.chat.encode(self.chat.prompt_text(self.messages))
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.logprobs: list[float] = []
        self.turns: list[TurnRecord] = []
        self.final_answer: str | None = None
        self.finish_reason: str | None = None
        self.budget = config.max_total_tokens

    @property
    def remaining(self) -> int:
        return self.budget - len(self.ids)

    def add(self, ids: Sequence[int], logprobs: Sequence[float] | None) -> None:
        """Append model tokens (logprobs given: mask 1) or template tokens (None: mask 0, log-prob 0)."""
        self.ids.extend(int(i) for i in ids)
        self.mask.extend([0 if logprobs is None else 1] * len(ids))
        self.logprobs.extend([0.0] * len(ids) if logprobs is None else [float(x) for x in logprobs])

    def finish(self, reason: str) -> None:
        self.finish_reason = reason


@dataclasses.dataclass(frozen=True)
class _Pending:
    """A turn whose tool calls (or parse error) are being answered."""

    run: _Run
    generation: Generation
    text: str
    parsed: TurnParse
    generation_s: float


def _decoded(generation: Generation, tokenizer: Any) -> str:
    if generation.text is not None:
        return generation.text
    ids = generation.token_ids[:-1] if generation.stopped else generation.token_ids
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def _check_generations(generations: Sequence[Generation], budgets: Sequence[int]) -> None:
    if len(generations) != len(budgets):
        raise ValueError(f"generate returned {len(generations)} rows for {len(budgets)} prompts")
    for row, (generation, budget) in enumerate(zip(generations, budgets)):
        n = len(generation.token_ids)
        if not 1 <= n <= budget or len(generation.logprobs) != n:
            raise ValueError(f"generate row {row}: {n} tokens and {len(generation.logprobs)} log-probs for a budget "
                             f"of {budget} (expected 1..budget tokens, one log-prob each)")


def _record(pending: _Pending, results: Sequence[ToolResult], tool_s: float) -> TurnRecord:
    generation = pending.generation
    return TurnRecord(text=pending.text, calls=pending.parsed.calls, results=tuple(results),
                      num_errors=sum(result.error for result in results), parse_error=pending.parsed.error,
                      final_answer=pending.parsed.final_answer, stopped=bool(generation.stopped),
                      num_tokens=len(generation.token_ids), generation_s=pending.generation_s, tool_s=tool_s)


def _absorb(run: _Run, generation: Generation, text: str, turn: int, config: MultiTurnConfig,
            generation_s: float) -> _Pending | None:
    """Append a generated turn and decide what happens next: a _Pending when its calls (or its parse error) must
    be answered, None when the trajectory ended (its record is written here)."""
    run.add(generation.token_ids, generation.logprobs)
    parsed = parse_turn(text, run.call_format)
    if parsed.final_answer is not None:
        run.final_answer = parsed.final_answer
    pending = _Pending(run, generation, text, parsed, generation_s)
    if not generation.stopped:
        reason = "length"
    elif parsed.error is None and not parsed.calls and not run.env.env.multi_user_turns:
        reason = "answer"
    elif turn + 1 >= config.max_turns:
        reason = "max_turns"
    elif not run.chat.closes_turn(run.messages, text, int(generation.token_ids[-1]), turn):
        reason = "stop_token"
    else:
        return pending
    run.turns.append(_record(pending, (), 0.0))
    run.messages.append({"role": "assistant", "content": text})
    run.finish(reason)
    return None


def _answer(pending: _Pending, step: Step, tool_s: float, turn: int) -> None:
    """Write a turn's results back (template tokens, mask 0) or end the trajectory when they cannot be."""
    run, text = pending.run, pending.text
    run.turns.append(_record(pending, step.results, tool_s))
    answered = not pending.parsed.calls and pending.parsed.error is None  # a multi-user-turn task's answer
    follow_up = (list(getattr(step, "user_messages", ())) if answered
                 else follow_up_messages(step.results, run.call_format))
    if step.done or (answered and not follow_up):
        run.messages.append({"role": "assistant", "content": text})
        run.finish("answer" if answered else "env_done")
        return
    delta = run.chat.delta_ids(run.messages, text, int(pending.generation.token_ids[-1]), follow_up, turn)
    run.messages.append({"role": "assistant", "content": text})
    if len(delta) >= run.remaining:  # the next turn needs at least one token
        run.finish("budget")
        return
    run.add(delta, None)
    run.messages.extend(follow_up)


def _turn_key(key: jax.Array, turn: int) -> jax.Array:
    return key if turn == 0 else jax.random.fold_in(key, turn)


def run_trajectories(generate: GenerateFn, tokenizer: Any, envs: Sequence[Environment],
                     examples: Sequence[Mapping[str, Any]], config: MultiTurnConfig,
                     key: jax.Array | int, row_ids: Sequence[tuple[int, int]] | None = None) -> list[Trajectory]:
    """Roll out one trajectory per (env, example) pair, in lockstep; returns them in input order.

    envs: one fresh environment per trajectory (reset here with its example; the caller closes them). For GRPO,
    repeat each example group_size times with one environment each and give row_ids = (task, sample) per
    trajectory (default: (position, 0)). Deterministic for a given key: a trajectory's rows are keyed by (turn key,
    its row id), so they do not depend on which trajectories are still running, and tool results do not depend on
    tool_workers. Raises TemplatePrefixError when the tokenizer's chat template cannot be extended turn by turn.
    """
    if len(envs) != len(examples):
        raise ValueError(f"{len(envs)} environments but {len(examples)} examples")
    row_ids = [(j, 0) for j in range(len(examples))] if row_ids is None else [tuple(r) for r in row_ids]
    if len(row_ids) != len(examples):
        raise ValueError(f"{len(row_ids)} row ids for {len(examples)} examples")
    if len({id(env) for env in envs}) != len(envs):
        raise ValueError("an environment appears more than once; use one environment per trajectory")
    if isinstance(key, (int, np.integer)):
        key = jax.random.key(int(key))
    runs = [_Run(env, example, tokenizer, config) for env, example in zip(envs, examples)]
    for turn in range(config.max_turns):
        active = [j for j, run in enumerate(runs) if run.finish_reason is None]
        if not active:
            break
        budgets = [min(config.max_new_tokens_per_turn, runs[j].remaining) for j in active]
        start = time.perf_counter()
        generations = list(generate([runs[j].prompt_ids + runs[j].ids for j in active], budgets,
                                    _turn_key(key, turn), [row_ids[j] for j in active]))
        active = [runs[j] for j in active]
        generation_s = time.perf_counter() - start
        _check_generations(generations, budgets)
        pending = [_absorb(run, generation, _decoded(generation, tokenizer), turn, config, generation_s)
                   for run, generation in zip(active, generations)]
        pending = [p for p in pending if p is not None]
        to_run = [p for p in pending if p.parsed.error is None]
        steps = execute_batch([p.run.env for p in to_run], [list(p.parsed.calls) for p in to_run],
                              max_workers=config.tool_workers)
        stepped = {id(p): step for p, step in zip(to_run, steps)}
        for p in pending:
            if p.parsed.error is not None:
                _answer(p, Step(results=[parse_error_result(p.parsed.error)]), 0.0, turn)
            else:
                _answer(p, stepped[id(p)], p.run.env.seconds, turn)
    for run in runs:
        if run.finish_reason is None:  # defensive: every path above ends a trajectory by its last turn
            run.finish("max_turns")
    return [_trajectory(run) for run in runs]


def _trajectory(run: _Run) -> Trajectory:
    outcome = run.env.score(run.final_answer)
    return Trajectory(
        prompt_ids=np.asarray(run.prompt_ids, np.int32), response_ids=np.asarray(run.ids, np.int32),
        loss_mask=np.asarray(run.mask, np.int32), logprobs=np.asarray(run.logprobs, np.float32),
        turns=tuple(run.turns), outcome=outcome, final_answer=run.final_answer, finish_reason=run.finish_reason,
        truncated=run.finish_reason in TRUNCATING_REASONS, call_format=run.call_format,
        messages=tuple(run.messages), tools=run.tools)
