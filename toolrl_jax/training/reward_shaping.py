"""The rewards a step trains on: the reward functions' result (`CombinedReward.score`), plus DAPO's overlong
penalty, reweighted part by part; and what a group's advantage is computed from (the total, or each part under
per-component normalisation).

The additive parts of a reward (`reward_parts`) are the reward functions' (`CombinedReward.parts`: the built-in
ToolRL reward's format, correctness and length, every other function's score) and "overlong" when the penalty is
on, each with its weight: the function's weight times `GRPOConfig.component_weights`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from toolrl_jax.rewards.functions import CombinedReward, RewardResult
from toolrl_jax.rl.shaping import overlong_penalty

OVERLONG = "overlong"  # the penalty's column (logged as reward/overlong) and part name


def shape_rewards(rewards: RewardResult, samples: Any, config: Any, reward_fns: CombinedReward) -> RewardResult:
    """`rewards` with the overlong penalty of `samples.lengths` added (a column "overlong") when
    `config.overlong_buffer` is set, and the total recomputed as the weighted sum of the parts when
    `config.reward_component_weights` is; unchanged otherwise. config: a GRPOConfig."""
    if config.overlong_buffer:
        penalty = overlong_penalty(samples.lengths, config.max_response_length, config.overlong_buffer,
                                   config.overlong_penalty_factor)
        rewards = dataclasses.replace(rewards, total=rewards.total + penalty,
                                      components={**rewards.components, OVERLONG: penalty})
    if config.component_weights:
        parts = reward_parts(rewards, reward_fns, config)
        rewards = dataclasses.replace(rewards, total=sum(weight * column for column, weight in parts.values()))
    return rewards


def reward_parts(rewards: RewardResult, reward_fns: CombinedReward, config: Any
                 ) -> dict[str, tuple[np.ndarray, float]]:
    """{part name: (unweighted column [N], weight)} of `rewards` (module doc)."""
    parts = reward_fns.parts(rewards)
    if OVERLONG in rewards.components:
        parts[OVERLONG] = (rewards.components[OVERLONG], 1.0)
    weights = config.component_weights
    return {name: (column, weight * weights.get(name, 1.0)) for name, (column, weight) in parts.items()}


def part_names(reward_fns: CombinedReward, config: Any) -> list[str]:
    """The names `reward_parts` will have for these reward functions and config."""
    return reward_fns.part_names() + ([OVERLONG] if config.overlong_buffer else [])


def check_component_weights(config: Any, reward_fns: CombinedReward) -> None:
    """ValueError naming reward_component_weights when it weighs a part the reward does not have."""
    names = part_names(reward_fns, config)
    unknown = sorted(set(config.component_weights) - set(names))
    if unknown:
        raise ValueError(f"GRPOConfig: reward_component_weights names {unknown}, which the reward does not have; its "
                         f"parts are {names}")


def advantage_signal(rewards: RewardResult, reward_fns: CombinedReward, config: Any) -> np.ndarray:
    """[K, N] what the group advantages are computed from: the total [1, N], or under per-component normalisation
    every part with a non-zero weight. A group whose columns are all constant within it has no advantage."""
    if config.advantage_normalization != "per_component":
        return np.asarray(rewards.total)[None]
    parts = reward_parts(rewards, reward_fns, config)
    return np.stack([column for column, weight in parts.values() if weight != 0]
                    or [np.zeros_like(rewards.total)])
