"""Token log-probs/entropy from logits and the PPO-family loss terms (clipped policy loss, KL, value loss).

Gradient accumulation: every loss here is `sum over valid tokens (or sequences) / normalizer`. Pass the GLOBAL
normalizers of the whole mini-batch (`total_tokens`, `total_sequences`; see `ppo.count_normalizers`) to each
micro-batch call and the micro-batch losses and gradients add up exactly to the mini-batch value. With no normalizer
the local count is used, i.e. a plain masked mean. Metrics follow the same rule (token sums divided by
`total_tokens`) so they accumulate by summation too. The one exception is the "verl" mode, which reproduces the
original ToolRL trainer's per-micro-batch normalisation on purpose (see `aggregate`).
"""
from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "verl")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
IS_LEVELS = ("token", "sequence", "sequence_token")


# --------------------------------------------------------------------------- log-probs and entropy


def token_logprobs_and_entropy(logits: jax.Array, targets: jax.Array,
                               masked_vocab: bool = False) -> tuple[jax.Array, jax.Array]:
    """log p(targets[...] | logits[...]) and the entropy of each float32 distribution: logits [..., V], targets [...].

    The caller aligns the shift (logits at position t predict targets[t]). bf16 logits are upcast first. With
    `masked_vocab` (logits of -inf allowed), tokens with p = 0 contribute nothing to the entropy instead of NaN; it
    is off for the policy's own logits, which are finite: the guard would keep a [..., V] mask for the backward
    pass. Long sequences bound the [..., V] float32 temporaries by calling this chunk by chunk
    (`training.sequences.map_position_chunks`).
    """
    chex.assert_equal_shape_prefix([logits, targets], targets.ndim)
    logp_all = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    p = jnp.exp(logp_all)
    if masked_vocab:
        entropy = -jnp.sum(jnp.where(p > 0, p * logp_all, 0.0), axis=-1)
    else:
        entropy = -jnp.sum(p * logp_all, axis=-1)
    return logp, entropy


# --------------------------------------------------------------------------- aggregation


def aggregate(x: jax.Array, mask: jax.Array, mode: str = "token-mean", total_tokens: Optional[jax.Array] = None,
              total_sequences: Optional[jax.Array] = None, norm_length: Optional[float] = None,
              accumulation_divisor: Optional[jax.Array] = None) -> jax.Array:
    """Reduce a [B, T] per-token quantity to a scalar over valid tokens.

    With S_b = sum of sequence b's valid tokens, n_b their count, N = total_tokens (default: the local valid-token
    count) and G = total_sequences (default: the local number of sequences with >= 1 valid token):
      token-mean:               sum_b S_b / N  (DAPO's token-level loss; ToolRL/veRL's default)
      seq-mean-token-mean:      sum_b (S_b / n_b) / G  (the GRPO paper's sample-level loss)
      seq-mean-token-sum:       sum_b S_b / G  (veRL `agg_loss`; longer responses weigh more)
      seq-mean-token-sum-norm:  sum_b S_b / (G * norm_length)  (Dr. GRPO, Liu et al. 2025, "Understanding
                                R1-Zero-Like Training", sec. 3.2: a constant length normaliser, the maximum response
                                length, instead of each sequence's own; as TRL's loss_type="dr_grpo". veRL's mode of
                                this name divides by the constant only, not by G: the same direction, a batch-size
                                scale.) norm_length defaults to the padded width T, which is only constant when
                                rows are not trimmed: pass the response budget.
      verl:                     sum_b S_b / (n_local * accumulation_divisor), n_local this call's OWN valid-token
                                count: summed over a mini-batch's micro-batches this is the sum of each micro-batch's
                                token mean divided by the accumulation count, the gradient scale of the original
                                ToolRL trainer (veRL 0.1 dp_actor.update_policy: `loss = policy_loss /
                                gradient_accumulation` per micro-batch). The value depends on how rows are cut into
                                micro-batches; divisor default 1 (a plain local token mean).
    """
    chex.assert_rank([x, mask], 2)
    chex.assert_equal_shape([x, mask])
    m = mask.astype(bool)
    xm = jnp.where(m, x.astype(jnp.float32), 0.0)

    def ratio(numerator, denominator):
        return numerator / jnp.maximum(jnp.asarray(denominator, jnp.float32), 1.0)

    per_seq_count = jnp.sum(m, axis=-1)
    sequences = jnp.sum(per_seq_count > 0) if total_sequences is None else total_sequences
    if mode == "token-mean":
        return ratio(jnp.sum(xm), jnp.sum(m) if total_tokens is None else total_tokens)
    if mode == "seq-mean-token-mean":
        return ratio(jnp.sum(jnp.sum(xm, axis=-1) / jnp.maximum(per_seq_count, 1)), sequences)
    if mode == "seq-mean-token-sum":
        return ratio(jnp.sum(xm), sequences)
    if mode == "seq-mean-token-sum-norm":
        length = x.shape[-1] if norm_length is None else norm_length
        return ratio(jnp.sum(xm), sequences) / jnp.asarray(length, jnp.float32)
    if mode == "verl":
        divisor = 1.0 if accumulation_divisor is None else accumulation_divisor
        return ratio(jnp.sum(xm), jnp.sum(m)) / jnp.asarray(divisor, jnp.float32)
    raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {AGG_MODES}")


