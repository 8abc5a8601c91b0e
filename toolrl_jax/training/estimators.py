"""The advantages stage: advantage estimators keyed by name, the seam where new estimators plug in.

An estimator turns a step's outcome rewards and log-probs into per-token advantages (and any extra per-row arrays
its update needs, e.g. PPO's old values and returns). Register one with `@register_estimator("name")`; the learner
picks it by `GRPOConfig.estimator` ("grpo" for GRPO, "gae" for the PPO baseline; "rloo" and "reinforce_plus_plus"
critic-free alternatives). Following veRL's
`core_algos` estimator registry and tunix's learner-specific `compute_advantages`: the estimator sees a read-only
context and returns arrays; the math itself lives in `toolrl_jax.rl.advantages` and the critic.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from toolrl_jax.rl.advantages import (
    broadcast_to_tokens,
    grpo_advantages,
    kl_penalized_scores,
    per_component_advantages,
    reinforce_plus_plus_advantages,
    rloo_advantages,
)

GROUP_ESTIMATORS = ("grpo", "rloo")  # a baseline from the prompt's group: an all-equal group has no advantage


@dataclasses.dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may read. outcome [N] (the reward functions' total), mask [N, R] (1 on response tokens),
    old_logp / ref_logp [N, R] (ref None without a KL term), rows: the step's training rows, config: GRPOConfig,
    critic: the PPO critic (None for critic-free estimators), components: under per-component normalisation, the
    reward's additive parts {name: (unweighted column [N], weight)} (`training.reward_shaping.reward_parts`)."""

    outcome: np.ndarray
    mask: np.ndarray
    old_logp: np.ndarray
    ref_logp: Optional[np.ndarray]
    rows: dict[str, np.ndarray]
    config: Any
    critic: Any = None
    components: Optional[Mapping[str, tuple[np.ndarray, float]]] = None


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
    on every response token; per component first with `components` (`rl.advantages.per_component_advantages`)."""
    return _group_estimator(inputs, "grpo")


@register_estimator("rloo")
def rloo_estimator(inputs: AdvantageInputs) -> Advantages:
    """RLOO: each response's shaped score minus the mean of its group's other responses
    (`rl.advantages.rloo_advantages`), on every response token."""
    return _group_estimator(inputs, "rloo")


def _group_estimator(inputs: AdvantageInputs, kind: str) -> Advantages:
    c = inputs.config
    scores = kl_shaped_scores(inputs)
    if inputs.components is not None:
        columns = jnp.asarray(np.stack([column for column, _ in inputs.components.values()]), jnp.float32)
        weights = jnp.asarray([weight for _, weight in inputs.components.values()], jnp.float32)
        adv = per_component_advantages(columns, weights, c.group_size, kind, c.normalize_adv_by_std)
    elif kind == "rloo":
        adv = rloo_advantages(scores, c.group_size)
    else:
        adv = grpo_advantages(scores, c.group_size, normalize_by_std=c.normalize_adv_by_std)
    token = np.asarray(broadcast_to_tokens(adv, jnp.asarray(inputs.mask)))
    return Advantages(token=token.astype(np.float32), per_row=adv, scores=scores)


def _token_advantages(token: Any, inputs: AdvantageInputs, **extra_rows: np.ndarray) -> Advantages:
    """Advantages from per-token values [N, R] (logged per row as their mean over the row's tokens)."""
    token = np.asarray(token)
    per_row = jnp.asarray(token.sum(1) / np.maximum(inputs.mask.sum(1), 1))
    return Advantages(token=token.astype(np.float32), per_row=per_row, scores=kl_shaped_scores(inputs),
                      extra_rows=extra_rows)


@register_estimator("reinforce_plus_plus")
def reinforce_plus_plus_estimator(inputs: AdvantageInputs) -> Advantages:
    """REINFORCE++ (`rl.advantages.reinforce_plus_plus_advantages`): the per-token KL (when folded into the reward)
    and the outcome as token rewards, discounted returns (gamma = the critic config's, --gae_gamma), whitened over
    the step's response tokens."""
    c = inputs.config
    fold = c.kl_in_reward and inputs.ref_logp is not None
    kl = jnp.asarray(inputs.old_logp - inputs.ref_logp) if fold else None
    token, _ = reinforce_plus_plus_advantages(jnp.asarray(inputs.outcome, jnp.float32), jnp.asarray(inputs.mask), kl,
                                              c.kl_coef if fold else 0.0, c.critic.gamma)
    return _token_advantages(token, inputs)


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
    return _token_advantages(token, inputs, old_values=np.asarray(values, np.float32),
                             returns=np.asarray(returns, np.float32))
