"""The actor (policy) and critic objectives of PPO/GRPO assembled from the loss terms, with their configs.

actor loss = policy_loss - entropy_coef * entropy + kl_loss_coef * KL(pi || pi_ref), each aggregated with the same
mode. For gradient accumulation compute the normalizers once per mini-batch with `count_normalizers` and pass them to
every micro-batch call: the micro-batch losses (and gradients, and metrics) then sum to the mini-batch values.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import chex
import jax
import jax.numpy as jnp

from toolrl_jax.config_checks import option
from toolrl_jax.rl.losses import AGG_MODES, IS_LEVELS, KL_ESTIMATORS, aggregate, kl_estimate, policy_loss, value_loss


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """PPO-clip actor objective. Defaults are ToolRL's GRPO recipe (clip 0.2, entropy bonus 0.001, KL loss off)."""

    clip_eps: float = option(0.2, "PPO clip epsilon.", flag="clip_ratio")
    clip_eps_high: Optional[float] = option(None, "Separate upper clip epsilon, e.g. DAPO's clip-higher (default "
                                                  "--clip_ratio).", flag="clip_ratio_high")
    dual_clip_c: Optional[float] = option(None, "Dual-clip PPO: bound the loss of negative advantages at -A * c "
                                                "(c > 1; default off).")
    importance_sampling_level: str = option(
        "token", "The importance ratio of the clipped surrogate. token: per token (PPO/GRPO). sequence: GSPO's "
                 "length-normalised sequence ratio exp(mean over the response of logp - old_logp), clipped per "
                 "sequence (Zheng et al. 2025; needs one advantage per sequence). sequence_token: GSPO-token, the "
                 "sequence ratio's value with each token's own gradient (for token-level advantages).",
        choices=IS_LEVELS)
    entropy_coef: float = option(0.001, "Entropy bonus coefficient.")
    kl_loss_coef: float = option(0.0, "Coefficient of a KL-to-reference loss term (0 = off).")
    kl_loss_type: str = option("k3", "KL estimator of the loss term.", choices=KL_ESTIMATORS)
    agg_mode: str = option(
        "token-mean", "How token losses become the mini-batch loss: token-mean (ToolRL; the global token mean), "
                      "seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm (Dr. GRPO: token sums over "
                      "a constant, --loss_agg_norm_length) or verl (the original trainer's gradient scale: each "
                      "micro-batch's token mean summed, over --verl_accumulation_divisor; docs/fidelity.md).",
        choices=AGG_MODES, flag="loss_agg")
    norm_length: Optional[int] = option(None, "--loss_agg=seq-mean-token-sum-norm: the constant length (default "
                                              "--max_response_length).", flag="loss_agg_norm_length")
    accumulation_divisor: Optional[int] = option(
        None, "--loss_agg=verl: the original's gradient-accumulation divisor x data-parallel ranks (ToolRL recipe on "
              "2 GPUs: 4); default: the number of micro-batches per update.", flag="verl_accumulation_divisor")

    def __post_init__(self) -> None:
        if not 0.0 < self.clip_eps < 1.0:
            raise ValueError(f"PolicyLossConfig.clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.clip_eps_high is not None and self.clip_eps_high <= 0.0:
            raise ValueError(f"PolicyLossConfig.clip_eps_high must be positive, got {self.clip_eps_high}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ValueError(f"PolicyLossConfig.dual_clip_c must be > 1, got {self.dual_clip_c}")
        if self.importance_sampling_level not in IS_LEVELS:
            raise ValueError(f"PolicyLossConfig.importance_sampling_level must be one of {IS_LEVELS}, got "
                             f"{self.importance_sampling_level!r}")
        if self.kl_loss_type not in KL_ESTIMATORS:
            raise ValueError(f"PolicyLossConfig.kl_loss_type must be one of {KL_ESTIMATORS}, got {self.kl_loss_type!r}")
        if self.agg_mode not in AGG_MODES:
            raise ValueError(f"PolicyLossConfig.agg_mode must be one of {AGG_MODES}, got {self.agg_mode!r}")
        if not (self.kl_loss_coef >= 0 and self.entropy_coef >= 0) or math.isinf(self.kl_loss_coef + self.entropy_coef):
            raise ValueError(f"PolicyLossConfig: kl_loss_coef and entropy_coef must be finite and >= 0, got "
                             f"{self.kl_loss_coef} and {self.entropy_coef}")
        for name, mode in (("norm_length", "seq-mean-token-sum-norm"), ("accumulation_divisor", "verl")):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"PolicyLossConfig.{name} must be >= 1 or None, got {value}")
            if value is not None and self.agg_mode != mode:
                raise ValueError(f"PolicyLossConfig.{name} is only used with agg_mode={mode!r}, not "
                                 f"{self.agg_mode!r}")


VALUE_AGG_MODES = ("token-mean", "seq-mean-token-mean")  # the critic's (its accumulation uses the global counts)


@dataclasses.dataclass(frozen=True)
class ValueLossConfig:
    """Clipped critic objective (ToolRL's PPO baseline: value clip 0.5, loss scaled by 0.5)."""

    cliprange_value: float = option(0.5, "PPO value-function clip range around the old values.", flag="value_clip")
    agg_mode: str = "token-mean"

    def __post_init__(self) -> None:
        if self.cliprange_value <= 0:
            raise ValueError(f"ValueLossConfig.cliprange_value must be positive, got {self.cliprange_value}")
        if self.agg_mode not in VALUE_AGG_MODES:
            raise ValueError(f"ValueLossConfig.agg_mode must be one of {VALUE_AGG_MODES}, got {self.agg_mode!r}")


def count_normalizers(mask: jax.Array, *, norm_length: Optional[int] = None,
                      accumulation_divisor: Optional[int] = None) -> dict[str, jax.Array]:
    """Global normalizers of a mini-batch mask [B, T]: valid tokens and sequences with >= 1 valid token, plus the
    constants of the seq-mean-token-sum-norm and verl aggregations when given (see `losses.aggregate`)."""
    chex.assert_rank(mask, 2)
    m = mask.astype(bool)
    out = {"total_tokens": jnp.sum(m).astype(jnp.float32),
           "total_sequences": jnp.sum(jnp.any(m, axis=-1)).astype(jnp.float32)}
    if norm_length is not None:
        out["norm_length"] = jnp.asarray(norm_length, jnp.float32)
    if accumulation_divisor is not None:
        out["accumulation_divisor"] = jnp.asarray(accumulation_divisor, jnp.float32)
    return out


def actor_loss(logp: jax.Array, entropy: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
               config: PolicyLossConfig, ref_logp: Optional[jax.Array] = None,
               total_tokens: Optional[jax.Array] = None, total_sequences: Optional[jax.Array] = None,
               norm_length: Optional[jax.Array] = None, accumulation_divisor: Optional[jax.Array] = None,
               is_weight: Optional[jax.Array] = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar actor loss for one (micro-)batch plus metrics; all inputs [B, T] (advantages already per token).
    Every term is aggregated with `config.agg_mode` and the normalizers of `count_normalizers`. is_weight: per-token
    weights of the policy-gradient term (truncated importance sampling), None = 1."""
    chex.assert_equal_shape([logp, entropy, old_logp, advantages, mask])
    norms = dict(total_tokens=total_tokens, total_sequences=total_sequences, norm_length=norm_length,
                 accumulation_divisor=accumulation_divisor)
    pg, metrics = policy_loss(logp, old_logp, advantages, mask, clip_eps=config.clip_eps,
                              clip_eps_high=config.clip_eps_high, dual_clip_c=config.dual_clip_c,
                              importance_sampling_level=config.importance_sampling_level, is_weight=is_weight,
                              agg_mode=config.agg_mode, **norms)
    ent = aggregate(entropy, mask, config.agg_mode, **norms)
    loss = pg - config.entropy_coef * ent
    metrics = dict(metrics, pg_loss=pg, entropy=aggregate(entropy, mask, "token-mean", total_tokens))
    if config.kl_loss_coef > 0:
        if ref_logp is None:
            raise ValueError("actor_loss: kl_loss_coef > 0 needs ref_logp")
        kl = aggregate(kl_estimate(logp, ref_logp, config.kl_loss_type), mask, config.agg_mode, **norms)
        loss = loss + config.kl_loss_coef * kl
        metrics["kl_loss"] = kl
    metrics["actor_loss"] = loss
    return loss, metrics


def critic_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
                config: ValueLossConfig, total_tokens: Optional[jax.Array] = None,
                total_sequences: Optional[jax.Array] = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar clipped value loss for one (micro-)batch plus metrics."""
    loss, metrics = value_loss(values, old_values, returns, mask, cliprange_value=config.cliprange_value,
                               agg_mode=config.agg_mode, total_tokens=total_tokens, total_sequences=total_sequences)
    return loss, dict(metrics, vf_loss=loss)
