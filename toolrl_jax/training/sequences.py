"""Rollout tensors for training: [left-padded prompt | right-padded response] rows and their response log-probs.

The policy, old-policy and reference log-probs are all computed by `response_logprobs`, a pure function of
(graphdef, params, batch) that runs the decoder once over the joined rows and projects only the response positions
to the vocabulary (the prompt's logits are never materialised).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from toolrl_jax.models.decoder import positions_from_segments
from toolrl_jax.models.lora import DROPOUT_SEED_KEY
from toolrl_jax.rl.losses import token_logprobs_and_entropy

Batch = Mapping[str, jax.Array]


def join_prompt_and_response(prompt_ids: np.ndarray, prompt_mask: np.ndarray, response_ids: np.ndarray,
                             response_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Host-side: the training rows for a rollout batch.

    Returns input_ids/segment_ids/positions [N, P+R] (positions count real tokens only, so left padding is
    invisible) and response_ids/response_mask [N, R]; response token j sits at column P + j.
    """
    chex.assert_equal_shape([prompt_ids, prompt_mask])
    chex.assert_equal_shape([response_ids, response_mask])
    chex.assert_equal(prompt_ids.shape[0], response_ids.shape[0])
    input_ids = np.concatenate([prompt_ids, response_ids], axis=1).astype(np.int32)
    segment_ids = np.concatenate([prompt_mask, response_mask], axis=1).astype(np.int32)
    positions = np.asarray(positions_from_segments(jnp.asarray(segment_ids)))
    return {"input_ids": input_ids, "segment_ids": segment_ids, "positions": positions,
            "response_ids": response_ids.astype(np.int32), "response_mask": response_mask.astype(np.float32)}


def map_position_chunks(fn: Callable[[jax.Array, jax.Array], tuple[jax.Array, ...]], hidden: jax.Array,
                        targets: jax.Array, chunk_size: Optional[int] = None) -> tuple[jax.Array, ...]:
    """fn(hidden [B,c,H], targets [B,c]) -> tuple of [B,c] arrays, applied `chunk_size` positions at a time.

    The vocabulary projection is the largest activation of a language-model loss ([B,T,V] float32: 1.7 MiB per
    token for a 152K vocabulary, several times over for log-softmax and entropy). With `chunk_size`, only one
    [B, chunk, V] slice exists at a time and it is recomputed in the backward pass (`jax.checkpoint`), so the
    residuals are the [B,T,H] hidden states alone. None (or chunk_size >= T) applies fn once.
    """
    chex.assert_rank([hidden, targets], [3, 2])
    chex.assert_equal_shape_prefix([hidden, targets], 2)
    b, t = targets.shape
    if chunk_size is None or chunk_size >= t:
        return fn(hidden, targets)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    n = -(-t // chunk_size)
    pad = n * chunk_size - t
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk_size, hidden.shape[-1])
    tg = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk_size)
    outs = jax.lax.map(lambda xs: jax.checkpoint(fn)(*xs), (jnp.swapaxes(h, 0, 1), jnp.swapaxes(tg, 0, 1)))
    return tuple(jnp.swapaxes(o, 0, 1).reshape(b, n * chunk_size)[:, :t] for o in outs)


def response_logprobs(graphdef: nnx.GraphDef, params: Any, batch: Batch, *, temperature: float = 1.0,
                      logits_chunk_size: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
    """Per-token log-prob of each response token and the policy entropy there, both [N, R] float32.

    `params` is the model's state, or a tuple of partial states (e.g. trainable, frozen) merged in order.
    Token j of the response is predicted by the hidden state at column P + j - 1. `logits_chunk_size` bounds
    the vocabulary projection's memory (see `map_position_chunks`); the values do not depend on it.
    """
    model = nnx.merge(graphdef, *params) if isinstance(params, tuple) else nnx.merge(graphdef, params)
    n, r = batch["response_ids"].shape
    chex.assert_shape(batch["input_ids"], (n, None))
    hidden, _ = model.hidden_states(batch["input_ids"], batch["positions"], batch["segment_ids"],
                                    dropout_seeds=batch.get(DROPOUT_SEED_KEY))  # present in update batches only
    p = batch["input_ids"].shape[1] - r
    hidden = jax.lax.dynamic_slice_in_dim(hidden, p - 1, r, axis=1)

    def head(h: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = model.logits_from_hidden(h)
        if temperature != 1.0:
            logits = logits / temperature
        return token_logprobs_and_entropy(logits, targets)

    return map_position_chunks(head, hidden, batch["response_ids"], logits_chunk_size)
