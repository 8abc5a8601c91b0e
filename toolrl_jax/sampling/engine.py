"""The jitted rollout kernel: prefill left-padded prompts once, copy each prompt's KV cache rows to its samples,
then decode inside `jax.lax.while_loop` until every row has stopped or the token budget is spent.

Everything here is a pure function of (graphdef, params state, arrays) with static shapes; the Sampler wraps it in
`jax.jit`. The KV cache is allocated inside the jitted function and threaded through the loop carry, so XLA updates
it in place (no host round trip and no copies per step); parameters are read-only and reused across calls.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from toolrl_jax.models.decoder import CausalLM, KVCache, init_cache, positions_from_segments
from toolrl_jax.sampling.processors import select_tokens


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """Static (compile-time) description of one generate call; every distinct value compiles once."""

    max_new_tokens: int
    group_size: int
    greedy: bool
    top_k: int
    use_top_p: bool
    stop_token_ids: tuple[int, ...]
    ignore_stop: bool
    tempered_logprobs: bool
    pad_id: int
    cache_dtype: str
    prefill_chunk: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class BatchSharding:
    """Where batch-major arrays live: batch over `batch_axes` of `mesh`, KV heads over `head_axis` if set."""

    mesh: Mesh
    batch_axes: tuple[str, ...]
    head_axis: Optional[str] = None

    def batch(self, ndim: int) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(self.batch_axes or None, *([None] * (ndim - 1))))

    def kv(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(self.batch_axes or None, None, self.head_axis, None))

    @property
    def data_parallel_size(self) -> int:
        size = 1
        for axis in self.batch_axes:
            size *= self.mesh.shape[axis]
        return size


def _constrain_cache(cache: KVCache, sharding: Optional[BatchSharding]) -> KVCache:
    if sharding is None:
        return cache
    kv = sharding.kv()
    return KVCache(keys=tuple(jax.lax.with_sharding_constraint(k, kv) for k in cache.keys),
                   values=tuple(jax.lax.with_sharding_constraint(v, kv) for v in cache.values),
                   segment_ids=jax.lax.with_sharding_constraint(cache.segment_ids, sharding.batch(2)),
                   index=cache.index, positions=jax.lax.with_sharding_constraint(cache.positions, sharding.batch(2)))


def _constrain(x: jax.Array, sharding: Optional[BatchSharding]) -> jax.Array:
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding.batch(x.ndim))


def expand_cache(cache: KVCache, group_size: int, extra_slots: int) -> KVCache:
    """Repeats every row `group_size` times (row b -> rows b*n .. b*n+n-1) and appends `extra_slots` empty slots."""

    def grow(x: jax.Array) -> jax.Array:
        x = jnp.repeat(x, group_size, axis=0) if group_size > 1 else x
        pad = [(0, 0)] * x.ndim
        pad[1] = (0, extra_slots)
        return jnp.pad(x, pad)

    return KVCache(keys=tuple(grow(k) for k in cache.keys), values=tuple(grow(v) for v in cache.values),
                   segment_ids=grow(cache.segment_ids), index=cache.index, positions=grow(cache.positions))


def row_keys(key: jax.Array, prompt_index: jax.Array, sample_index: jax.Array) -> jax.Array:
    """One key per output row, derived from (call key, global prompt number, sample number).

    prompt_index: [B] prompt numbers; sample_index: [B*n] each row's sample number (prompt-major rows). Rows therefore
    draw independent streams, and a row's samples do not depend on how prompts were chunked, padded, bucketed or
    placed in decode slots.
    """
    n = sample_index.shape[0] // prompt_index.shape[0]
    prompt = jnp.repeat(prompt_index.astype(jnp.int32), n)
    per_prompt = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, prompt)
    return jax.vmap(jax.random.fold_in)(per_prompt, sample_index.astype(jnp.int32))


def prefill(model: CausalLM, prompt_ids: jax.Array, prompt_segments: jax.Array, cache: KVCache,
            chunk: Optional[int], position_offset: Optional[jax.Array] = None) -> tuple[jax.Array, KVCache]:
    """Runs the left-padded prompts through the model, filling `cache`; returns the last position's hidden [B, H].

    With `chunk` < P the prompt goes through in P / chunk pieces (a fori_loop that advances the cache index), so
    attention scores are [B, heads, chunk, P] instead of [B, heads, P, P]; the result is the same.
    position_offset [B]: the tokens each row already has in `cache` (its new tokens continue from there).
    """
    positions = positions_from_segments(prompt_segments)
    if position_offset is not None:
        positions = positions + position_offset.astype(jnp.int32)[:, None]
    batch, length = prompt_ids.shape
    if chunk is None or length <= chunk:
        hidden, cache = model.hidden_states(prompt_ids, positions, prompt_segments, cache=cache)
        return hidden[:, -1], cache
    if length % chunk:
        raise ValueError(f"padded prompt length {length} is not a multiple of prefill_chunk {chunk}")

    def piece(x: jax.Array, i: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)

    def body(i, carry):
        cache, _ = carry
        hidden, cache = model.hidden_states(piece(prompt_ids, i), piece(positions, i), piece(prompt_segments, i),
                                            cache=cache)
        return cache, hidden[:, -1]

    last = jnp.zeros((batch, model.config.hidden_size), jnp.dtype(model.config.dtype))
    cache, last = jax.lax.fori_loop(0, length // chunk, body, (cache, last))
    return last, cache


def generate_tokens(graphdef: nnx.GraphDef, state: nnx.State, prompt_ids: jax.Array, prompt_segments: jax.Array,
                    prompt_index: jax.Array, sample_index: jax.Array, budgets: jax.Array, key: jax.Array,
                    temperature: jax.Array,
                    top_p: jax.Array, *,
                    spec: DecodeSpec, sharding: Optional[BatchSharding] = None,
                    on_trace: Optional[Callable[[tuple], None]] = None) -> dict[str, jax.Array]:
    """Samples `spec.group_size` responses for each of B left-padded prompts.

    prompt_ids/prompt_segments: [B, P] int32 (segment 0 = padding, on the left); prompt_index: [B] global prompt
    numbers and sample_index: [B*n] each row's sample number (they seed the per-row keys, `row_keys`); budgets: [B*n]
    each row's token budget (<= spec.max_new_tokens); key: a PRNG
    key. Returns arrays with B*n rows, prompt-major:
    tokens [B*n, R] (pad_id after the stop), logprobs [B*n, R] float32 (0 after the stop), lengths [B*n]
    (generated tokens including the stop token), stopped [B*n] bool, and tempered_logprobs [B*n, R] when
    spec.tempered_logprobs.
    """
    if on_trace is not None:
        on_trace((prompt_ids.shape, spec))
    chex.assert_rank([prompt_ids, prompt_segments, prompt_index], [2, 2, 1])
    chex.assert_equal_shape([prompt_ids, prompt_segments])
    chex.assert_equal(prompt_index.shape[0], prompt_ids.shape[0])
    chex.assert_shape([budgets, sample_index], (prompt_ids.shape[0] * spec.group_size,))
    model: CausalLM = nnx.merge(graphdef, state)
    batch, prompt_len = prompt_ids.shape
    n, budget = spec.group_size, spec.max_new_tokens

    # Prefill each prompt once (in chunks when long); only the last position's logits are formed (left padding puts
    # every prompt's last token in the last column), never the [B, P, V] logits tensor. Dummy rows that pad the
    # batch have segment 0 everywhere: they compute harmless garbage and are dropped by the caller.
    prompt_segments = _constrain(prompt_segments.astype(jnp.int32), sharding)
    prompt_ids = _constrain(prompt_ids.astype(jnp.int32), sharding)
    budgets = _constrain(budgets.astype(jnp.int32), sharding)
    cache = _constrain_cache(init_cache(model.config, batch, prompt_len, spec.cache_dtype), sharding)
    last_hidden, cache = prefill(model, prompt_ids, prompt_segments, cache, spec.prefill_chunk)
    last_logits = model.logits_from_hidden(last_hidden)  # [B, V] float32
    prompt_lengths = jnp.sum(prompt_segments != 0, axis=1).astype(jnp.int32)

    # Share the prompt across its samples: copy KV rows instead of recomputing them.
    cache = _constrain_cache(expand_cache(cache, n, budget), sharding)
    if n > 1:
        last_logits = jnp.repeat(last_logits, n, axis=0)
        prompt_lengths = jnp.repeat(prompt_lengths, n)
    keys = row_keys(key, prompt_index, sample_index)
    out = decode_loop(model, cache, last_logits, prompt_lengths, keys, budgets, temperature, top_p, spec=spec,
                      sharding=sharding)
    del out["cache"]  # not an output: XLA keeps it inside the program
    return out


def decode_loop(model: CausalLM, cache: KVCache, last_logits: jax.Array, prompt_lengths: jax.Array, keys: jax.Array,
                budgets: jax.Array, temperature: jax.Array, top_p: jax.Array, *, spec: DecodeSpec,
                sharding: Optional[BatchSharding] = None) -> dict[str, jax.Array]:
    """Samples each row's first token from `last_logits` [rows, V], then decodes in a `while_loop` until every row
    has stopped or spent its budget (budgets [rows]; a row with budget 0 takes no part), writing the cache at its
    shared index. Row r's token t is drawn with fold_in(keys[r], t); its previous token sits at position
    prompt_lengths[r] + t - 1. A finished row's later cache columns get segment 0, so they are never attended to
    (a session continues rows over the same cache, `sampling/sessions.py`): the cache then holds every row's prompt
    and its generated tokens but the last. Returns tokens, logprobs (and tempered_logprobs), lengths, stopped, and
    the cache."""
    rows, budget = keys.shape[0], spec.max_new_tokens
    stop_ids = jnp.asarray(spec.stop_token_ids or (-1,), jnp.int32)

    def choose(logits: jax.Array, step: jax.Array):
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        return select_tokens(logits, step_keys, temperature, top_p, greedy=spec.greedy, top_k=spec.top_k,
                             use_top_p=spec.use_top_p, tempered=spec.tempered_logprobs)

    def record(carry: dict, choice, step: jax.Array) -> dict:
        active = ~carry["done"]
        token = jnp.where(active, choice.tokens, spec.pad_id)
        out = dict(carry)

        def write(buffer, column):
            return jax.lax.dynamic_update_slice(buffer, column[:, None].astype(buffer.dtype), (0, step))

        out["tokens"] = write(carry["tokens"], token)
        out["logprobs"] = write(carry["logprobs"], jnp.where(active, choice.logprobs, 0.0))
        if spec.tempered_logprobs:
            out["tempered_logprobs"] = write(carry["tempered_logprobs"],
                                             jnp.where(active, choice.tempered_logprobs, 0.0))
        out["lengths"] = carry["lengths"] + active.astype(jnp.int32)
        if not spec.ignore_stop and spec.stop_token_ids:
            out["stopped"] = carry["stopped"] | (active & jnp.isin(token, stop_ids))
            out["done"] = carry["done"] | out["stopped"]
        out["done"] = out["done"] | (out["lengths"] >= budgets)
        out["last"] = token
        return out

    zeros_f = _constrain(jnp.zeros((rows, budget), jnp.float32), sharding)
    carry: dict = dict(
        step=jnp.ones((), jnp.int32),
        cache=cache,
        last=jnp.zeros((rows,), jnp.int32),
        tokens=_constrain(jnp.full((rows, budget), spec.pad_id, jnp.int32), sharding),
        logprobs=zeros_f,
        lengths=jnp.zeros((rows,), jnp.int32),
        stopped=jnp.zeros((rows,), bool),
        done=budgets < 1,
    )
    if spec.tempered_logprobs:
        carry["tempered_logprobs"] = zeros_f
    carry = record(carry, choose(last_logits, jnp.zeros((), jnp.int32)), jnp.zeros((), jnp.int32))

    def cond(c: dict) -> jax.Array:
        return (c["step"] < budget) & ~jnp.all(c["done"])

    def body(c: dict) -> dict:
        step = c["step"]
        # The previous token sits at position prompt_len + step - 1 and is written at the cache's index.
        positions = (prompt_lengths + step - 1)[:, None]
        live = (~c["done"]).astype(jnp.int32)[:, None]
        hidden, cache = model.hidden_states(c["last"][:, None], positions, live, cache=c["cache"])
        logits = _constrain(model.logits_from_hidden(hidden[:, 0]), sharding)
        out = record(c, choose(logits, step), step)
        out["cache"] = _constrain_cache(cache, sharding)
        out["step"] = step + 1
        return out

    carry = jax.lax.while_loop(cond, body, carry)
    names = ("tokens", "logprobs", "lengths", "stopped", "cache") + \
        (("tempered_logprobs",) if spec.tempered_logprobs else ())
    return {name: carry[name] for name in names}
