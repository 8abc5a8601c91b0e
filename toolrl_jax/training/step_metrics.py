"""The metrics stage: one GRPO/PPO step's logged numbers from what the other stages produced.

Names: actor/* and critic/* (update means), reward/* (every reward component, `reward/<name>_std` for the ToolRL
components), response/*, prompt/*, score/mean, advantage/abs_mean, entropy/rollout, kl/old_ref_k1, time/*,
throughput/*, train/padding_fraction; with recomputed old log-probs, rollout/logp_mismatch_mean and _max (the
sampler's log-probs against the trainer's, |difference| over response tokens).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from toolrl_jax.rl.masked import masked_mean
from toolrl_jax.training.estimators import Advantages
from toolrl_jax.training.rollout import Rollout, RolloutLogProbs


def reward_spread(rewards: Any, prefix: str) -> dict[str, float]:
    """The standard deviation over the step's responses of the total reward and of each reward column except
    accuracy (a 0/1 rate): ToolRL's format, correctness and length; other functions' scores and components."""
    return {f"{prefix}{name}_std": float(np.std(values)) for name, values in rewards.columns.items()
            if name.rsplit("/", 1)[-1] != "accuracy"}


def step_metrics(rollout: Rollout, rewards: Any, logprobs: RolloutLogProbs, advantages: Advantages,
                 update_metrics: Sequence[Mapping[str, float]], trained_cells: int, ppo_epochs: int,
                 seconds: Mapping[str, float]) -> dict[str, float]:
    """seconds: score (host time scoring rewards), prepare (collecting log-probs and advantages), train."""
    samples, rows, mask = rollout.samples, rollout.rows, rollout.mask
    metrics = {k if k.startswith("critic/") else f"actor/{k}": float(np.mean([m[k] for m in update_metrics]))
               for k in update_metrics[0]}
    metrics.update(rewards.metrics("reward/"))
    metrics.update(reward_spread(rewards, "reward/"))
    n_tokens = float(mask.sum())
    real_cells = float(rows["segment_ids"].astype(bool).sum()) * ppo_epochs
    logprob_seconds = rollout.seconds_dispatch + seconds["prepare"]
    generate = rollout.seconds_generate
    step_seconds = generate + rollout.seconds_dispatch + seconds["score"] + seconds["prepare"] + seconds["train"]
    metrics.update({
        "response/length_mean": float(samples.lengths.mean()),
        "response/length_max": float(samples.lengths.max()),
        "response/clip_ratio": float(1.0 - samples.stopped.mean()),
        "prompt/length_mean": float(samples.prompt_mask.sum(1).mean()),
        "score/mean": float(jnp.mean(advantages.scores)),
        "advantage/abs_mean": float(jnp.mean(jnp.abs(advantages.per_row))),
        "time/generate_s": generate,
        # scoring runs on the host while the device computes the log-prob passes: score_s is its host time,
        # logprob_s the rest of the wall time until the advantages are ready (dispatch included)
        "time/score_s": seconds["score"],
        "time/logprob_s": logprob_seconds,
        "time/train_s": seconds["train"],
        "time/step_s": step_seconds,
        "throughput/new_tokens_per_s": n_tokens / max(generate, 1e-9),
        "throughput/train_tokens_per_s": real_cells / max(seconds["train"], 1e-9),
        # share of the updates' [rows, columns] cells that are padding (trim_padding lowers it)
        "train/padding_fraction": 1.0 - real_cells / max(trained_cells, 1),
    })
    if logprobs.entropy is not None:  # recomputed by the trainer (the sampler does not return entropies)
        metrics["entropy/rollout"] = float(masked_mean(jnp.asarray(logprobs.entropy), jnp.asarray(mask)))
        metrics.update(logp_mismatch(logprobs.old, samples.logprobs, mask))
    if logprobs.ref is not None:
        metrics["kl/old_ref_k1"] = float((logprobs.old - logprobs.ref).sum() / max(n_tokens, 1.0))
    return metrics


def logp_mismatch(trainer_logp: np.ndarray, sampler_logp: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """The sampler/trainer mismatch: mean and max over response tokens of |trainer - sampler| log-prob of the same
    token (rollout engines and training forwards differ in kernels and precision; `tis_cap` corrects for it)."""
    valid = np.asarray(mask).astype(bool)
    if not valid.any():
        return {}
    diff = np.abs(np.asarray(trainer_logp, np.float64) - np.asarray(sampler_logp, np.float64))[valid]
    return {"rollout/logp_mismatch_mean": float(diff.mean()), "rollout/logp_mismatch_max": float(diff.max())}
