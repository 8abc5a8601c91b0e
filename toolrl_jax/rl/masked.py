"""Masked reductions over token arrays (mask = 1 on valid response tokens, 0 on padding).

Masked entries never influence a result, even when they hold NaN or inf: values are selected with `jnp.where`,
not multiplied by the mask.
"""
from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp


def _check(x: jax.Array, mask: jax.Array) -> jax.Array:
    chex.assert_equal_shape([x, mask])
    return mask.astype(bool)


def masked_sum(x: jax.Array, mask: jax.Array, axis: Optional[int] = None) -> jax.Array:
    """Sum of `x` over entries where `mask` is true."""
    m = _check(x, mask)
    return jnp.sum(jnp.where(m, x, 0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis: Optional[int] = None) -> jax.Array:
    """Mean over valid entries; 0 where there are none (instead of NaN)."""
    m = _check(x, mask)
    total = jnp.sum(jnp.where(m, x, 0), axis=axis)
    count = jnp.sum(m, axis=axis)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
    """Variance over all valid entries (Bessel-corrected when `unbiased`, as veRL's masked_var).

    With a single valid entry the correction is skipped (veRL raises there; inside jit we cannot), giving 0.
    """
    m = _check(x, mask)
    mean = masked_mean(x, m)
    var = masked_mean(jnp.square(x - mean), m)
    if unbiased:
        n = jnp.sum(m).astype(var.dtype)
        var = var * jnp.where(n > 1, n / jnp.maximum(n - 1, 1), 1.0)
    return var


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / sqrt(var + eps) with statistics over valid entries only; masked entries are returned as 0.

    `shift_mean=False` adds the mean back after scaling (veRL's option, used for rewards).
    """
    m = _check(x, mask)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(m, out, 0.0)
