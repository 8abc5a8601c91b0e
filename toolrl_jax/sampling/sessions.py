"""KV reuse across the turns of multi-turn rollouts: each row keeps its cache between generate calls, and a call
prefills only the tokens its new prompt adds (the previous turn's last token, the tool results, the next generation
prompt) instead of the whole conversation.

A multi-turn rollout asks for turn k+1 with a prompt that extends turn k's prompt and generated tokens exactly (the
rollout appends template tokens and never re-tokenises, `multiturn/templates.py`). Re-prefilling that conversation
every turn costs O(turns x conversation) prompt tokens per trajectory; here a `Session` holds one KV-cache row per
trajectory for the whole rollout, as vLLM's and SGLang's prefix caches (SGLang's radix cache for multi-turn chats)
and veRL's multi-turn rollouts through those servers keep a conversation's cache between requests.

`continue_rows` is the jitted kernel: it runs each row's new tokens (left-padded chunk) through the model at
positions that continue the row's cached tokens, writing them at the cache's shared index, then decodes as the
static engine does (`engine.decode_loop`); a finished row's later columns are masked, so the cache always holds
exactly each row's prompt and generated tokens but the last. Row keys are the static engine's (call key, prompt
number, sample number), so a turn samples the tokens a full re-prefill would (up to float rounding of the cached
keys and values: equal tokens and log-probs within 1e-5 in float32, tests/test_sampling_sessions.py).

`SessionGenerator` is the host side, a drop-in `multiturn.generation.GenerateFn`: it continues its session when
every requested row is one of the session's, its prompt extends what the row's cache holds, the weights are the
ones the cache was computed with, and the cache has room; anything else (a new rollout, new weights, a prompt that
does not extend, a full cache) starts a new session from the whole prompts, so results never depend on reuse.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Callable, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from toolrl_jax.models.decoder import CausalLM, KVCache, init_cache
from toolrl_jax.sampling.config import SamplingConfig, next_power_of_two, prompt_length_bucket
from toolrl_jax.sampling.engine import (
    BatchSharding,
    DecodeSpec,
    _constrain,
    _constrain_cache,
    decode_loop,
    prefill,
    row_keys,
)
from toolrl_jax.sampling.scheduler import _round_up, to_numpy

MIN_CHUNK = 16  # the smallest padded width of a continuation chunk (widths are powers of two from here)
# Cache columns a session reserves per turn beyond the turn's tokens: the padding of the turn's continuation chunk.
TURN_CHUNK_ALLOWANCE = 64


def session_cache_len(prompt_bucket: int, response_tokens: int, turns: int) -> int:
    """Columns of a session cache that holds a whole conversation without a restart: the opening prompt's bucket,
    every token the trajectory adds (sampled and tool results), and each turn's chunk padding."""
    return prompt_bucket + response_tokens + turns * TURN_CHUNK_ALLOWANCE


def continue_rows(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, cached_lengths: jax.Array,
                  chunk_ids: jax.Array, chunk_segments: jax.Array, prompt_index: jax.Array, sample_index: jax.Array,
                  budgets: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, *, spec: DecodeSpec,
                  sharding: Optional[BatchSharding] = None, on_trace: Optional[Callable[[tuple], None]] = None
                  ) -> dict[str, Any]:
    """Appends each row's new tokens to its cache and samples one response per row.

    cache: B rows whose first `cached_lengths` [B] tokens (positions 0..n-1) are already in it, anywhere before the
    shared index; chunk_ids/chunk_segments [B, E]: each row's new tokens, left-padded (segment 0); budgets [B]: each
    row's token budget (0: the row takes no part and its columns stay masked); prompt_index/sample_index [B]: the
    row-key numbers (group size 1). Returns the static engine's outputs plus the updated cache.
    """
    if on_trace is not None:
        on_trace(("continue", chunk_ids.shape, cache.segment_ids.shape, spec))
    chex.assert_rank([chunk_ids, chunk_segments, cached_lengths, prompt_index, sample_index, budgets],
                     [2, 2, 1, 1, 1, 1])
    chex.assert_equal_shape([chunk_ids, chunk_segments])
    chex.assert_shape([cached_lengths, prompt_index, sample_index, budgets], (chunk_ids.shape[0],))
    if spec.group_size != 1:
        raise ValueError(f"continue_rows samples one response per row, got group_size {spec.group_size}")
    model: CausalLM = nnx.merge(graphdef, state)
    segments = _constrain(chunk_segments.astype(jnp.int32), sharding)
    cached_lengths = _constrain(cached_lengths.astype(jnp.int32), sharding)
    last_hidden, cache = prefill(model, _constrain(chunk_ids.astype(jnp.int32), sharding), segments,
                                 _constrain_cache(cache, sharding), spec.prefill_chunk, position_offset=cached_lengths)
    last_logits = model.logits_from_hidden(last_hidden)
    lengths = cached_lengths + jnp.sum(segments != 0, axis=1).astype(jnp.int32)
    keys = row_keys(key, prompt_index, sample_index)
    return decode_loop(model, _constrain_cache(cache, sharding), last_logits, lengths, keys,
                       _constrain(budgets.astype(jnp.int32), sharding), temperature, top_p, spec=spec,
                       sharding=sharding)


