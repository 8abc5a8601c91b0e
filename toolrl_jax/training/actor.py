"""The actor's jitted pure functions: teacher-forced log-probs, and one optimizer update from a mini-batch.

  * `make_logprob_fn(graphdef)`: jit(params, rows) -> (logp, entropy) [N, R] (old policy and reference passes),
  * `make_update_fn(...)`: jit(params, opt_state, frozen, minibatch) -> (params, opt_state, metrics), one update
    from micro-batches of one width stacked [num_micro, micro_rows, ...], summed with `lax.scan`,
  * `make_split_update_fns(...)`: the same update as separate jitted calls (zeros / accumulate / apply), so that
    micro-batches of different widths (rows trimmed to their own lengths) each run at their own shape.
Every micro-batch's loss is normalised by the whole mini-batch's counts (`update_normalizers`), so accumulation gives
exactly the mini-batch loss in every aggregation mode. Parameters and optimizer state are donated; under a mesh they
keep the partition-rule shardings given.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from toolrl_jax.optim import OptimizerConfig, apply_gradients
from toolrl_jax.rl.ppo import PolicyLossConfig, actor_loss, count_normalizers
from toolrl_jax.training.accumulation import accumulate_gradients
from toolrl_jax.training.sequences import response_logprobs


def make_logprob_fn(graphdef: nnx.GraphDef, logits_chunk_size: Optional[int] = None
                    ) -> Callable[[Any, dict], tuple[jax.Array, jax.Array]]:
    """jit(params, rows) -> (logp [N,R], entropy [N,R]); one compile per row shape."""
    return jax.jit(functools.partial(response_logprobs, graphdef, logits_chunk_size=logits_chunk_size))


def _actor_micro_grads(graphdef: nnx.GraphDef, policy_config: PolicyLossConfig, logits_chunk_size: Optional[int]):
    """grads(params, frozen, micro, normalizers) -> (gradient, metrics) of one micro-batch's share of the mini-batch
    loss: normalised by the whole mini-batch's counts, so micro-batch gradients and metrics sum to the mini-batch's."""

    def loss_fn(p, frozen, micro, normalizers):
        logp, entropy = response_logprobs(graphdef, (p, frozen), micro, logits_chunk_size=logits_chunk_size)
        return actor_loss(logp, entropy, micro["old_logp"], micro["advantages"], loss_mask(micro), policy_config,
                          ref_logp=micro.get("ref_logp"), is_weight=micro.get("is_weight"), **normalizers)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_grads(p, frozen, micro, normalizers):
        (_, metrics), g = grad_fn(p, frozen, micro, normalizers)
        return g, metrics

    return micro_grads


def loss_mask(rows: Any) -> Any:
    """The tokens the actor loss counts: rows["loss_mask"] when the step excludes some response tokens (truncated
    responses, dynamic sampling's filler groups), else the response mask."""
    return rows.get("loss_mask", rows["response_mask"])


def update_normalizers(mask: Any, policy: PolicyLossConfig, num_micro: int,
                       response_budget: Optional[int] = None) -> dict[str, Any]:
    """`count_normalizers` of a whole mini-batch's response mask [rows, R] for `policy.agg_mode`: the
    seq-mean-token-sum-norm constant (policy.norm_length, else the response budget, else R) and the verl divisor
    (policy.accumulation_divisor, else the number of micro-batches)."""
    norm_length = accumulation_divisor = None
    if policy.agg_mode == "seq-mean-token-sum-norm":
        norm_length = policy.norm_length or response_budget or mask.shape[-1]
    if policy.agg_mode == "verl":
        accumulation_divisor = policy.accumulation_divisor or num_micro
    return count_normalizers(mask, norm_length=norm_length, accumulation_divisor=accumulation_divisor)


def make_update_fn(graphdef: nnx.GraphDef, optimizer, optimizer_config: OptimizerConfig,
                   policy_config: PolicyLossConfig, param_shardings: Any = None, opt_shardings: Any = None,
                   logits_chunk_size: Optional[int] = None, response_budget: Optional[int] = None):
    """jit(params, opt_state, frozen, minibatch) -> (params, opt_state, metrics); params/opt_state donated.

    One optimizer update from a mini-batch whose micro-batches share one width. params: the trainable state;
    frozen: the rest of the model's state (an empty State when everything trains), merged after params.
    minibatch: dict of arrays [num_micro, micro_rows, ...] with keys of `join_prompt_and_response` plus old_logp,
    advantages (and ref_logp when the KL loss is on; optionally loss_mask and is_weight, see `loss_mask`).
    Mini-batches of mixed widths use `make_split_update_fns`.
    response_budget: the untrimmed response width, the seq-mean-token-sum-norm constant (`update_normalizers`).
    """
    micro_grads = _actor_micro_grads(graphdef, policy_config, logits_chunk_size)

    def update(params, opt_state, frozen, minibatch):
        mask = loss_mask(minibatch)
        normalizers = update_normalizers(mask.reshape(-1, mask.shape[-1]), policy_config, mask.shape[0],
                                         response_budget)
        grads, metrics = accumulate_gradients(lambda p, micro: micro_grads(p, frozen, micro, normalizers), params,
                                              minibatch)
        metrics = jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)  # each micro value is pre-normalised
        new_params, new_opt_state, opt_metrics = apply_gradients(optimizer, optimizer_config, grads, opt_state,
                                                                 params)
        return new_params, new_opt_state, {**metrics, **opt_metrics}

    out_shardings = None
    if param_shardings is not None:
        out_shardings = (param_shardings, opt_shardings, None)
    return jax.jit(update, donate_argnums=(0, 1), out_shardings=out_shardings)


