"""Exact, resumable, verified checkpoints of the whole train state with orbax `CheckpointManager`.

One checkpoint = one step directory holding two items:
  state: the train-state pytree (params, optimizer state, step counters, ... any pytree of arrays, e.g. nnx.State),
  extra: JSON with the data-iterator position, the PRNG key as raw key data (uint32 words + implementation name),
         and free-form metadata (e.g. the run config);
plus `_INTEGRITY_MANIFEST.json`: the size and sha256 of every other file of the step.

Saving: `save` refuses a state with a NaN/inf in any floating leaf (`NonFiniteStateError`, nothing is written).
Orbax writes the step into a temporary directory and renames it when complete, so a process killed mid-save leaves
no finalized step. The manifest is written once the step is finalized on disk: right after a synchronous save, or
for an async save by a background thread that waits for orbax's rename (and at the latest by the next
save/restore/`wait_until_finished`/`close`, or at interpreter exit).

The finiteness check and the manifest live in `checkpoint_integrity.py`.

Restoring: each candidate step, newest first, must pass three checks: (1) checksums: every file in the manifest exists
with the recorded size and sha256; (2) orbax reads it back without error; (3) every floating array is finite.
The newest step passing all three is restored; rejected steps are logged with the check and the file or leaf that
failed, and when none passes `NoRestorableCheckpointError` lists every step and why.
A finalized step WITHOUT a manifest (written before manifests existed, or the process died between orbax's rename
and the manifest write) is treated as legacy: restored with a warning (`Restored.verified` is False) after checks
(2) and (3), since orbax's atomic rename already guarantees it was completely written.

Rewriting: a step that restore rejected, an incomplete step directory, or an existing step failing its checksums is
not "already saved": the next save of that step moves the old directory to `<dir>/rejected/<step>` (with a
REJECTED.txt saying why; nothing is deleted) and writes the step anew. `rejected/` is never cleaned up automatically.

Multi-host: every process calls save/restore (as orbax requires). The finiteness checks are jitted reductions over
the global (sharded) arrays, so every process computes the same answer. Manifests are written, checksums verified
and rejected steps moved aside by process 0 only; its checksum verdict is shared with all processes (as is any
process's orbax read failure), so every process accepts or rejects the same step.
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import os
import time
import weakref
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from toolrl_jax.checkpoint_integrity import (  # noqa: F401 - MANIFEST_NAME, verify_manifest: public here too
    MANIFEST_NAME,
    CheckpointRejectedError,
    NonFinite,
    _ManifestWriter,
    find_nonfinite,
    verify_manifest,
    write_manifest,
)
from toolrl_jax.multihost import all_agree, barrier, from_process_0

logger = logging.getLogger(__name__)

_STATE, _EXTRA = "state", "extra"
_ORBAX_STEP_METADATA = "_CHECKPOINT_METADATA"  # written by orbax when a step is finalized
REJECTED_DIR = "rejected"
_CHECKS = ("sha256 of every file against the step's integrity manifest, orbax restore, "
           "every floating array finite")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """save_every: save when step % save_every == 0; keep_last: number of checkpoints kept (None = all);
    async_save: write in a background thread (call `close` before exiting, also on errors: orbax drops a save still
    in flight when the process exits)."""

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
    """What `Checkpointer.restore` returns. verified: the step's files matched its integrity manifest (False for a
    legacy step without one)."""

    step: int
    state: Any
    data_state: Any
    rng_key: Optional[jax.Array]
    metadata: dict
    verified: bool = True


# ---------------------------------------------------------------------- errors


class NonFiniteStateError(FloatingPointError):
    """`save` was given a state with NaN/inf in a floating leaf; nothing was written."""

    def __init__(self, step: int, nonfinite: NonFinite):
        self.step, self.nonfinite = step, nonfinite
        super().__init__(f"refusing to checkpoint step {step}: {nonfinite}; nothing was written")


class NoRestorableCheckpointError(RuntimeError):
    """No checkpoint step passed the restore checks; failures maps each step to why it was rejected."""

    def __init__(self, directory: Path, failures: dict[int, str]):
        self.directory, self.failures = directory, dict(failures)
        lines = "\n".join(f"  step {s}: {why}" for s, why in sorted(failures.items(), reverse=True))
        super().__init__(f"no checkpoint under {directory} passed the checks ({_CHECKS}):\n{lines}")


def _finish_manifest_at_exit(ref: "weakref.ReferenceType[Checkpointer]") -> None:
    """atexit: orbax's (non-daemon) finalize thread has been joined by now, so a pending manifest can be written."""
    ckpt = ref()
    if ckpt is not None and ckpt._manifest_writer is not None:
        writer, ckpt._manifest_writer = ckpt._manifest_writer, None
        try:
            writer.finish()
        except OSError as e:
            logger.error("checkpoint: %s", e)


