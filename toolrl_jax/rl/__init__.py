"""RL building blocks for GRPO/PPO: masked statistics, advantages, token log-probs, policy/value losses."""
from toolrl_jax.rl.advantages import (
    broadcast_to_tokens,
    gae_advantages_and_returns,
    grpo_advantages,
    kl_penalized_scores,
    token_level_rewards,
)
from toolrl_jax.rl.losses import (
    aggregate,
    kl_estimate,
    policy_loss,
    token_logprobs_and_entropy,
    value_loss,
)
from toolrl_jax.rl.masked import masked_mean, masked_sum, masked_var, masked_whiten
from toolrl_jax.rl.ppo import PolicyLossConfig, ValueLossConfig, actor_loss, count_normalizers, critic_loss

__all__ = [
    "PolicyLossConfig", "ValueLossConfig", "actor_loss", "aggregate", "broadcast_to_tokens", "count_normalizers",
    "critic_loss", "gae_advantages_and_returns", "grpo_advantages", "kl_estimate", "kl_penalized_scores",
    "masked_mean", "masked_sum", "masked_var", "masked_whiten", "policy_loss", "token_level_rewards",
    "token_logprobs_and_entropy", "value_loss",
]
