"""RL building blocks for GRPO/PPO and their variants: masked statistics, advantages, token log-probs, policy/value
losses, importance ratios, reward shaping."""
from toolrl_jax.rl.advantages import (
    broadcast_to_tokens,
    gae_advantages_and_returns,
    grpo_advantages,
    kl_penalized_scores,
    per_component_advantages,
    reinforce_plus_plus_advantages,
    rloo_advantages,
    token_level_rewards,
)
from toolrl_jax.rl.losses import (
    aggregate,
    importance_log_ratio,
    kl_estimate,
    policy_loss,
    token_logprobs_and_entropy,
    truncated_is_weights,
    value_loss,
)
from toolrl_jax.rl.masked import masked_mean, masked_sum, masked_var, masked_whiten
from toolrl_jax.rl.ppo import PolicyLossConfig, ValueLossConfig, actor_loss, count_normalizers, critic_loss
from toolrl_jax.rl.shaping import overlong_penalty

__all__ = [
    "PolicyLossConfig", "ValueLossConfig", "actor_loss", "aggregate", "broadcast_to_tokens", "count_normalizers",
    "critic_loss", "gae_advantages_and_returns", "grpo_advantages", "importance_log_ratio", "kl_estimate",
    "kl_penalized_scores", "masked_mean", "masked_sum", "masked_var", "masked_whiten", "overlong_penalty",
    "per_component_advantages", "policy_loss", "reinforce_plus_plus_advantages", "rloo_advantages",
    "token_level_rewards", "token_logprobs_and_entropy", "truncated_is_weights", "value_loss",
]