def start_rows(graphdef: nnx.GraphDef, state: nnx.State, prompt_ids: jax.Array, prompt_segments: jax.Array,
               source: jax.Array, prompt_index: jax.Array, sample_index: jax.Array, budgets: jax.Array, key: jax.Array,
               temperature: jax.Array, top_p: jax.Array, *, spec: DecodeSpec, cache_len: int,
               sharding: Optional[BatchSharding] = None, on_trace: Optional[Callable[[tuple], None]] = None
               ) -> dict[str, Any]:
    """A new session: prefills U distinct left-padded prompts [U, P] once, copies prompt source[b] into cache row b
    of a [B, cache_len] cache (a GRPO group's trajectories share one opening prompt, as the static engine's samples
    do), and samples one response per row as `continue_rows` does. Returns its outputs and the new cache."""
    if on_trace is not None:
        on_trace(("start", prompt_ids.shape, source.shape, cache_len, spec))
    chex.assert_rank([prompt_ids, prompt_segments, source, prompt_index, sample_index, budgets], [2, 2, 1, 1, 1, 1])
    chex.assert_equal_shape([prompt_ids, prompt_segments])
    chex.assert_shape([prompt_index, sample_index, budgets], source.shape)
    model: CausalLM = nnx.merge(graphdef, state)
    segments = _constrain(prompt_segments.astype(jnp.int32), sharding)
    distinct, width = prompt_ids.shape
    cache = _constrain_cache(init_cache(model.config, distinct, cache_len, spec.cache_dtype), sharding)
    last_hidden, cache = prefill(model, _constrain(prompt_ids.astype(jnp.int32), sharding), segments, cache,
                                 spec.prefill_chunk)
    cache = KVCache(keys=tuple(k[source] for k in cache.keys), values=tuple(v[source] for v in cache.values),
                    segment_ids=cache.segment_ids[source], index=cache.index, positions=cache.positions[source])
    last_logits = model.logits_from_hidden(last_hidden)[source]
    lengths = jnp.sum(segments != 0, axis=1).astype(jnp.int32)[source]
    keys = row_keys(key, prompt_index, sample_index)
    return decode_loop(model, _constrain_cache(cache, sharding), last_logits, lengths, keys,
                       _constrain(budgets.astype(jnp.int32), sharding), temperature, top_p, spec=spec,
                       sharding=sharding)


@dataclasses.dataclass
class Session:
    """One rollout's cache: `rows` (the callers' row ids, in cache-row order), the tokens each row's cache holds,
    the cache itself (None while a kernel has it, and after one failed), its write index, the weights it was
    computed with, and its length."""

    rows: tuple[tuple[int, int], ...]
    cached: list[list[int]]
    cache: Optional[KVCache]
    index: int
    weights: Any
    cache_len: int


@dataclasses.dataclass(frozen=True, eq=False)
class SessionGeneration:
    """One row's turn (the fields of `multiturn.generation.Generation`)."""

    token_ids: np.ndarray
    logprobs: np.ndarray
    stopped: bool
    text: Optional[str] = None


