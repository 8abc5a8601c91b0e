"""Continuous-batching rollout kernels: a fixed set of decode slots whose finished rows are refilled from a queue.

The static engine (`engine.generate_tokens`) decodes a batch until its longest row stops, so every finished row
keeps costing a decode step. Here, as in JetStream's prefill / insert / generate split and vLLM's or SGLang's
continuous batching, a fixed number S of slots decodes together and the host refills a slot as soon as its row
ends:

* `insert` prefills k pending prompts once (left-padded to the call's prompt bucket), chooses each sample's first
  token, and copies every prompt's KV rows to its samples' free slots (GRPO groups share one prefill);
* `decode` runs decode steps in a `while_loop` until enough slots are free for the next insert (or none is
  active).

All slots share one write index into a KV cache of L = max prompt bucket + budget columns: an inserted prompt is
written to end at the current index and its tokens follow it, so the running rows use the columns [index - span,
index), span being the oldest running row's prompt bucket plus its steps. Each decode call first moves those
columns to the front of the cache (in place, a chunk at a time: `move_to_front`) and then attends over the first W
columns only, stopping when they are full: W is one of a few static sizes, the smallest that holds the span plus
some room (`scheduler.WindowPolicy`; W = L when windows are off). A step's attention thus reads W columns instead
of L while the oldest row is young, with no second copy of the cache. Causality comes from the token positions the
cache stores (`KVCache.positions`), so where a row's columns sit never matters. A row's key is derived from (call
key, prompt index, sample number) and folded with the row's own step, exactly as in the static engine, so a row's
tokens do not depend on its slot or on when it ran.

State is a dict of arrays with static shapes (S slots, L cache slots, R response columns); both kernels are pure
functions that the `ContinuousEngine` host loop (`sampling/scheduler.py`) jits, with the state donated.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from toolrl_jax.models.config import ModelConfig
from toolrl_jax.models.decoder import CausalLM, KVCache, init_cache
from toolrl_jax.sampling.engine import BatchSharding, DecodeSpec, _constrain, _constrain_cache, prefill, row_keys
from toolrl_jax.sampling.processors import select_tokens

SlotState = dict  # name -> array with a leading slot axis (plus "cache", a KVCache over the slots)


@dataclasses.dataclass(frozen=True)
class SlotSpec:
    """Static shape of a slot state: `slots` rows decoding together, each with a KV cache of `cache_len` columns
    (the prompt bucket + the budget); `window`: the leading columns a decode call attends over, fewer than
    cache_len (None: all of them, so that each attended width has one spec and one compiled program)."""

    decode: DecodeSpec
    slots: int
    cache_len: int
    window: Optional[int] = None

    def __post_init__(self) -> None:
        if self.window is not None and not 1 <= self.window < self.cache_len:
            raise ValueError(f"SlotSpec.window must be in [1, cache_len={self.cache_len}) or None (all columns), "
                             f"got {self.window}")

    @property
    def prompt_width(self) -> int:
        return self.cache_len - self.decode.max_new_tokens

    @property
    def attended(self) -> int:
        return self.window or self.cache_len

    def with_window(self, size: int) -> "SlotSpec":
        """This spec attending over `size` leading columns (window None when that is all of them)."""
        return dataclasses.replace(self, window=size if size < self.cache_len else None)


def init_slots(config: ModelConfig, spec: SlotSpec, sharding: Optional[BatchSharding] = None) -> SlotState:
    """Empty slots (none active). Keys are stored as raw key data so they can be scattered like other arrays."""
    s, budget = spec.slots, spec.decode.max_new_tokens
    key_data = jax.random.key_data(jax.random.key(0))
    state = dict(
        cache=_constrain_cache(dataclasses.replace(  # the index starts where a first prompt fits before it
            init_cache(config, s, spec.cache_len, spec.decode.cache_dtype),
            index=jnp.asarray(spec.prompt_width, jnp.int32)), sharding),
        last=jnp.zeros((s,), jnp.int32), step=jnp.zeros((s,), jnp.int32), budget=jnp.zeros((s,), jnp.int32),
        prompt_len=jnp.zeros((s,), jnp.int32), start=jnp.zeros((s,), jnp.int32),
        key_data=jnp.zeros((s,) + key_data.shape, key_data.dtype),
        active=jnp.zeros((s,), bool), stopped=jnp.zeros((s,), bool),
        tokens=jnp.full((s, budget), spec.decode.pad_id, jnp.int32), logprobs=jnp.zeros((s, budget), jnp.float32))
    if spec.decode.tempered_logprobs:
        state["tempered_logprobs"] = jnp.zeros((s, budget), jnp.float32)
    state = {name: value if name == "cache" else _constrain(value, sharding) for name, value in state.items()}
    state["decode_steps"] = jnp.zeros((), jnp.int32)  # a counter for the engine's statistics
    return state


def _choose(spec: DecodeSpec, logits: jax.Array, key_data: jax.Array, steps: jax.Array, temperature: jax.Array,
            top_p: jax.Array):
    """One token per row, with the row's key folded with the row's own step (as the static engine does)."""
    keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(key_data), steps)
    return select_tokens(logits, keys, temperature, top_p, greedy=spec.greedy, top_k=spec.top_k,
                         use_top_p=spec.use_top_p, tempered=spec.tempered_logprobs)


def _stops(spec: DecodeSpec, tokens: jax.Array) -> jax.Array:
    if spec.ignore_stop or not spec.stop_token_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(spec.stop_token_ids, jnp.int32))


def insert(graphdef: nnx.GraphDef, state: nnx.State, slots: SlotState, prompt_ids: jax.Array,
           prompt_segments: jax.Array, prompt_index: jax.Array, sample_index: jax.Array, slot_ids: jax.Array,
           budgets: jax.Array,
           key: jax.Array, temperature: jax.Array, top_p: jax.Array, *, spec: SlotSpec,
           sharding: Optional[BatchSharding] = None, on_trace: Optional[Callable[[tuple], None]] = None
           ) -> SlotState:
    """Starts k prompts x n samples in the slots `slot_ids`.

    prompt_ids/prompt_segments: [k, P] left-padded (segment 0 = padding; an all-padding row is a dummy);
    prompt_index: [k] global prompt numbers and sample_index: [k*n] sample numbers (they seed the row keys);
    slot_ids: [k*n] the slot of each (prompt, sample) row, prompt-major, with S (out of range) for rows to drop;
    budgets: [k*n] each row's token budget.
    Every prompt is prefilled once; its KV rows are copied into its samples' slots so that the prompt ends at the
    shared write index, and each row's first token is chosen from the prompt's last logits.
    """
    if on_trace is not None:
        on_trace(("insert", prompt_ids.shape, spec))
    chex.assert_rank([prompt_ids, prompt_segments, prompt_index, sample_index, slot_ids, budgets],
                     [2, 2, 1, 1, 1, 1])
    chex.assert_equal_shape([prompt_ids, prompt_segments])
    d = spec.decode
    n, (k, width) = d.group_size, prompt_ids.shape
    chex.assert_shape([slot_ids, budgets, sample_index], (k * n,))
    model: CausalLM = nnx.merge(graphdef, state)
    prompt_segments = _constrain(prompt_segments.astype(jnp.int32), sharding)
    small = _constrain_cache(init_cache(model.config, k, width, d.cache_dtype), sharding)
    last_hidden, small = prefill(model, _constrain(prompt_ids.astype(jnp.int32), sharding), prompt_segments, small,
                                 d.prefill_chunk)
    source = jnp.repeat(jnp.arange(k, dtype=jnp.int32), n)  # the prompt of every (prompt, sample) row
    logits = model.logits_from_hidden(last_hidden)[source]
    key_data = jax.random.key_data(row_keys(key, prompt_index, sample_index))
    choice = _choose(d, logits, key_data, jnp.zeros((k * n,), jnp.int32), temperature, top_p)
    stopped = _stops(d, choice.tokens)

    cache: KVCache = slots["cache"]
    # The prompt's columns; the write index is never below the prompt bucket (init_slots, move_to_front).
    columns = cache.index - width + jnp.arange(width, dtype=jnp.int32)
    rows, cols = slot_ids[:, None], columns[None, :]

    def place(big: jax.Array, part: jax.Array) -> jax.Array:
        return big.at[rows, cols].set(part[source].astype(big.dtype), mode="drop")

    def clear_and_place(big: jax.Array, part: jax.Array) -> jax.Array:  # forget the slot's previous row
        return place(big.at[slot_ids].set(0, mode="drop"), part)

    cache = KVCache(keys=tuple(place(b, p) for b, p in zip(cache.keys, small.keys)),
                    values=tuple(place(b, p) for b, p in zip(cache.values, small.values)),
                    segment_ids=clear_and_place(cache.segment_ids, small.segment_ids), index=cache.index,
                    positions=clear_and_place(cache.positions, small.positions))
    out = dict(slots)
    out["cache"] = _constrain_cache(cache, sharding)

    def put(name: str, value: jax.Array) -> None:
        out[name] = _constrain(slots[name].at[slot_ids].set(value.astype(slots[name].dtype), mode="drop"), sharding)

    def first_column(value: jax.Array, fill) -> jax.Array:
        row = jnp.full((k * n, d.max_new_tokens), fill, jnp.asarray(value).dtype)
        return row.at[:, 0].set(value)

    put("last", choice.tokens)
    put("step", jnp.ones((k * n,), jnp.int32))
    put("budget", budgets.astype(jnp.int32))
    put("prompt_len", jnp.sum(prompt_segments != 0, axis=1).astype(jnp.int32)[source])
    put("start", jnp.full((k * n,), columns[0], jnp.int32))  # the column of the row's first (padded) prompt slot
    put("key_data", key_data)
    put("stopped", stopped)
    put("active", ~stopped & (budgets > 1))
    put("tokens", first_column(choice.tokens, d.pad_id))
    put("logprobs", first_column(choice.logprobs, 0.0))
    if d.tempered_logprobs:
        put("tempered_logprobs", first_column(choice.tempered_logprobs, 0.0))
    return out


def compact(slots: SlotState, keep: jax.Array, *, spec: SlotSpec, sharding: Optional[BatchSharding] = None
            ) -> SlotState:
    """The slots `keep` [spec.slots] of a larger slot state, in that order: the drain phase's smaller batch.

    Once the queue is empty, finished rows leave idle slots that every decode step would still compute (and whose
    KV caches it would still read); the host moves the rows still running into a state with half the slots (each
    size compiles once). Rows keep their caches, steps and keys, and the write index is shared, so their tokens are
    unchanged."""
    chex.assert_shape(keep, (spec.slots,))
    cache: KVCache = slots["cache"]
    cache = KVCache(keys=tuple(k[keep] for k in cache.keys), values=tuple(v[keep] for v in cache.values),
                    segment_ids=cache.segment_ids[keep], index=cache.index, positions=cache.positions[keep])
    out = {name: value[keep] for name, value in slots.items() if name not in ("cache", "decode_steps")}
    out = {name: _constrain(value, sharding) for name, value in out.items()}
    return dict(out, cache=_constrain_cache(cache, sharding), decode_steps=slots["decode_steps"])


def decode(graphdef: nnx.GraphDef, state: nnx.State, slots: SlotState, free_target: jax.Array,
           temperature: jax.Array, top_p: jax.Array, *, spec: SlotSpec, sharding: Optional[BatchSharding] = None,
           on_trace: Optional[Callable[[tuple], None]] = None) -> SlotState:
    """Decode steps over all slots until at least `free_target` slots are inactive, or none is active, or (with a
    window) the window is full.

    The running rows' columns move to the front of the cache first (`move_to_front`). A step feeds every active
    row's last token at its own position, attends over the first `spec.attended` columns, writes its KV at the
    shared write index, and
    records the next token in the row's own column; a row stops at a stop token or at its budget.
    """
    if on_trace is not None:
        on_trace(("decode", spec))
    d = spec.decode
    model: CausalLM = nnx.merge(graphdef, state)
    s, budget = spec.slots, d.max_new_tokens
    everyone = jnp.arange(s, dtype=jnp.int32)

    def cond(c: SlotState) -> jax.Array:
        room = c["cache"].index < spec.attended
        return (jnp.sum(~c["active"]) < free_target) & jnp.any(c["active"]) & room

    def body(c: SlotState) -> SlotState:
        active = c["active"]
        # The last token sits at position prompt_len + step - 1 (the static engine's `body` with per-row steps).
        positions = (c["prompt_len"] + c["step"] - 1)[:, None]
        hidden, cache = model.hidden_states(c["last"][:, None], positions, active.astype(jnp.int32)[:, None],
                                            cache=c["cache"], attend_len=spec.window)
        logits = _constrain(model.logits_from_hidden(hidden[:, 0]), sharding)
        choice = _choose(d, logits, c["key_data"], c["step"], temperature, top_p)
        token = jnp.where(active, choice.tokens, d.pad_id)
        column = jnp.where(active, c["step"], budget)  # out of range for idle slots: dropped

        def write(buffer: jax.Array, value: jax.Array) -> jax.Array:
            return _constrain(buffer.at[everyone, column].set(value.astype(buffer.dtype), mode="drop"), sharding)

        out = dict(c)
        out["cache"] = _constrain_cache(cache, sharding)
        out["tokens"] = write(c["tokens"], token)
        out["logprobs"] = write(c["logprobs"], choice.logprobs)
        if d.tempered_logprobs:
            out["tempered_logprobs"] = write(c["tempered_logprobs"], choice.tempered_logprobs)
        stop = active & _stops(d, token)
        step = c["step"] + active.astype(jnp.int32)
        out["step"], out["stopped"], out["last"] = step, c["stopped"] | stop, jnp.where(active, token, c["last"])
        out["active"] = active & ~stop & (step < c["budget"])
        out["decode_steps"] = c["decode_steps"] + 1
        return out

    return jax.lax.while_loop(cond, body, move_to_front(slots, spec, sharding))


MOVE_CHUNK = 64  # columns per step of `move_to_front`'s in-place move (then single columns for the remainder)


def move_to_front(slots: SlotState, spec: SlotSpec, sharding: Optional[BatchSharding] = None) -> SlotState:
    """The slot state with the running rows' columns [index - span, index) moved to [0, span) of the cache (span:
    the oldest running row's prompt bucket plus its steps, at least one prompt bucket), the write index set to
    span and every later column cleared (segment 0), so a decode call may attend over a prefix of the cache.

    The move runs in place, MOVE_CHUNK columns and then single columns at a time, front to back (each piece is
    read before anything overwrites it), so it needs no second cache; it is skipped when the columns are at the
    front already."""
    cache: KVCache = slots["cache"]
    chex.assert_shape([slots["active"], slots["start"]], (spec.slots,))
    span = jnp.maximum(jnp.max(jnp.where(slots["active"], cache.index - slots["start"], 0)), spec.prompt_width)
    shift = cache.index - span
    arrays = (*cache.keys, *cache.values, cache.segment_ids, cache.positions)

    def moved(arrays: tuple, count: jax.Array, size: int, offset: jax.Array) -> tuple:
        def body(i: jax.Array, arrays: tuple) -> tuple:
            at = offset + i * size
            return tuple(jax.lax.dynamic_update_slice_in_dim(
                a, jax.lax.dynamic_slice_in_dim(a, shift + at, size, axis=1), at, axis=1) for a in arrays)
        return jax.lax.fori_loop(0, jnp.where(shift > 0, count, 0), body, arrays)

    chunk = min(MOVE_CHUNK, spec.cache_len)
    chunks = span // chunk
    arrays = moved(arrays, chunks, chunk, jnp.zeros((), jnp.int32))
    arrays = moved(arrays, span % chunk, 1, chunks * chunk)
    layers = len(cache.keys)
    segment_ids = jnp.where(jnp.arange(spec.cache_len, dtype=jnp.int32)[None, :] < span, arrays[-2], 0)
    cache = KVCache(keys=arrays[:layers], values=arrays[layers:2 * layers], segment_ids=segment_ids,
                    positions=arrays[-1], index=span.astype(jnp.int32))
    return dict(slots, cache=_constrain_cache(cache, sharding), start=_constrain(slots["start"] - shift, sharding))
