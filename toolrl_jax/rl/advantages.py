"""Advantage estimators: GRPO group normalisation, RLOO, REINFORCE++ and PPO's GAE, plus the KL-in-reward shaping.

Conventions: rollouts are prompt-major ([num_prompts * group_size] rows, prompt i's samples at rows
i*n .. i*n+n-1); token arrays are [N, T] over the response with `mask` = 1 on valid response tokens (including the
end-of-turn token) and 0 on padding. Everything is pure jnp, jit-friendly, and exact under masking.
"""
from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from toolrl_jax.rl.masked import masked_sum, masked_whiten


def kl_penalized_scores(outcome_rewards: jax.Array, logp_old: jax.Array, logp_ref: jax.Array,
                        mask: jax.Array, beta: float) -> jax.Array:
    """Per-response score = outcome reward - beta * sum over valid tokens of (logp_old - logp_ref).

    This is ToolRL's KL penalty folded into the reward (k1 estimator, beta = 0.001 in the paper). With
    beta = 0 it returns the outcome rewards unchanged. Shapes: rewards [N], log-probs and mask [N, T].
    """
    chex.assert_rank([outcome_rewards, logp_old, logp_ref, mask], [1, 2, 2, 2])
    chex.assert_equal_shape([logp_old, logp_ref, mask])
    chex.assert_equal(outcome_rewards.shape[0], mask.shape[0])
    kl = masked_sum(logp_old.astype(jnp.float32) - logp_ref.astype(jnp.float32), mask, axis=-1)
    return outcome_rewards.astype(jnp.float32) - beta * kl


def grpo_advantages(scores: jax.Array, group_size: int, eps: float = 1e-6,
                    normalize_by_std: bool = True) -> jax.Array:
    """GRPO advantages A_i = (s_i - mean_group) / (std_group + eps) with the UNBIASED (N-1) std.

    `scores` is [num_prompts * group_size], prompt-major. A group of one uses mean 0 and std 1, so A = s
    (the original veRL behaviour). `normalize_by_std=False` gives the mean-centred variant (Dr. GRPO).
    """
    chex.assert_rank(scores, 1)
    if group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(f"grpo_advantages: {scores.shape[0]} scores do not split into groups of {group_size}")
    s = scores.astype(jnp.float32)
    if group_size == 1:
        return s
    groups = s.reshape(-1, group_size)
    mean = jnp.mean(groups, axis=1, keepdims=True)
    adv = groups - mean
    if normalize_by_std:
        std = jnp.std(groups, axis=1, keepdims=True, ddof=1)
        adv = adv / (std + eps)
    return adv.reshape(-1)