class SessionGenerator:
    """A multi-turn `GenerateFn` over a `Sampler` that keeps each trajectory's KV cache between turns.

    config: the sampling settings (group size 1; its max_new_tokens is the response width of every call, as in
    `multiturn.generation.sampler_generate`). cache_len: columns of a session's cache; each call uses the width of
    its padded chunk plus its decode steps, and a call that would not fit starts a new session (so it bounds memory,
    never results; a restart whose prompts would not fit gets a longer cache). Default: the first prompt's bucket
    plus 4 turns of max_new_tokens and a chunk allowance each (`TURN_CHUNK_ALLOWANCE`).
    Statistics: `prefill_tokens` (padded chunk tokens run through the model), `new_sessions`, `continued_calls`.
    """

    def __init__(self, sampler: Any, config: SamplingConfig, cache_len: Optional[int] = None) -> None:
        self.sampler = sampler
        self.config = config.replace(group_size=1)
        self.cache_len = cache_len
        self.session: Optional[Session] = None
        self.prefill_tokens = 0
        self.new_sessions = 0
        self.continued_calls = 0

    def reset(self) -> None:
        """Drops the session's cache (e.g. after a rollout, to free its memory)."""
        self.session = None

    # ------------------------------------------------------------------ host logic
    def _continuable(self, prompts: list[np.ndarray], rows: list[tuple[int, int]]) -> Optional[list[int]]:
        """The session rows of `rows` when every prompt extends its row's cached tokens, else None."""
        session = self.session
        if session is None or session.cache is None or session.weights is not self.sampler._state:
            return None
        where = {row: i for i, row in enumerate(session.rows)}
        if len(set(rows)) != len(rows) or any(row not in where for row in rows):
            return None
        places = [where[row] for row in rows]
        for prompt, place in zip(prompts, places):
            cached = session.cached[place]
            if prompt.size <= len(cached) or prompt[:len(cached)].tolist() != cached:
                return None
        return places

    def _chunk_width(self, lengths: Sequence[int], fresh: bool) -> int:
        longest = max(lengths)
        if fresh:
            return prompt_length_bucket(longest, self.config)
        width = max(MIN_CHUNK, next_power_of_two(longest))
        chunk = self.config.prefill_chunk
        return -(-width // chunk) * chunk if chunk is not None and width > chunk else width

    def _multiple(self) -> int:
        """What batch sizes must be a multiple of: the sampler's data-parallel size."""
        return self.sampler.sharding.data_parallel_size if self.sampler.sharding else 1

    def _new_session(self, rows: list[tuple[int, int]], width: int) -> Session:
        batch = _round_up(next_power_of_two(len(rows)), self._multiple())
        budget = self.config.max_new_tokens
        if self.cache_len is None:  # fixed from the first session on, so the kernels' shapes stay the same
            self.cache_len = session_cache_len(width, 4 * budget, 4)
        cache_len = self.cache_len
        if width + budget > cache_len:  # a restart from long conversations: a longer cache (one more compile)
            cache_len = session_cache_len(width, 2 * budget, 2)
        dummies = [(-1, -1 - i) for i in range(batch - len(rows))]  # never requested: they only pad the batch
        self.new_sessions += 1
        return Session(rows=tuple(rows) + tuple(dummies), cached=[[] for _ in range(batch)], cache=None, index=0,
                       weights=self.sampler._state, cache_len=cache_len)

    def _row_arrays(self, places: list[int], rows: list[tuple[int, int]], budgets: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Budgets and key numbers per cache row (rows not asked for: budget 0)."""
        batch = len(self.session.rows)
        row_budgets, prompt_numbers, sample_numbers = (np.zeros((batch,), np.int32) for _ in range(3))
        for place, budget, (p, s) in zip(places, budgets, rows):
            row_budgets[place], prompt_numbers[place], sample_numbers[place] = budget, p, s
        return row_budgets, prompt_numbers, sample_numbers

    def _start(self, prompts: list[np.ndarray], rows: list[tuple[int, int]], budgets: np.ndarray, key: jax.Array
               ) -> dict[str, Any]:
        """A new session: each distinct prompt prefilled once, copied to its rows."""
        sampler, config = self.sampler, self.config
        self.session = None  # frees the old cache before the new one is allocated
        width = self._chunk_width([p.size for p in prompts], fresh=True)
        session = self.session = self._new_session(rows, width)
        batch = len(session.rows)
        distinct: dict[tuple[int, ...], int] = {}
        source = np.zeros((batch,), np.int32)  # dummy rows copy prompt 0 (with budget 0, they never decode)
        for place, prompt in enumerate(prompts):
            source[place] = distinct.setdefault(tuple(prompt.tolist()), len(distinct))
        count = _round_up(next_power_of_two(len(distinct)), self._multiple())
        ids = np.full((count, width), sampler.pad_id, np.int32)
        segments = np.zeros((count, width), np.int32)
        for prompt, i in distinct.items():
            ids[i, width - len(prompt):], segments[i, width - len(prompt):] = prompt, 1
        self.prefill_tokens += count * width
        row_budgets, prompt_numbers, sample_numbers = self._row_arrays(list(range(len(rows))), rows, budgets)
        place = sampler._place
        return sampler._start_rows(sampler._state, place(ids), place(segments), place(source), place(prompt_numbers),
                                   place(sample_numbers), place(row_budgets), key, np.float32(config.temperature),
                                   np.float32(config.top_p), spec=sampler.decode_spec(config),
                                   cache_len=session.cache_len)

    def _continue(self, prompts: list[np.ndarray], places: list[int], rows: list[tuple[int, int]],
                  budgets: np.ndarray, key: jax.Array, width: int) -> dict[str, Any]:
        """The session's rows `places` continue with the tokens their prompts add."""
        sampler, config, session = self.sampler, self.config, self.session
        batch = len(session.rows)
        chunk = np.full((batch, width), sampler.pad_id, np.int32)
        segments = np.zeros((batch, width), np.int32)
        for prompt, place in zip(prompts, places):
            new = prompt[len(session.cached[place]):]
            chunk[place, width - new.size:], segments[place, width - new.size:] = new, 1
        cached_lengths = np.array([len(c) for c in session.cached], np.int32)
        row_budgets, prompt_numbers, sample_numbers = self._row_arrays(places, rows, budgets)
        self.prefill_tokens += batch * width
        self.continued_calls += 1
        cache, session.cache = session.cache, None  # donated: unusable if the kernel fails
        return sampler._continue_rows(sampler._state, cache, sampler._place(cached_lengths), sampler._place(chunk),
                                      sampler._place(segments), sampler._place(prompt_numbers),
                                      sampler._place(sample_numbers), sampler._place(row_budgets), key,
                                      np.float32(config.temperature), np.float32(config.top_p),
                                      spec=sampler.decode_spec(config))

    def __call__(self, prompt_ids: list[list[int]], max_new_tokens: list[int], key: jax.Array,
                 rows: list[tuple[int, int]]) -> list[SessionGeneration]:
        sampler, config = self.sampler, self.config
        prompts = sampler._validate(prompt_ids, config)
        budgets = sampler._row_budgets(max_new_tokens, len(prompts), config)
        rows = [tuple(int(x) for x in row) for row in rows]
        if len(rows) != len(prompts):
            raise ValueError(f"{len(rows)} row ids for {len(prompts)} prompts")
        key = jax.random.key(int(key)) if isinstance(key, (int, np.integer)) else key
        places = self._continuable(prompts, rows)
        width = None
        if places is not None:
            width = self._chunk_width([p.size - len(self.session.cached[i]) for p, i in zip(prompts, places)], False)
            if self.session.index + width + config.max_new_tokens > self.session.cache_len:
                places = None  # no room for this turn: start over from the whole prompts
        if places is None:
            places = list(range(len(rows)))
            out = self._start(prompts, rows, budgets, key)
        else:
            out = self._continue(prompts, places, rows, budgets, key, width)
        session = self.session
        session.cache = out.pop("cache")
        session.index = int(session.cache.index)
        got = {name: to_numpy(value) for name, value in out.items()}
        generations = []
        for prompt, place in zip(prompts, places):
            n = int(got["lengths"][place])
            tokens = got["tokens"][place, :n].astype(np.int32)
            session.cached[place] = prompt.tolist() + tokens[:-1].tolist()  # the last token was never fed
            text = None
            if sampler.tokenizer is not None:
                keep = tokens[:-1] if got["stopped"][place] else tokens
                text = sampler.tokenizer.decode(keep.tolist(), skip_special_tokens=False)
            generations.append(SessionGeneration(token_ids=tokens, logprobs=got["logprobs"][place, :n].astype(
                np.float32), stopped=bool(got["stopped"][place]), text=text))
        return generations