class SplitUpdateFns(NamedTuple):
    """One optimizer update as separate jitted programs, so that each micro-batch runs at its own width:
        grads = zeros(params)
        for micro in micro_batches:   # any widths; one compile per distinct shape
            grads, metrics = accumulate(params, frozen, grads, micro, normalizers)   # grads donated
        params, opt_state, opt_metrics = apply(params, opt_state, grads)           # params, opt_state donated
    normalizers: `update_normalizers` of the whole mini-batch's response mask (host scalars)."""

    zeros: Callable
    accumulate: Callable
    apply: Callable


def make_split_update_fns(graphdef: nnx.GraphDef, optimizer, optimizer_config: OptimizerConfig,
                          policy_config: PolicyLossConfig, param_shardings: Any = None, opt_shardings: Any = None,
                          logits_chunk_size: Optional[int] = None) -> SplitUpdateFns:
    """The update of `make_update_fn` split across jitted calls (see `SplitUpdateFns`): the same gradients, summed
    in a donated accumulator that lives across calls instead of in a `lax.scan` carry."""
    micro_grads = _actor_micro_grads(graphdef, policy_config, logits_chunk_size)

    def accumulate(params, frozen, grads, micro, normalizers):
        g, metrics = micro_grads(params, frozen, micro, normalizers)
        return jax.tree.map(jnp.add, grads, g), metrics

    def apply(params, opt_state, grads):
        return apply_gradients(optimizer, optimizer_config, grads, opt_state, params)

    zeros = functools.partial(jax.tree.map, jnp.zeros_like)
    if param_shardings is None:
        return SplitUpdateFns(jax.jit(zeros), jax.jit(accumulate, donate_argnums=(2,)),
                              jax.jit(apply, donate_argnums=(0, 1)))
    return SplitUpdateFns(jax.jit(zeros, out_shardings=param_shardings),
                          jax.jit(accumulate, donate_argnums=(2,), out_shardings=(param_shardings, None)),
                          jax.jit(apply, donate_argnums=(0, 1), out_shardings=(param_shardings, opt_shardings, None)))
