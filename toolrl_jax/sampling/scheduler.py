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


MIN_DRAIN_SLOTS = 16


@dataclasses.dataclass(frozen=True)
class RefillPolicy:
    """When the continuous engine inserts prompts and how many: its scheduling decisions, kept apart from the
    kernels so that `experiments/bench_sampling.py` can replay them (`simulate_continuous`).

    The first insert fills the slots (a power of two of the prompts, up to slots // group_size); afterwards prompts
    are inserted `refill` at a time (default an eighth of the slots' prompts, at least one), padded to a multiple of
    the data-parallel size, and decode runs until that many groups of slots are free. Once the queue is empty the
    engine drains: whenever at most half of the current slots still run, they move into a state of half the size
    (`continuous.compact`), down to `min_slots` (from 16 slots up), so the last, longest rows do not drag idle
    slots along."""

    slots: int
    group_size: int
    refill_prompts: Optional[int] = None
    multiple: int = 1

    @property
    def min_slots(self) -> int:
        """The smallest drain state (each halving compiles one more decode and one compaction): an eighth of the
        slots; no drain below MIN_DRAIN_SLOTS slots, where it would save too little to pay for its compiles."""
        if self.slots < MIN_DRAIN_SLOTS:
            return self.slots
        return _round_up(max(1, self.slots // 8), self.multiple)

    def can_halve(self, current: int) -> bool:
        half = current // 2
        return half >= self.min_slots and half % self.multiple == 0

    def drain_size(self, current: int, running: int) -> int:
        """The slot count a drain continues with: half of `current` when at most half of it still runs (one level
        at a time, and walking down every level even when nothing runs, so every call of a given shape compiles the
        same programs), else `current`."""
        return current // 2 if self.can_halve(current) and running <= current // 2 else current

    def drain_target(self, current: int) -> int:
        """Free slots a drain's decode runs until: half of them (time to compact), or all at the smallest size."""
        return current - current // 2 if self.can_halve(current) else current

    @property
    def per_fill(self) -> int:
        """Prompts whose groups fit in the slots at once."""
        return max(1, self.slots // self.group_size)

    @property
    def refill(self) -> int:
        return max(1, min(self.per_fill, self.refill_prompts or max(1, self.per_fill // 8)))

    def insert_size(self, num_prompts: int, first: bool) -> int:
        """The padded prompt count of an insert (a compiled shape)."""
        if first:
            return _round_up(min(next_power_of_two(min(num_prompts, self.per_fill)), self.per_fill), self.multiple)
        return _round_up(self.refill, self.multiple)

    def insert_count(self, num_prompts: int, queued: int, free_slots: int, first: bool) -> int:
        """How many queued prompts to insert now (0: decode first)."""
        count = min(queued, self.insert_size(num_prompts, first), free_slots // self.group_size)
        if count == 0 or (not first and count < min(queued, self.refill)):
            return 0
        return count

    def free_target(self, queued: int) -> int:
        """Free slots the next decode call runs until, while prompts are queued."""
        return self.group_size * min(queued, self.refill)


@dataclasses.dataclass(frozen=True)
class WindowPolicy:
    """The attention window of each decode call (`continuous.decode`): `count` sizes evenly spaced up to the cache
    length L (multiples of 8, the last one L itself), leaving out those narrower than `min_window` (each size is
    one more compiled decode, which a narrow window does not repay). A call gets the smallest that holds the oldest
    running row's span plus `room` more decode steps (L / (4 count)); it stops early when the window is full.
    count 1: every call attends over the whole cache."""

    cache_len: int
    count: int = 4
    min_window: int = 128

    def __post_init__(self) -> None:
        for name, value in (("decode windows", self.count), ("the minimum decode window", self.min_window)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def sizes(self) -> tuple[int, ...]:
        sizes = {min(self.cache_len, _round_up(-(-self.cache_len * i // self.count), 8))
                 for i in range(1, self.count + 1)}
        return tuple(sorted(size for size in sizes if size >= self.min_window or size == self.cache_len))

    @property
    def room(self) -> int:
        return max(1, self.cache_len // (4 * self.count))

    def window(self, span: int) -> int:
        """The window for a call whose oldest running row spans `span` columns (its prompt bucket + steps)."""
        if not 0 <= span < self.cache_len:
            raise RuntimeError(f"a running row spans {span} columns of a {self.cache_len}-column cache")
        return next((size for size in self.sizes if size >= span + self.room), self.cache_len)


def simulate_continuous(lengths: Sequence[int], policy: RefillPolicy) -> tuple[int, int]:
    """(decode steps, row-steps: slots computed summed over steps) the continuous engine runs for rows of these
    lengths (prompt-major, group_size per prompt, forced lengths: no stop tokens), by its own `RefillPolicy`."""
    n = policy.group_size
    num_prompts = len(lengths) // n
    queue = collections.deque(range(num_prompts))
    remaining = np.zeros(policy.slots, np.int64)  # tokens a slot's row still has to make (0: inactive)
    occupied = np.zeros(policy.slots, bool)
    steps = row_steps = 0
    first = True
    while True:
        while queue:
            count = policy.insert_count(num_prompts, len(queue), int((~occupied).sum()), first)
            if not count:
                break
            free = np.flatnonzero(~occupied)
            for j in range(count):
                p = queue.popleft()
                for s in range(n):
                    slot = free[j * n + s]
                    occupied[slot], remaining[slot] = True, lengths[p * n + s] - 1  # the first token: prefill
            first = False
        if queue:
            target = policy.free_target(len(queue))
        else:
            size = policy.drain_size(remaining.size, int(occupied.sum()))
            if size < remaining.size:
                keep = np.argsort(~occupied, kind="stable")[:size]  # running slots first
                remaining, occupied = remaining[keep], occupied[keep]
            elif not occupied.any():
                return steps, row_steps
            target = policy.drain_target(remaining.size)
        while (remaining == 0).sum() < target and (remaining > 0).any():
            remaining = np.maximum(remaining - 1, 0)
            steps += 1
            row_steps += remaining.size
        occupied &= remaining > 0


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """What one continuous call did: decode steps, inserts, decode calls, slots (at the start), row-steps, drain
    compactions."""

    decode_steps: int
    inserts: int
    decode_calls: int
    slots: int
    row_steps: int  # slots computed, summed over decode steps (fewer than decode_steps x slots once drained)
    compactions: int
    attended_columns: int = 0  # cache columns attended over, summed over row-steps (row_steps x L without windows)


class ContinuousEngine:
    """Runs one generate call's rows through `slots` decode slots.

    graphdef/sharding/on_trace: as for the static kernel; place: puts a host array on the devices, batch-sharded.
    windows / min_window: attention window sizes of the full slot state's decode calls and the narrowest one used
    (`WindowPolicy`; 1 size: the whole cache). A call's first decode compiles every window's program, so later
    calls compile nothing new.
    """

    def __init__(self, graphdef: nnx.GraphDef, model_config: ModelConfig, sharding: Optional[BatchSharding],
                 place: Callable[[np.ndarray], jax.Array], on_trace: Optional[Callable[[tuple], None]] = None,
                 windows: int = 4, min_window: int = 128):
        WindowPolicy(1, windows, min_window)  # validates
        self._windows, self._min_window = windows, min_window
        self._compiled_windows: set[continuous.SlotSpec] = set()
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
        # Not donated: a compaction's outputs are smaller than its inputs, so no input buffer could be reused.
        self._compact = jax.jit(functools.partial(continuous.compact, sharding=sharding), static_argnames=("spec",))
        self.last_stats: Optional[EngineStats] = None

    def _replicated(self, array: np.ndarray) -> jax.Array:
        """A small index array every device holds whole (gathers along a sharded slot axis)."""
        if self._sharding is None:
            return jax.numpy.asarray(array)
        return jax.device_put(array, jax.sharding.NamedSharding(self._sharding.mesh, jax.sharding.PartitionSpec()))

    def slot_count(self, requested: int, rows: int, group_size: int) -> int:
        """Slots for a call of `rows` rows: `requested` (at least one group), or fewer when the call is smaller
        (a power of two of its rows), always a multiple of the data-parallel size."""
        slots = min(max(requested, group_size), next_power_of_two(rows))
        return _round_up(max(slots, group_size), self._multiple)

    def run(self, params: nnx.State, prompts: Sequence[np.ndarray], width: int, budgets: np.ndarray,
            numbers: tuple[np.ndarray, np.ndarray], key: jax.Array, temperature: np.float32, top_p: np.float32,
            spec: DecodeSpec, slots: int, refill_prompts: Optional[int]) -> dict[str, np.ndarray]:
        """Generates every row; returns numpy arrays with len(prompts) * group_size rows, prompt-major: tokens,
        logprobs (and tempered_logprobs) [N, R], lengths [N], stopped [N]. numbers: (prompt numbers [P], sample
        numbers [N]) that seed the row keys."""
        prompt_numbers, sample_numbers = numbers
        n, budget = spec.group_size, spec.max_new_tokens
        rows = len(prompts) * n
        slot_spec = continuous.SlotSpec(decode=spec, slots=slots, cache_len=width + budget)
        policy = RefillPolicy(slots, n, refill_prompts, self._multiple)
        windows = WindowPolicy(slot_spec.cache_len, self._windows, self._min_window)

        names = ["tokens", "logprobs"] + (["tempered_logprobs"] if spec.tempered_logprobs else [])
        out = {name: np.zeros((rows, budget), np.float32) for name in names}
        out["tokens"] = np.full((rows, budget), spec.pad_id, np.int32)
        out["lengths"] = np.zeros((rows,), np.int32)
        out["stopped"] = np.zeros((rows,), bool)

        state = self._init(spec=slot_spec)
        queue = collections.deque(range(len(prompts)))
        slot_row = np.full((slots,), -1, np.int64)  # the row each slot decodes (-1 = free)
        inserted_at = np.zeros((slots,), np.int64)  # the decode step count when each slot's row was inserted
        inserts = decode_calls = 0

        def insert(size: int, count: int):
            nonlocal state, inserts
            chosen = [queue.popleft() for _ in range(count)]
            free = np.flatnonzero(slot_row < 0)
            ids = np.zeros((size, width), np.int32)
            seg = np.zeros((size, width), np.int32)
            index = np.zeros((size,), np.int32)
            samples = np.zeros((size * n,), np.int32)
            slot_ids = np.full((size * n,), slots, np.int32)
            row_budgets = np.ones((size * n,), np.int32)
            for j, p in enumerate(chosen):
                prompt = prompts[p]
                ids[j, width - prompt.size:] = prompt
                seg[j, width - prompt.size:] = 1
                index[j] = prompt_numbers[p]
                for s in range(n):
                    slot = free[j * n + s]
                    slot_ids[j * n + s] = slot
                    row_budgets[j * n + s] = budgets[p * n + s]
                    samples[j * n + s] = sample_numbers[p * n + s]
                    slot_row[slot] = p * n + s
                    inserted_at[slot] = steps_before
            state = self._insert(params, state, self._place(ids), self._place(seg), self._place(index),
                                 self._place(samples), self._place(slot_ids), self._place(row_budgets), key,
                                 temperature, top_p, spec=slot_spec)
            inserts += 1

        first = True
        row_steps = compactions = steps_before = attended = 0
        while True:
            while queue:
                count = policy.insert_count(len(prompts), len(queue), int(np.sum(slot_row < 0)), first)
                if not count:
                    break
                insert(policy.insert_size(len(prompts), first), count)
                first = False
            if queue:
                target = policy.free_target(len(queue))
            else:  # draining: move the running rows into a smaller state when at most half of the slots run
                size = policy.drain_size(slot_row.size, int(np.sum(slot_row >= 0)))
                if size < slot_row.size:
                    keep = np.argsort(slot_row < 0, kind="stable")[:size].astype(np.int32)  # running slots first
                    slot_spec = dataclasses.replace(slot_spec, slots=size)
                    state = self._compact(state, self._replicated(keep), spec=slot_spec)
                    slot_row, inserted_at = slot_row[keep], inserted_at[keep]
                    compactions += 1
                elif not np.any(slot_row >= 0):
                    break
                target = policy.drain_target(slot_row.size)
            call_spec = slot_spec
            if slot_spec.slots == slots and len(windows.sizes) > 1:  # the drain's smaller states attend over all L
                running = slot_row >= 0
                span = width + steps_before - int(inserted_at[running].min()) if running.any() else 0
                call_spec = slot_spec.with_window(windows.window(span))
                self._compile_windows(params, state, np.int32(target), temperature, top_p, slot_spec, windows,
                                      call_spec)
            state = self._decode(params, state, np.int32(target), temperature, top_p, spec=call_spec)
            decode_calls += 1
            steps = int(to_numpy(state["decode_steps"]))
            row_steps += (steps - steps_before) * slot_row.size
            attended += (steps - steps_before) * slot_row.size * call_spec.attended
            steps_before = steps
            self._collect(state, slot_row, out, names)
        self.last_stats = EngineStats(decode_steps=steps_before, inserts=inserts, decode_calls=decode_calls,
                                      slots=slots, row_steps=row_steps, compactions=compactions,
                                      attended_columns=attended)
        return out

    def _compile_windows(self, params: nnx.State, state: continuous.SlotState, target: np.int32,
                         temperature: np.float32, top_p: np.float32, slot_spec: continuous.SlotSpec,
                         windows: WindowPolicy, calling: continuous.SlotSpec) -> None:
        """Compiles the decode of every window size (except the one about to run) the first time a slot state of
        this shape decodes, so that which windows a later call needs (it depends on its rows' lengths) never
        triggers a compile after the first call."""
        if slot_spec in self._compiled_windows:
            return
        self._compiled_windows.add(slot_spec)
        for size in windows.sizes:
            spec = slot_spec.with_window(size)
            if spec != calling:
                self._decode.lower(params, state, target, temperature, top_p, spec=spec).compile()

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