def rloo_advantages(scores: jax.Array, group_size: int) -> jax.Array:
    """RLOO: A_i = s_i - (1 / (G - 1)) sum_{j != i} s_j, each response's score against the mean of the other responses
    to its prompt (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
    Human Feedback in LLMs", arXiv 2402.14740; veRL core_algos compute_rloo_outcome_advantage). `scores`
    [num_prompts * G], prompt-major; needs G >= 2 (the baseline is the other responses)."""
    chex.assert_rank(scores, 1)
    if group_size < 2 or scores.shape[0] % group_size:
        raise ValueError(f"rloo_advantages: {scores.shape[0]} scores in groups of {group_size} (RLOO needs groups "
                         "of >= 2)")
    groups = scores.astype(jnp.float32).reshape(-1, group_size)
    others = (jnp.sum(groups, axis=1, keepdims=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def per_component_advantages(components: jax.Array, weights: jax.Array, group_size: int, estimator: str = "grpo",
                             normalize_by_std: bool = True) -> jax.Array:
    """Group advantages of each reward component, then their weighted sum: A_i = sum_k w_k A(c_k)_i, with A the
    GRPO normalisation (`grpo_advantages`) or the RLOO baseline (`rloo_advantages`) within each prompt's group.

    Beyond the paper: normalising the summed reward lets the component with the largest spread within a group (e.g.
    correctness, range 6, against format's 1) drown the others; normalising each component first gives each the
    same scale before the weights. components [K, N] (unweighted, prompt-major), weights [K]. A component constant
    within a group adds 0 there."""
    chex.assert_rank([components, weights], [2, 1])
    chex.assert_equal(components.shape[0], weights.shape[0])
    total = jnp.zeros(components.shape[1], jnp.float32)
    for k in range(components.shape[0]):
        if estimator == "rloo":
            adv = rloo_advantages(components[k], group_size)
        else:
            adv = grpo_advantages(components[k], group_size, normalize_by_std=normalize_by_std)
        total = total + weights[k].astype(jnp.float32) * adv
    return total


def broadcast_to_tokens(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-response values [N] copied onto every valid token of [N, T] (0 on padding)."""
    chex.assert_rank([values, mask], [1, 2])
    chex.assert_equal(values.shape[0], mask.shape[0])
    return jnp.where(mask.astype(bool), values[:, None].astype(jnp.float32), 0.0)


def last_valid_index(mask: jax.Array) -> jax.Array:
    """Index of the last valid token per row [N] (-1 for a row without valid tokens)."""
    chex.assert_rank(mask, 2)
    t = mask.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    return jnp.max(jnp.where(mask.astype(bool), idx, -1), axis=1)


def token_level_rewards(outcome_rewards: jax.Array, mask: jax.Array, kl: Optional[jax.Array] = None,
                        kl_coef: float = 0.0) -> jax.Array:
    """Token rewards [N, T] for PPO: the outcome reward on each row's last valid token, minus an optional
    per-token KL penalty kl_coef * kl on every valid token. Rows without valid tokens get all zeros."""
    chex.assert_rank([outcome_rewards, mask], [1, 2])
    chex.assert_equal(outcome_rewards.shape[0], mask.shape[0])
    last = last_valid_index(mask)
    positions = jnp.arange(mask.shape[1], dtype=jnp.int32)[None, :]
    rewards = jnp.where(positions == last[:, None], outcome_rewards[:, None].astype(jnp.float32), 0.0)
    if kl is not None:
        chex.assert_equal_shape([kl, mask])
        rewards = rewards - kl_coef * jnp.where(mask.astype(bool), kl.astype(jnp.float32), 0.0)
    return jnp.where(mask.astype(bool), rewards, 0.0)


def gae_advantages_and_returns(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float = 1.0,
                               lam: float = 1.0, whiten: bool = True) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over valid tokens; returns (advantages, returns), both [N, T].

    Invalid (masked) positions are skipped: they neither contribute a TD error nor break the recursion, so the
    value after the last valid token is 0 and a value prediction at a padded slot never leaks in.
      delta_t = r_t + gamma * V_next - V_t,  A_t = delta_t + gamma * lam * A_next  (over valid t)
    returns = A + V (before whitening); advantages are whitened over valid tokens when `whiten` (PPO default).
    Outputs are 0 on masked positions.
    """
    chex.assert_rank([rewards, values, mask], 2)
    chex.assert_equal_shape([rewards, values, mask])
    m = mask.astype(bool)
    r = jnp.where(m, rewards.astype(jnp.float32), 0.0)
    v = jnp.where(m, values.astype(jnp.float32), 0.0)

    def step(carry, inputs):
        next_value, next_adv = carry
        r_t, v_t, m_t = inputs
        delta = r_t + gamma * next_value - v_t
        adv = delta + gamma * lam * next_adv
        adv = jnp.where(m_t, adv, next_adv)
        next_value = jnp.where(m_t, v_t, next_value)
        return (next_value, adv), adv

    zeros = jnp.zeros(r.shape[0], jnp.float32)
    _, adv_t = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, m.T), reverse=True)
    advantages = jnp.where(m, adv_t.T, 0.0)
    returns = jnp.where(m, advantages + v, 0.0)
    if whiten:
        advantages = masked_whiten(advantages, m)
    return advantages, returns


def reinforce_plus_plus_advantages(outcome_rewards: jax.Array, mask: jax.Array, kl: Optional[jax.Array] = None,
                                   kl_coef: float = 0.0, gamma: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models",
    arXiv 2501.03262; veRL core_algos compute_reinforce_plus_plus_outcome_advantage): no critic and no group.

    Token rewards r_t: the outcome on each row's last valid token minus kl_coef * kl_t on every valid token
    (`token_level_rewards`); returns G_t = sum_{k >= t} gamma^(k - t) r_k over valid tokens; advantages = the
    returns whitened over every valid token of the batch (global batch normalisation). Returns (advantages,
    returns), both [N, T], 0 on padding. (The return is GAE's advantage with V = 0 and lambda = 1.)"""
    rewards = token_level_rewards(outcome_rewards, mask, kl, kl_coef)
    returns, _ = gae_advantages_and_returns(rewards, jnp.zeros_like(rewards), mask, gamma=gamma, lam=1.0,
                                            whiten=False)
    return masked_whiten(returns, mask), returns
