"""`ContinuousEngine`: the host loop of continuous batching, over the jitted `insert` / `decode` kernels.

Pending (prompt, sample) rows wait in a queue, prompt-major. The first insert fills the slots; afterwards each
`decode` call runs until a refill chunk's worth of slots (`refill_prompts` prompts x group_size) is free, the host
copies the finished rows out, and the next chunk of prompts is prefilled into the freed slots. Insert sizes are
fixed per call (the first fill and the refill chunk, padded with dummy prompts), so a call compiles at most two
inserts and one decode, and a run of equal calls compiles nothing after the first.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from toolrl_jax.models.config import ModelConfig
from toolrl_jax.sampling import continuous
from toolrl_jax.sampling.config import next_power_of_two
from toolrl_jax.sampling.engine import BatchSharding, DecodeSpec


def to_numpy(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process, sharded) array as one host numpy array."""
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """What one continuous call did: decode steps (each computes every slot), inserts, decode calls, slots."""

    decode_steps: int
    inserts: int
    decode_calls: int
    slots: int


class ContinuousEngine:
    """Runs one generate call's rows through `slots` decode slots.

    graphdef/sharding/on_trace: as for the static kernel; place: puts a host array on the devices, batch-sharded.
    """

    def __init__(self, graphdef: nnx.GraphDef, model_config: ModelConfig, sharding: Optional[BatchSharding],
                 place: Callable[[np.ndarray], jax.Array], on_trace: Optional[Callable[[tuple], None]] = None):
        self._model_config = model_config
        self._sharding = sharding
        self._place = place
        self._multiple = sharding.data_parallel_size if sharding else 1
        self._init = jax.jit(functools.partial(continuous.init_slots, model_config, sharding=sharding),
                             static_argnames=("spec",))
        self._insert = jax.jit(functools.partial(continuous.insert, graphdef, sharding=sharding, on_trace=on_trace),
                               static_argnames=("spec",), donate_argnames=("slots",))
        self._decode = jax.jit(functools.partial(continuous.decode, graphdef, sharding=sharding, on_trace=on_trace),
                               static_argnames=("spec",), donate_argnames=("slots",))
        self.last_stats: Optional[EngineStats] = None

    def slot_count(self, requested: int, rows: int, group_size: int) -> int:
        """Slots for a call of `rows` rows: `requested` (at least one group), or fewer when the call is smaller
        (a power of two of its rows), always a multiple of the data-parallel size."""
        slots = min(max(requested, group_size), next_power_of_two(rows))
        return _round_up(max(slots, group_size), self._multiple)

    def run(self, params: nnx.State, prompts: Sequence[np.ndarray], width: int, budgets: np.ndarray,
            key: jax.Array, temperature: np.float32, top_p: np.float32, spec: DecodeSpec, slots: int,
            refill_prompts: Optional[int]) -> dict[str, np.ndarray]:
        """Generates every row; returns numpy arrays with len(prompts) * group_size rows, prompt-major: tokens,
        logprobs (and tempered_logprobs) [N, R], lengths [N], stopped [N]."""
        n, budget = spec.group_size, spec.max_new_tokens
        rows = len(prompts) * n
        slot_spec = continuous.SlotSpec(decode=spec, slots=slots, cache_len=width + budget)
        per_fill = max(1, slots // n)  # prompts that fit in the slots at once
        refill = max(1, min(per_fill, refill_prompts or max(1, per_fill // 8)))
        first_size = _round_up(min(next_power_of_two(min(len(prompts), per_fill)), per_fill), self._multiple)
        refill_size = _round_up(refill, self._multiple)

        names = ["tokens", "logprobs"] + (["tempered_logprobs"] if spec.tempered_logprobs else [])
        out = {name: np.zeros((rows, budget), np.float32) for name in names}
        out["tokens"] = np.full((rows, budget), spec.pad_id, np.int32)
        out["lengths"] = np.zeros((rows,), np.int32)
        out["stopped"] = np.zeros((rows,), bool)

        state = self._init(spec=slot_spec)
        queue = collections.deque(range(len(prompts)))
        slot_row = np.full((slots,), -1, np.int64)  # the row each slot decodes (-1 = free)
        inserts = decode_calls = 0

        def insert(size: int, count: int):
            nonlocal state, inserts
            chosen = [queue.popleft() for _ in range(count)]
            free = np.flatnonzero(slot_row < 0)
            ids = np.zeros((size, width), np.int32)
            seg = np.zeros((size, width), np.int32)
            index = np.zeros((size,), np.int32)
            slot_ids = np.full((size * n,), slots, np.int32)
            row_budgets = np.ones((size * n,), np.int32)
            for j, p in enumerate(chosen):
                prompt = prompts[p]
                ids[j, width - prompt.size:] = prompt
                seg[j, width - prompt.size:] = 1
                index[j] = p
                for s in range(n):
                    slot = free[j * n + s]
                    slot_ids[j * n + s] = slot
                    row_budgets[j * n + s] = budgets[p * n + s]
                    slot_row[slot] = p * n + s
            state = self._insert(params, state, self._place(ids), self._place(seg), self._place(index),
                                 self._place(slot_ids), self._place(row_budgets), key, temperature, top_p,
                                 spec=slot_spec)
            inserts += 1

        first = True
        while True:
            while queue:
                free = int(np.sum(slot_row < 0))
                size = first_size if first else refill_size
                count = min(len(queue), size, free // n)
                if count == 0 or (not first and count < min(len(queue), refill)):
                    break
                insert(size, count)
                first = False
            if not np.any(slot_row >= 0):
                break
            target = n * min(len(queue), refill) if queue else slots
            state = self._decode(params, state, np.int32(target), temperature, top_p, spec=slot_spec)
            decode_calls += 1
            self._collect(state, slot_row, out, names)
        self.last_stats = EngineStats(decode_steps=int(to_numpy(state["decode_steps"])), inserts=inserts,
                                      decode_calls=decode_calls, slots=slots)
        return out

    @staticmethod
    def _collect(state: continuous.SlotState, slot_row: np.ndarray, out: dict[str, np.ndarray],
                 names: list[str]) -> None:
        """Copies the rows that finished since the last call out of their slots and frees the slots."""
        active = to_numpy(state["active"])
        finished = np.flatnonzero((slot_row >= 0) & ~active)
        if finished.size == 0:
            return
        rows = slot_row[finished]
        for name in names:
            out[name][rows] = to_numpy(state[name])[finished]
        out["lengths"][rows] = to_numpy(state["step"])[finished]
        out["stopped"][rows] = to_numpy(state["stopped"])[finished]
        slot_row[finished] = -1
