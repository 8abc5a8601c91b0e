"""The advantages stage: advantage estimators keyed by name, the seam where new estimators plug in.

An estimator turns a step's outcome rewards and log-probs into per-token advantages (and any extra per-row arrays
its update needs, e.g. PPO's old values and returns). Register one with `@register_estimator("name")`; the learner
picks it by `GRPOConfig.estimator` ("grpo" for GRPO, "gae" for the PPO baseline). Following veRL's
`core_algos` estimator registry and tunix's learner-specific `compute_advantages`: the estimator sees a read-only
context and returns arrays; the math itself lives in `toolrl_jax.rl.advantages` and the critic.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax.numpy as jnp
import numpy as np

from toolrl_jax.rl.advantages import broadcast_to_tokens, grpo_advantages, kl_penalized_scores


@dataclasses.dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may read. outcome [N] (the reward functions' total), mask [N, R] (1 on response tokens),
    old_logp / ref_logp [N, R] (ref None without a KL term), rows: the step's training rows, config: GRPOConfig,
    critic: the PPO critic (None for critic-free estimators)."""

    outcome: np.ndarray
    mask: np.ndarray
    old_logp: np.ndarray
    ref_logp: Optional[np.ndarray]
    rows: dict[str, np.ndarray]
    config: Any
    critic: Any = None


@dataclasses.dataclass(frozen=True)
class Advantages:
    """token [N, R] float32 advantages (0 on padding); per_row [N] (for logging); scores [N] the shaped rewards the
    advantages came from; extra_rows: per-row arrays the update needs besides the advantages."""

    token: np.ndarray
    per_row: Any
    scores: Any
    extra_rows: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


Estimator = Callable[[AdvantageInputs], Advantages]
ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    """Decorator: registers an estimator under `name` (names are unique)."""
    def decorator(fn: Estimator) -> Estimator:
        if name in ESTIMATORS and ESTIMATORS[name] is not fn:
            raise ValueError(f"an advantage estimator named {name!r} is already registered")
        ESTIMATORS[name] = fn
        return fn
    return decorator


def get_estimator(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; registered: {sorted(ESTIMATORS)}")
    return ESTIMATORS[name]


def kl_shaped_scores(inputs: AdvantageInputs) -> Any:
    """The outcome minus beta * sum(old - ref) when the KL is folded into the reward (the original), else the
    outcome."""
    c = inputs.config
    outcome = jnp.asarray(inputs.outcome, jnp.float32)
    if c.kl_in_reward and inputs.ref_logp is not None:
        return kl_penalized_scores(outcome, jnp.asarray(inputs.old_logp), jnp.asarray(inputs.ref_logp),
                                   jnp.asarray(inputs.mask), c.kl_coef)
    return outcome


@register_estimator("grpo")
def grpo_estimator(inputs: AdvantageInputs) -> Advantages:
    """GRPO: each response's shaped score normalised within its prompt's group (`rl.advantages.grpo_advantages`),
    on every response token."""
    c = inputs.config
    scores = kl_shaped_scores(inputs)
    adv = grpo_advantages(scores, c.group_size, normalize_by_std=c.normalize_adv_by_std)
    token = np.asarray(broadcast_to_tokens(adv, jnp.asarray(inputs.mask)))
    return Advantages(token=token.astype(np.float32), per_row=adv, scores=scores)


@register_estimator("gae")
def gae_estimator(inputs: AdvantageInputs) -> Advantages:
    """PPO (the paper's baseline): GAE over token rewards (the outcome on the last token, minus the per-token KL
    when it is folded into the reward) with the critic's values; the update gets the old values and returns."""
    c, critic = inputs.config, inputs.critic
    if critic is None:
        raise ValueError("the 'gae' estimator needs a critic (GRPOConfig.algorithm='ppo')")
    values = critic.values(inputs.rows, c.micro_batch_rows)
    fold = c.kl_in_reward and inputs.ref_logp is not None
    token, returns = critic.advantages(inputs.outcome, inputs.mask, values, inputs.old_logp if fold else None,
                                       inputs.ref_logp if fold else None, c.kl_coef if fold else 0.0)
    token = np.asarray(token)
    per_row = jnp.asarray(token.sum(1) / np.maximum(inputs.mask.sum(1), 1))  # per-row mean, for logging
    return Advantages(token=token.astype(np.float32), per_row=per_row, scores=kl_shaped_scores(inputs),
                      extra_rows={"old_values": np.asarray(values, np.float32),
                                  "returns": np.asarray(returns, np.float32)})