# ---------------------------------------------------------------------- keys and targets


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
    """Periodic save / keep-last-N / verified exact restore of a train state under `directory`."""

    def __init__(self, directory: str | os.PathLike, config: CheckpointConfig = CheckpointConfig()):
        self.directory = Path(directory).absolute()
        self.config = config
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_last, enable_async_checkpointing=config.async_save, create=True,
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(_STATE, _EXTRA))
        self._written: set[int] = set()  # steps this object saved (a repeated save of one is skipped)
        self._accepted: set[int] = set()  # steps restore verified
        self._rejected: dict[int, str] = {}  # steps restore rejected -> why (rewritten by the next save)
        self._manifest_writer: Optional[_ManifestWriter] = None
        self._atexit = functools.partial(_finish_manifest_at_exit, weakref.ref(self))
        atexit.register(self._atexit)

    @property
    def rejected_steps(self) -> dict[int, str]:
        """Steps that restore rejected in this process, with the reason."""
        return dict(self._rejected)

    # ------------------------------------------------------------------ saving

    def should_save(self, step: int) -> bool:
        """True on multiples of `save_every` (step 0 excluded)."""
        return step > 0 and step % self.config.save_every == 0

    def save(self, step: int, state: Any, *, data_state: Any = None, rng_key: Optional[jax.Array] = None,
             metadata: Optional[dict] = None, force: bool = False) -> bool:
        """Save when `should_save(step)` or `force`; returns whether a checkpoint was started.

        Raises NonFiniteStateError (writing nothing) when a floating leaf of `state` holds NaN/inf. A step already
        saved by this object, or an intact one found on disk, is skipped (e.g. a forced final save right after a
        periodic one); a step on disk that restore rejected, that is incomplete or that fails its checksums is moved
        to `<dir>/rejected/` and written anew. data_state and metadata must be JSON-serialisable.
        """
        if not (force or self.should_save(step)):
            return False
        nonfinite = find_nonfinite(state)
        if nonfinite is not None:
            raise NonFiniteStateError(step, nonfinite)
        self._settle()
        if step in self._written:
            logger.info("checkpoint: step %d already saved; skipping", step)
            return False
        action, reason = self._existing_step_action(step)
        if action == "skip":
            logger.info("checkpoint: step %d already saved (an intact step on disk); skipping", step)
            return False
        if action == "rewrite":
            self._set_aside(step, reason)
        extra = {"step": int(step), "data_state": data_state, "rng_key": _encode_key(rng_key),
                 "metadata": metadata or {}}
        self._manager.save(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state), _EXTRA: ocp.args.JsonSave(extra)}), force=True)
        self._written.add(step)
        self._rejected.pop(step, None)
        if jax.process_index() == 0:
            step_dir = self.directory / str(step)
            if self.config.async_save:
                self._manifest_writer = _ManifestWriter(step_dir, step, functools.partial(self._is_complete, step))
                self._manifest_writer.start()
            else:
                write_manifest(step_dir, step)
        return True

    def _existing_step_action(self, step: int) -> tuple[str, str]:
        """('new' | 'skip' | 'rewrite', why): what save does about what is on disk for `step`; decided by process 0
        (before anything moves) and shared with every process."""
        actions = ("new", "skip", "rewrite")
        action, why = "new", "see process 0's log"
        if jax.process_index() == 0 and (self.directory / str(step)).exists():
            reason = self._reason_to_rewrite(step)
            action, why = ("skip", "") if reason is None else ("rewrite", reason)
        return actions[from_process_0(actions.index(action))], why

    def _reason_to_rewrite(self, step: int) -> Optional[str]:
        """Why the existing directory of `step` must be replaced, or None when it is an intact checkpoint."""
        if step in self._rejected:
            return f"rejected by restore: {self._rejected[step]}"
        if step in self._accepted:
            return None
        if not self._is_complete(step):
            return "incomplete (orbax never finalized it)"
        try:
            verify_manifest(self.directory / str(step), step)
        except CheckpointRejectedError as e:
            return f"{e.check}: {e.detail}"
        return None

    def _set_aside(self, step: int, reason: str) -> None:
        """Move the step directory to <dir>/rejected/<step>[.n] with a REJECTED.txt; nothing is deleted."""
        if jax.process_index() == 0:
            root = self.directory / REJECTED_DIR
            root.mkdir(exist_ok=True)
            dest, n = root / str(step), 0
            while dest.exists():
                n += 1
                dest = root / f"{step}.{n}"
            os.replace(self.directory / str(step), dest)
            (dest / "REJECTED.txt").write_text(f"step {step} moved here from {self.directory / str(step)} at "
                                               f"{time.strftime('%Y-%m-%d %H:%M:%S')} before being rewritten: "
                                               f"{reason}\n")
            logger.warning("checkpoint: step %d was not a good checkpoint (%s); moved it to %s and writing it anew",
                           step, reason, dest)
        barrier(f"toolrl_checkpoint_set_aside_{step}")
        self._manager.reload()

    def _settle(self) -> None:
        """Wait for an in-flight async save and its manifest."""
        try:
            self._manager.wait_until_finished()
        finally:
            writer, self._manifest_writer = self._manifest_writer, None
            if writer is not None:
                writer.finish()

    def wait_until_finished(self) -> None:
        """Block until an in-flight async save is finalized on disk and its integrity manifest written."""
        self._settle()

    def close(self) -> None:
        """Finish pending saves and release resources."""
        self._settle()
        self._manager.close()
        atexit.unregister(self._atexit)

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
        """Finalized, complete checkpoint steps, ascending (not yet verified: `restore` does that)."""
        self._manager.reload()
        return sorted(s for s in self._manager.all_steps() if self._is_complete(s))

    def latest_step(self) -> Optional[int]:
        """The newest complete checkpoint step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # ------------------------------------------------------------------ restoring

    def restore(self, abstract_state: Any = None, step: Optional[int] = None) -> Restored:
        """Restore `step` (default: the newest complete checkpoint passing the checksum, read and finiteness checks).

        abstract_state: a pytree like the saved state of jax.ShapeDtypeStruct (with `sharding` to place the arrays
        on a mesh) or of arrays; it fixes the restored tree structure (namedtuples, nnx.State) and dtypes. Without
        it the raw saved structure (dicts/lists of arrays) is returned.
        Raises CheckpointRejectedError when an explicit `step` fails a check, FileNotFoundError when there is no
        complete checkpoint, NoRestorableCheckpointError when every step fails.
        """
        self._settle()
        if step is not None:
            if not self._is_complete(step):
                raise FileNotFoundError(f"no complete checkpoint for step {step} under {self.directory}")
            return self._restore_checked(step, abstract_state)
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint under {self.directory}")
        failures: dict[int, str] = {}
        for i, candidate in enumerate(reversed(steps)):
            try:
                restored = self._restore_checked(candidate, abstract_state)
            except CheckpointRejectedError as e:
                failures[candidate] = f"{e.check}: {e.detail}"
                logger.warning("%s (under %s); %s", e, self.directory,
                               "trying an older step" if i + 1 < len(steps) else "no older step left")
                continue
            if failures:
                logger.warning("checkpoint: restored step %d after rejecting steps %s (they will be moved to %s "
                               "when saved again)", candidate, sorted(failures), self.directory / REJECTED_DIR)
            return restored
        raise NoRestorableCheckpointError(self.directory, failures)

    def _restore_checked(self, step: int, abstract_state: Any) -> Restored:
        try:
            restored = self._restore_step(step, abstract_state)
        except CheckpointRejectedError as e:
            self._rejected[step] = f"{e.check}: {e.detail}"
            raise
        self._accepted.add(step)
        self._rejected.pop(step, None)
        return restored

    def _restore_step(self, step: int, abstract_state: Any) -> Restored:
        step_dir = self.directory / str(step)
        verified, failure = True, None
        if jax.process_index() == 0:
            try:
                verified = verify_manifest(step_dir, step)
            except CheckpointRejectedError as e:
                failure = e
        if not from_process_0(failure is None):
            raise failure or CheckpointRejectedError(step, "checksum", "failed the checksum check on process 0 "
                                                     "(see its log)")
        if not verified:
            logger.warning("checkpoint: step %d under %s has no %s (saved before integrity manifests existed, or the "
                           "process died before writing it): restoring it without checksum verification",
                           step, self.directory, MANIFEST_NAME)
        state_args = (ocp.args.StandardRestore(_as_abstract(abstract_state)) if abstract_state is not None
                      else ocp.args.StandardRestore())
        out, error = None, None
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**{
                _STATE: state_args, _EXTRA: ocp.args.JsonRestore()}))
        except Exception as e:  # noqa: BLE001 - any read failure rejects the step
            error = e
        if not all_agree(error is None):
            detail = (f"orbax could not read it back ({type(error).__name__}: {str(error)[:300]})" if error is not None
                      else "orbax could not read it back on another process (see its log)")
            raise CheckpointRejectedError(step, "unreadable", detail) from error
        nonfinite = find_nonfinite(out[_STATE])
        if nonfinite is not None:
            raise CheckpointRejectedError(step, "non-finite", str(nonfinite), nonfinite.first_path)
        extra = out[_EXTRA]
        return Restored(step=step, state=out[_STATE], data_state=extra.get("data_state"),
                        rng_key=_decode_key(extra.get("rng_key")), metadata=extra.get("metadata") or {},
                        verified=verified)
