"""The run loop shared by GRPO, PPO and SFT: resume, steps, hooks, checkpoints.

    loop = TrainLoop(step_fn, data, total_steps, state=learner, checkpointer=checkpointer)
    loop.add_hook(write_metrics)                       # every step, once its metrics are on the host
    loop.add_hook(validate, every=5, needs_state=True) # every 5 steps and the last, on that step's weights
    loop.add_hook(export, at="end")
    loop.run()

Following levanter's `Trainer.add_hook(fn, every=N)` and tunix's `RLLearner.train`: the library owns the loop; the
entry points only add hooks. Order within a step: the step runs (`step_fn(batch, step) -> StepOutput`), its metrics are
fetched to the host (deferred by one step with `defer_metrics`, so the device never waits on a fetch) and the metric
hooks see them; state hooks (validation, evaluation) run on the step's weights; then the checkpoint is saved, so a
saved step always has its hooks done (a run killed in between redoes the step and its hooks on resume). The loop
flushes deferred metrics before any state hook and any save.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Literal, Mapping, Optional, Protocol

import jax

logger = logging.getLogger(__name__)


class Stateful(Protocol):
    """What a learner exposes to checkpoints: its train-state pytree and how to load one back."""

    def train_state(self) -> Any: ...

    def load_train_state(self, state: Any, step: int) -> None: ...


@dataclasses.dataclass
class StepOutput:
    """What a step function returns: metrics (device or host scalars) and anything its hooks need (the batch,
    samples, rewards)."""

    metrics: Mapping[str, Any]
    extras: Any = None


@dataclasses.dataclass
class StepRecord:
    """A finished step as hooks see it: host float metrics (hooks may add to them) and the step's extras."""

    step: int
    metrics: dict[str, Any]
    extras: Any = None


Hook = Callable[[StepRecord], None]


@dataclasses.dataclass
class _HookSpec:
    fn: Callable
    every: int
    at: str
    needs_state: bool
    also_last: bool


class TrainLoop:
    """Runs `step_fn` from the resumed step to `total_steps` over `data` (an `EpochCursor`: next_batch / state /
    restore), saving `state` (a `Stateful` learner) with `checkpointer`. Returns one StepRecord per step trained."""

    def __init__(self, step_fn: Callable[[Any, int], StepOutput], data: Any, total_steps: int, *,
                 state: Optional[Stateful] = None, checkpointer: Any = None, defer_metrics: bool = False,
                 rng_key: Optional[jax.Array] = None, metadata: Optional[Mapping[str, Any]] = None):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.step_fn, self.data, self.total_steps = step_fn, data, total_steps
        self.state, self.checkpointer = state, checkpointer
        self.defer_metrics = defer_metrics
        self.rng_key = rng_key
        self.metadata = dict(metadata or {})
        self.step = 0
        self.history: list[StepRecord] = []
        self._hooks: list[_HookSpec] = []
        self._pending: list[tuple[int, StepOutput]] = []

    def add_hook(self, fn: Callable, every: int = 1, *, at: Literal["step", "start", "end"] = "step",
                 needs_state: bool = False, also_last: bool = False) -> None:
        """fn(record) every `every` steps (and at the last step with `also_last`); at="start": fn(step) once before
        the first step of a fresh run (not on resume); at="end": fn(step) once after the last step. needs_state: the
        hook reads the learner's weights, so it runs right after its step (deferred metrics are flushed first)."""
        if every < 1:
            raise ValueError(f"hook every must be >= 1, got {every}")
        if at not in ("step", "start", "end"):
            raise ValueError(f"hook at must be 'step', 'start' or 'end', got {at!r}")
        self._hooks.append(_HookSpec(fn, every, at, needs_state, also_last))

    def _due(self, hook: _HookSpec, step: int) -> bool:
        return step % hook.every == 0 or (hook.also_last and step == self.total_steps)

    def restore(self) -> int:
        """Continues from the newest checkpoint that restores (learner state and data position); returns the step
        to continue after (0 without a checkpoint)."""
        if self.checkpointer is None or self.checkpointer.latest_step() is None:
            return self.step
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                self.state.train_state())
        restored = self.checkpointer.restore(abstract)
        self.state.load_train_state(restored.state, restored.step)
        self.data.restore(restored.data_state)
        self.step = int(restored.step)
        logger.info("resumed from step %d (%s)", self.step, self.checkpointer.directory)
        return self.step

    def _flush(self) -> None:
        """Fetches the pending steps' metrics and runs the metric hooks on them, in order."""
        pending, self._pending = self._pending, []
        for step, out in pending:
            metrics = {k: v if isinstance(v, (str, bool)) else float(v)
                       for k, v in jax.device_get(dict(out.metrics)).items()}
            record = StepRecord(step, metrics, out.extras)
            for hook in self._hooks:
                if hook.at == "step" and not hook.needs_state and self._due(hook, step):
                    hook.fn(record)
            self.history.append(record)

    def _save(self, step: int) -> None:
        if self.checkpointer is None:
            return
        last = step == self.total_steps
        if not (last or self.checkpointer.should_save(step)):
            return
        key = None if self.rng_key is None else jax.random.fold_in(self.rng_key, step)
        self.checkpointer.save(step, self.state.train_state(), data_state=self.data.state(), rng_key=key,
                               metadata=self.metadata, force=last)

    def run(self) -> list[StepRecord]:
        """Trains from the current step (call `restore` first to resume) to `total_steps`."""
        if self.step == 0:
            for hook in self._hooks:
                if hook.at == "start":
                    hook.fn(0)
        while self.step < self.total_steps:
            step = self.step + 1
            self._pending.append((step, self.step_fn(self.data.next_batch(), step)))
            self.step = step
            state_hooks = [h for h in self._hooks if h.at == "step" and h.needs_state and self._due(h, step)]
            saving = self.checkpointer is not None and (step == self.total_steps or
                                                        self.checkpointer.should_save(step))
            if not self.defer_metrics or state_hooks or saving:
                self._flush()
            for hook in state_hooks:
                hook.fn(self.history[-1])
            self._save(step)
        self._flush()
        for hook in self._hooks:
            if hook.at == "end":
                hook.fn(self.step)
        if self.checkpointer is not None:
            self.checkpointer.wait_until_finished()
        return self.history
