"""The rows the update stage trains on: the rollout's rows with the old log-probs and advantages, and when an option
asks for them a loss mask (`loss_mask`: truncated responses, dynamic sampling's filler groups) and per-token
importance weights (`is_weight`: truncated importance sampling against the sampler/trainer mismatch).
"""
from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from toolrl_jax.rl.losses import truncated_is_weights
from toolrl_jax.training.estimators import Advantages
from toolrl_jax.training.rollout import Rollout, RolloutLogProbs


def loss_mask_rows(rollout: Rollout, config: Any, filler: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """[N, R] the response tokens the actor loss counts, None when it is every one: without the rows of responses
    cut by the budget (`config.mask_truncated`) and of dynamic sampling's filler groups (`filler` [P] bool)."""
    keep = np.ones(rollout.mask.shape[0], bool)
    if config.mask_truncated:
        keep &= rollout.samples.stopped
    if filler is not None:
        keep &= ~np.repeat(filler, config.group_size)
    if not (config.mask_truncated or (filler is not None and filler.any())):
        return None
    return (rollout.mask * keep[:, None]).astype(np.float32)


def update_rows(rollout: Rollout, logprobs: RolloutLogProbs, advantages: Advantages, config: Any,
                filler: Optional[np.ndarray] = None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """(rows for `update.update_stage`, metrics): the rollout rows, old_logp, the estimator's extra rows and
    advantages (ref_logp for a KL loss), plus loss_mask and is_weight when the config asks for them."""
    rows = dict(rollout.rows, old_logp=logprobs.old, **advantages.extra_rows, advantages=advantages.token)
    if config.policy.kl_loss_coef > 0:
        rows["ref_logp"] = logprobs.ref.astype(np.float32)
    mask = loss_mask_rows(rollout, config, filler)
    if mask is not None:
        rows["loss_mask"] = mask
    metrics = {}
    if config.tis_cap is not None:
        valid = rollout.mask.astype(bool)
        weights = np.asarray(truncated_is_weights(jnp.asarray(logprobs.old), jnp.asarray(rollout.samples.logprobs),
                                                  jnp.asarray(valid), config.tis_cap))
        rows["is_weight"] = weights
        if valid.any():
            metrics = {"rollout/tis_weight_mean": float(weights[valid].mean()),
                       "rollout/tis_capped_fraction": float((weights[valid] >= config.tis_cap).mean())}
    return rows, metrics