def _token_metric(x: jax.Array, mask: jax.Array, total_tokens: Optional[jax.Array]) -> jax.Array:
    return aggregate(x, mask, "token-mean", total_tokens=total_tokens)


# --------------------------------------------------------------------------- KL


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, kind: str = "k3") -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.

    k1: logp - ref_logp.  k2: 0.5 * (logp - ref_logp)^2.  abs: |logp - ref_logp|.
    k3 (veRL "low_var_kl"): with d = ref_logp - logp clipped to [-20, 20], exp(d) - d - 1, clamped to [-10, 10].
    """
    chex.assert_equal_shape([logp, ref_logp])
    diff = logp.astype(jnp.float32) - ref_logp.astype(jnp.float32)
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * jnp.square(diff)
    if kind == "abs":
        return jnp.abs(diff)
    if kind == "k3":
        d = jnp.clip(-diff, -20.0, 20.0)
        return jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_ESTIMATORS}")


# --------------------------------------------------------------------------- importance ratios


def importance_log_ratio(logp: jax.Array, old_logp: jax.Array, mask: jax.Array, level: str = "token") -> jax.Array:
    """The log importance ratio [B, T] of the clipped surrogate at `level`, clipped to [-20, 20] before exp (veRL).

    token:          log r_t = logp_t - old_t (PPO / GRPO).
    sequence:       log s_i = (1/|y_i|) sum_t (logp_t - old_t) on every token of row i: GSPO's length-normalised
                    sequence ratio (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071,
                    sec. 4.1; TRL GRPOTrainer importance_sampling_level="sequence"): one ratio, so one clipping
                    decision, per sequence. Its gradient flows through every token of the row.
    sequence_token: log s_{i,t} = sg[log s_i] + logp_t - sg[logp_t] (GSPO-token, sec. 4.3; veRL core_algos
                    compute_policy_loss_gspo): the value (hence the clipping) is the sequence's, the gradient token
                    t's own, so it can weigh token-level advantages; with one advantage per sequence its gradient
                    equals GSPO's under seq-mean-token-mean aggregation.
    Only row i's own valid tokens enter s_i, so micro-batches (whole rows) accumulate exactly.
    """
    chex.assert_equal_shape([logp, old_logp, mask])
    diff = logp.astype(jnp.float32) - old_logp.astype(jnp.float32)
    if level == "token":
        return jnp.clip(diff, -20.0, 20.0)
    if level not in IS_LEVELS:
        raise ValueError(f"unknown importance sampling level {level!r}; expected one of {IS_LEVELS}")
    m = mask.astype(bool)
    seq = jnp.sum(jnp.where(m, diff, 0.0), axis=-1, keepdims=True) / jnp.maximum(jnp.sum(m, -1, keepdims=True), 1)
    if level == "sequence":
        return jnp.clip(jnp.broadcast_to(seq, diff.shape), -20.0, 20.0)
    own = logp.astype(jnp.float32)
    return jnp.clip(jax.lax.stop_gradient(seq) + own - jax.lax.stop_gradient(own), -20.0, 20.0)


def truncated_is_weights(old_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array, cap: float) -> jax.Array:
    """Truncated importance sampling against the sampler/trainer mismatch: w_t = min(exp(old_t - sampler_t), cap) on
    valid tokens (0 on padding), where old is the trainer's recomputed old-policy log-prob and sampler the rollout
    engine's for the same token. It multiplies each token's policy-gradient term (Yao et al. 2025, "Your Efficient
    RL Framework Secretly Brings You Off-Policy RL Training", the TIS correction; veRL's tis_imp_ratio_cap, TRL
    GRPOTrainer vllm_importance_sampling_correction with vllm_importance_sampling_cap)."""
    chex.assert_equal_shape([old_logp, sampler_logp, mask])
    w = jnp.minimum(jnp.exp(old_logp.astype(jnp.float32) - sampler_logp.astype(jnp.float32)), cap)
    return jnp.where(mask.astype(bool), w, 0.0)


# --------------------------------------------------------------------------- policy and value losses


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
                clip_eps: float = 0.2, clip_eps_high: Optional[float] = None, dual_clip_c: Optional[float] = None,
                importance_sampling_level: str = "token", is_weight: Optional[jax.Array] = None,
                agg_mode: str = "token-mean", total_tokens: Optional[jax.Array] = None,
                total_sequences: Optional[jax.Array] = None, norm_length: Optional[float] = None,
                accumulation_divisor: Optional[jax.Array] = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO clipped surrogate: per token max(-A r, -A clip(r, 1-eps, 1+eps_high)), r = exp(logp - old_logp).

    `clip_eps_high` defaults to `clip_eps` (set it higher for DAPO-style clip-higher). With `dual_clip_c` (> 1),
    tokens with A < 0 are additionally bounded by -A * c (dual-clip PPO); off by default. The log-ratio is clipped
    to [-20, 20] before exp for safety, as veRL does. `importance_sampling_level` "sequence" / "sequence_token" uses
    GSPO's sequence ratio instead of r (`importance_log_ratio`). `is_weight` [B, T] (e.g. `truncated_is_weights`)
    multiplies each token's term after clipping.
    Metrics (token means): clipfrac (the clipped branch is active), clipfrac_dual, approx_kl (mean old_logp - logp).
    """
    chex.assert_rank([logp, old_logp, advantages, mask], 2)
    chex.assert_equal_shape([logp, old_logp, advantages, mask])
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = importance_log_ratio(logp, old_logp, mask)
    if importance_sampling_level != "token":
        ratio = jnp.exp(importance_log_ratio(logp, old_logp, mask, importance_sampling_level))
    else:
        ratio = jnp.exp(log_ratio)
    adv = advantages.astype(jnp.float32)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    per_token = jnp.maximum(loss_unclipped, loss_clipped)
    clipped = (loss_clipped > loss_unclipped).astype(jnp.float32)
    dual = jnp.zeros_like(per_token)
    if dual_clip_c is not None:
        if dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
        bound = -adv * dual_clip_c
        dual = ((adv < 0) & (per_token > bound)).astype(jnp.float32)
        per_token = jnp.where(adv < 0, jnp.minimum(per_token, bound), per_token)
    if is_weight is not None:
        per_token = per_token * is_weight.astype(jnp.float32)
    loss = aggregate(per_token, mask, agg_mode, total_tokens, total_sequences, norm_length, accumulation_divisor)
    metrics = {
        "clipfrac": _token_metric(clipped, mask, total_tokens),
        "clipfrac_dual": _token_metric(dual, mask, total_tokens),
        "approx_kl": _token_metric(-log_ratio, mask, total_tokens),
    }
    return loss, metrics


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array, *,
               cliprange_value: float = 0.5, agg_mode: str = "token-mean", total_tokens: Optional[jax.Array] = None,
               total_sequences: Optional[jax.Array] = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss 0.5 * agg(max((v - R)^2, (v_clip - R)^2)), v_clip = old_v + clip(v - old_v, +-c).

    Metrics (token means): vf_clipfrac (clipped branch strictly larger), vpred_mean.
    """
    chex.assert_rank([values, old_values, returns, mask], 2)
    chex.assert_equal_shape([values, old_values, returns, mask])
    v = values.astype(jnp.float32)
    old_v = old_values.astype(jnp.float32)
    ret = returns.astype(jnp.float32)
    v_clipped = old_v + jnp.clip(v - old_v, -cliprange_value, cliprange_value)
    loss_unclipped = jnp.square(v - ret)
    loss_clipped = jnp.square(v_clipped - ret)
    per_token = jnp.maximum(loss_unclipped, loss_clipped)
    loss = 0.5 * aggregate(per_token, mask, agg_mode, total_tokens, total_sequences)
    metrics = {
        "vf_clipfrac": _token_metric((loss_clipped > loss_unclipped).astype(jnp.float32), mask, total_tokens),
        "vpred_mean": _token_metric(v, mask, total_tokens),
    }
    return loss, metrics
