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
    entropy_from_logits,
    kl_estimate,
    policy_loss,
    token_logprobs_and_entropy,
    token_logprobs_and_entropy_from_hidden,
    value_loss,
)
from toolrl_jax.rl.masked import masked_mean, masked_sum, masked_var, masked_whiten
from toolrl_jax.rl.ppo import PolicyLossConfig, ValueLossConfig, actor_loss, count_normalizers, critic_loss

__all__ = [
    "PolicyLossConfig", "ValueLossConfig", "actor_loss", "aggregate", "broadcast_to_tokens", "count_normalizers",
    "critic_loss", "entropy_from_logits", "gae_advantages_and_returns", "grpo_advantages", "kl_estimate",
    "kl_penalized_scores", "masked_mean", "masked_sum", "masked_var", "masked_whiten", "policy_loss",
    "token_level_rewards", "token_logprobs_and_entropy", "token_logprobs_and_entropy_from_hidden", "value_loss",
]
