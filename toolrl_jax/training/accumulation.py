"""Gradient accumulation over a batch stacked as [num_micro, micro_rows, ...] (shared by GRPO, PPO's critic, SFT).

Each loss is normalised by the whole batch's token count before differentiation, so the sum of micro-batch
gradients is exactly the gradient of the token mean over the batch.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def accumulate_gradients(grads_fn: Callable[[Any, Any], tuple[Any, Any]], params: Any, batch: Any
                         ) -> tuple[Any, Any]:
    """Sums grads_fn(params, micro) -> (grads, outputs) over `batch`'s leading micro-batch axis.

    Returns (the gradient sum, the outputs stacked [num_micro, ...]). Several micro-batches run in `lax.scan`
    with a parameter-sized accumulator in the carry; a single micro-batch returns its gradient directly, without
    the accumulator (one parameter-sized buffer less at the update's peak).
    """
    num_micro = jax.tree.leaves(batch)[0].shape[0]
    if num_micro == 1:
        grads, outputs = grads_fn(params, jax.tree.map(lambda x: x[0], batch))
        return grads, jax.tree.map(lambda x: x[None], outputs)

    def body(acc, micro):
        g, outputs = grads_fn(params, micro)
        return jax.tree.map(jnp.add, acc, g), outputs

    return jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), batch)
