"""Rollout tensors for training: [left-padded prompt | right-padded response] rows and their response log-probs.

The policy, old-policy and reference log-probs are all computed by `response_logprobs`, a pure function of
(graphdef, params, batch) that runs the decoder once over the joined rows and projects only the response positions
to the vocabulary (the prompt's logits are never materialised).
"""
from __future__ import annotations

from typing import Any, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from toolrl_jax.models.decoder import positions_from_segments

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


def token_logprobs(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log p(target) and the entropy of each float32 distribution. logits [..., V], targets [...]."""
    logp_all = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy


def response_logprobs(graphdef: nnx.GraphDef, params: Any, batch: Batch, *,
                      temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Per-token log-prob of each response token and the policy entropy there, both [N, R] float32.

    `params` is the model's state, or a tuple of partial states (e.g. trainable, frozen) merged in order.
    Token j of the response is predicted by the hidden state at column P + j - 1.
    """
    model = nnx.merge(graphdef, *params) if isinstance(params, tuple) else nnx.merge(graphdef, params)
    n, r = batch["response_ids"].shape
    chex.assert_shape(batch["input_ids"], (n, None))
    hidden, _ = model.hidden_states(batch["input_ids"], batch["positions"], batch["segment_ids"])
    p = batch["input_ids"].shape[1] - r
    hidden = jax.lax.dynamic_slice_in_dim(hidden, p - 1, r, axis=1)
    logits = model.logits_from_hidden(hidden)
    if temperature != 1.0:
        logits = logits / temperature
    return token_logprobs(logits, batch["response_ids"])
