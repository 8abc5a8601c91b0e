"""Example user reward functions (a test fixture for `--reward_fn=tests.reward_fns_example:NAME`): one per output
form the protocol accepts, and one per error it must report clearly. Module level, so they pickle for the pool."""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from toolrl_jax.rewards.functions import RewardOutput

NOT_CALLABLE = 3


def length_bonus(responses: Sequence[str], ground_truths: Sequence[str], step: int) -> list[float]:
    """A plain list: 1 per 100 characters, capped at 1."""
    return [min(len(r) / 100.0, 1.0) for r in responses]


def tags(responses: Sequence[str], ground_truths: Sequence[str], step: int) -> dict[str, Any]:
    """A dict: the score plus two logged components."""
    think = np.array(["<think>" in r for r in responses], dtype=float)
    call = np.array(["<tool_call>" in r for r in responses], dtype=float)
    return {"score": think + 2 * call, "think": think, "call": call}


def step_scaled(responses: Sequence[str], ground_truths: Sequence[str], step: int) -> RewardOutput:
    """A RewardOutput whose score is the step (checks that the step is passed through)."""
    return RewardOutput(np.full(len(responses), float(step)), {"matches_gt": [float(r == g) for r, g in
                                                                               zip(responses, ground_truths)]})


def prompt_turns(responses: Sequence[str], ground_truths: Sequence[str], step: int, *,
                 examples: Sequence[Any] | None = None) -> list[float]:
    """Takes `examples`: the number of prompt messages of each response's example (-1 without examples)."""
    if examples is None:
        return [-1.0] * len(responses)
    return [float(len(e.prompt_messages)) for e in examples]


def process_id(responses: Sequence[str], ground_truths: Sequence[str], step: int) -> list[int]:
    """The id of the process that scored each response (shows where the pool ran a function)."""
    return [os.getpid()] * len(responses)


def raises(responses: Sequence[str], ground_truths: Sequence[str], step: int) -> list[float]:
    raise RuntimeError("boom in the user's reward")


def wrong_shape(responses: Sequence[str], ground_truths: Sequence[str], step: int) -> list[float]:
    return [0.0] * (len(responses) + 1)


def returns_nan(responses: Sequence[str], ground_truths: Sequence[str], step: int) -> list[float]:
    return [0.0] * (len(responses) - 1) + [float("nan")]


def returns_str(responses: Sequence[str], ground_truths: Sequence[str], step: int) -> str:
    return "1.0"


def no_score(responses: Sequence[str], ground_truths: Sequence[str], step: int) -> dict[str, list[float]]:
    return {"reward": [1.0] * len(responses)}


def two_args(responses: Sequence[str], ground_truths: Sequence[str]) -> list[float]:
    return [0.0] * len(responses)
