"""Exact, resumable checkpoints of the whole train state with orbax `CheckpointManager`.

One checkpoint = one step directory holding two items:
  state: the train-state pytree (params, optimizer state, step counters, ... any pytree of arrays, e.g. nnx.State),
  extra: JSON with the data-iterator position, the PRNG key as raw key data (uint32 words + implementation name),
         and free-form metadata (e.g. the run config).
Orbax writes each step into a temporary directory and renames it when complete, so a process killed mid-save
leaves no finalized step; `latest_step` and `restore` also skip step directories that are incomplete or unreadable
and fall back to the newest complete checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)

_STATE, _EXTRA = "state", "extra"
_ORBAX_STEP_METADATA = "_CHECKPOINT_METADATA"  # written by orbax when a step is finalized


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """save_every: save when step % save_every == 0; keep_last: number of checkpoints kept (None = all);
    async_save: write in a background thread (call `wait_until_finished`/`close` before exiting)."""

    save_every: int = 10
    keep_last: Optional[int] = 3
    async_save: bool = False

    def __post_init__(self) -> None:
        if self.save_every < 1:
            raise ValueError(f"CheckpointConfig.save_every must be >= 1, got {self.save_every}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"CheckpointConfig.keep_last must be >= 1 or None, got {self.keep_last}")


@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore` returns."""

    step: int
    state: Any
    data_state: Any
    rng_key: Optional[jax.Array]
    metadata: dict


def _encode_key(key: Optional[jax.Array]) -> Optional[dict]:
    if key is None:
        return None
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = np.asarray(jax.random.key_data(key) if typed else key)
    if data.dtype != np.uint32:
        raise TypeError(f"rng_key must be a typed PRNG key or raw uint32 key data, got dtype {data.dtype}")
    impl = str(jax.random.key_impl(key)) if typed else None
    return {"typed": bool(typed), "impl": impl, "shape": list(data.shape), "data": data.ravel().tolist()}


def _decode_key(encoded: Optional[dict]) -> Optional[jax.Array]:
    if encoded is None:
        return None
    data = np.asarray(encoded["data"], np.uint32).reshape(encoded["shape"])
    if encoded["typed"]:
        return jax.random.wrap_key_data(data, impl=encoded["impl"])
    return jax.numpy.asarray(data)


def _as_abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (keeping any sharding) from arrays or ShapeDtypeStructs."""

    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


class Checkpointer:
    """Periodic save / keep-last-N / exact restore of a train state under `directory`."""

    def __init__(self, directory: str | os.PathLike, config: CheckpointConfig = CheckpointConfig()):
        self.directory = Path(directory).absolute()
        self.config = config
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_last, enable_async_checkpointing=config.async_save, create=True,
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(_STATE, _EXTRA))

    # ------------------------------------------------------------------ saving

    def should_save(self, step: int) -> bool:
        """True on multiples of `save_every` (step 0 excluded)."""
        return step > 0 and step % self.config.save_every == 0

    def save(self, step: int, state: Any, *, data_state: Any = None, rng_key: Optional[jax.Array] = None,
             metadata: Optional[dict] = None, force: bool = False) -> bool:
        """Save when `should_save(step)` or `force`; returns whether a checkpoint was started.

        A step that is already saved is skipped (e.g. a forced final save right after a periodic one).
        data_state and metadata must be JSON-serialisable.
        """
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            logger.info("checkpoint: step %d already saved; skipping", step)
            return False
        extra = {"step": int(step), "data_state": data_state, "rng_key": _encode_key(rng_key),
                 "metadata": metadata or {}}
        self._manager.save(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state), _EXTRA: ocp.args.JsonSave(extra)}), force=True)
        return True

    def wait_until_finished(self) -> None:
        """Block until an in-flight async save is finalized on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ discovery

    def _is_complete(self, step: int) -> bool:
        step_dir = self.directory / str(step)
        return ((step_dir / _ORBAX_STEP_METADATA).is_file() and (step_dir / _STATE).is_dir()
                and (step_dir / _EXTRA).is_dir())

    def all_steps(self) -> list[int]:
        """Finalized, complete checkpoint steps, ascending."""
        self._manager.reload()
        return sorted(s for s in self._manager.all_steps() if self._is_complete(s))

    def latest_step(self) -> Optional[int]:
        """The newest complete checkpoint step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # ------------------------------------------------------------------ restoring

    def restore(self, abstract_state: Any = None, step: Optional[int] = None) -> Restored:
        """Restore `step` (default: the newest complete checkpoint that reads back without error).

        abstract_state: a pytree like the saved state of jax.ShapeDtypeStruct (with `sharding` to place the arrays
        on a mesh) or of arrays; it fixes the restored tree structure (namedtuples, nnx.State) and dtypes. Without
        it the raw saved structure (dicts/lists of arrays) is returned.
        """
        if step is not None:
            return self._restore_step(step, abstract_state)
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint under {self.directory}")
        first_error: Optional[Exception] = None
        for candidate in reversed(steps):
            try:
                return self._restore_step(candidate, abstract_state)
            except Exception as e:  # noqa: BLE001 - an unreadable step: fall back to the previous one
                logger.warning("checkpoint: step %d under %s could not be restored (%s: %s); trying an older one",
                               candidate, self.directory, type(e).__name__, str(e)[:300])
                first_error = first_error or e
        raise RuntimeError(f"no checkpoint under {self.directory} could be restored") from first_error

    def _restore_step(self, step: int, abstract_state: Any) -> Restored:
        state_args = (ocp.args.StandardRestore(_as_abstract(abstract_state)) if abstract_state is not None
                      else ocp.args.StandardRestore())
        out = self._manager.restore(step, args=ocp.args.Composite(**{
            _STATE: state_args, _EXTRA: ocp.args.JsonRestore()}))
        extra = out[_EXTRA]
        return Restored(step=step, state=out[_STATE], data_state=extra.get("data_state"),
                        rng_key=_decode_key(extra.get("rng_key")), metadata=extra.get("metadata") or {})
