"""The update stage: `ppo_epochs` passes over a step's rows in mini-batches, one actor update (and, for PPO, one
critic update) per mini-batch.

An actor update cuts its mini-batch into micro-batches by the learner's `RowLayout` (rows in training order, each
micro-batch at its own widths). Micro-batches of one shape run as one fused program (`actor.make_update_fn`, a scan);
mixed shapes run as one gradient call per micro-batch into a donated accumulator, then one optimizer call
(`actor.make_split_update_fns`). Both normalise by the whole mini-batch's counts, so the update is the same.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from toolrl_jax.models.lora import DROPOUT_SEED_KEY, dropout_seeds
from toolrl_jax.training.actor import loss_mask, update_normalizers
from toolrl_jax.training.layout import stack_minibatches


def update_actor(learner: Any, minibatch: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], int]:
    """One optimizer update of the policy from a mini-batch's rows [rows, ...] (host arrays with old_logp,
    advantages, ...). Returns its metrics (device scalars) and the number of [row, column] cells computed."""
    c, placement = learner.config, learner.placement
    micros = [chunk for _, chunk in learner.layout.chunks(minibatch, c.micro_batch_rows)]
    cells = sum(m["input_ids"].size for m in micros)
    if len({(m["input_ids"].shape, m["response_ids"].shape) for m in micros}) == 1:
        learner.params, learner.opt_state, metrics = learner.update_fn(
            learner.params, learner.opt_state, learner.frozen, placement.place_stacked(micros))
        return metrics, cells
    fns = learner.split_update
    normalizers = jax.device_get(update_normalizers(loss_mask(minibatch), c.policy, len(micros),
                                                    c.max_response_length))
    grads, micro_metrics = fns.zeros(learner.params), []
    for micro in micros:
        grads, m = fns.accumulate(learner.params, learner.frozen, grads, placement.place_rows(micro), normalizers)
        micro_metrics.append(m)
    learner.params, learner.opt_state, opt_metrics = fns.apply(learner.params, learner.opt_state, grads)
    # each micro value is pre-normalised by the mini-batch counts: the mini-batch value is their sum
    metrics = {k: sum(m[k] for m in micro_metrics) for k in micro_metrics[0]}
    return {**metrics, **opt_metrics}, cells


def update_stage(learner: Any, train_rows: Mapping[str, np.ndarray]) -> tuple[list[dict[str, float]], int]:
    """Every update of one step, in order: (host metrics per update, cells computed). The sampler's weight copy is
    freed meanwhile (it is stale after the first update) and refreshed at the end. With LoRA dropout, each pass
    over the rows gives them fresh dropout seeds (`lora.dropout_seeds`: from the seed, step and pass only)."""
    c = learner.config
    rows_per_mb = c.mini_batch_prompts * c.group_size
    n_rows = train_rows["response_mask"].shape[0]
    metrics, cells = [], 0
    learner.sampler.release_params()
    for epoch in range(c.ppo_epochs):
        rows = dict(train_rows)
        if learner.lora_dropout > 0:
            rows[DROPOUT_SEED_KEY] = dropout_seeds(c.seed, learner.step + 1, epoch, (n_rows,))
        for start in range(0, n_rows, rows_per_mb):
            mb = {k: v[start:start + rows_per_mb] for k, v in rows.items()}
            m, n = update_actor(learner, mb)
            cells += n
            if learner.critic is not None:
                stacked = stack_minibatches(mb, rows_per_mb, c.micro_batch_rows)[0]
                m = {**m, **learner.critic.update(learner.layout.trim(stacked))}
            metrics.append(m)
    metrics = jax.device_get(metrics)
    learner.sampler.update_params(learner.model())
    return metrics, cells
