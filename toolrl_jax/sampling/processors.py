"""Next-token selection from logits: greedy, temperature, top-k, top-p, with the log-probs RL needs.

Filters follow the Hugging Face order (temperature, then top-k, then top-p on the renormalised top-k mass).
Which filters run is static (Python bools/ints), so the vocabulary sort for top-p is only compiled in when used.
"""
from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp


class TokenChoice(NamedTuple):
    tokens: jax.Array  # [N] int32
    logprobs: jax.Array  # [N] float32: log softmax of the raw (untempered, unfiltered) logits
    tempered_logprobs: jax.Array  # [N] float32: log-prob under the distribution actually sampled (0 for greedy)


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, idx[:, None], axis=-1)[:, 0]


def raw_logprob(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log_softmax(logits)[token] per row, without materialising the full log-softmax."""
    return _take(logits, tokens) - jax.nn.logsumexp(logits, axis=-1)


def select_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array, *,
                  greedy: bool, top_k: int, use_top_p: bool, tempered: bool = True) -> TokenChoice:
    """Chooses one token per row.

    logits: [N, V] float32; keys: [N] PRNG keys (one per row, so rows are independent and reproducible);
    temperature, top_p: traced scalars (changing their values does not recompile); greedy/top_k/use_top_p: static.
    tempered=False skips the tempered log-probs (one fewer pass over the [N, V] logits; zeros are returned).
    """
    chex.assert_rank(logits, 2)
    logits = logits.astype(jnp.float32)
    if greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return TokenChoice(tokens, raw_logprob(logits, tokens), jnp.zeros(tokens.shape, jnp.float32))
    scaled = logits / jnp.asarray(temperature, jnp.float32)
    candidate_ids = None  # None: candidates are the whole vocabulary in id order
    if top_k > 0:
        scaled, candidate_ids = jax.lax.top_k(scaled, top_k)  # sorted, descending
    elif use_top_p:
        ids = jnp.broadcast_to(jnp.arange(scaled.shape[-1], dtype=jnp.int32), scaled.shape)
        neg_sorted, candidate_ids = jax.lax.sort_key_val(-scaled, ids, dimension=-1)  # stable: ties keep id order
        scaled = -neg_sorted
    if use_top_p:
        probs = jax.nn.softmax(scaled, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Keep the smallest prefix whose mass reaches top_p (the first candidate always survives).
        scaled = jnp.where(mass_before < jnp.asarray(top_p, jnp.float32), scaled, -jnp.inf)
    choice = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    tokens = choice if candidate_ids is None else _take(candidate_ids, choice).astype(jnp.int32)
    tempered_lp = raw_logprob(scaled, choice) if tempered else jnp.zeros(tokens.shape, jnp.float32)
    return TokenChoice(tokens, raw_logprob(logits, tokens), tempered_lp)
