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
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)

_STATE, _EXTRA = "state", "extra"
_ORBAX_STEP_METADATA = "_CHECKPOINT_METADATA"  # written by orbax when a step is finalized
MANIFEST_NAME = "_INTEGRITY_MANIFEST.json"
REJECTED_DIR = "rejected"
_MANIFEST_FORMAT = 1
_CHUNK = 8 << 20
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


@dataclasses.dataclass(frozen=True)
class NonFinite:
    """Floating leaves holding a NaN or inf: the first one's path (jax.tree_util.keystr) and how many there are."""

    first_path: str
    count: int

    def __str__(self) -> str:
        more = f" (and {self.count - 1} more non-finite leaves)" if self.count > 1 else ""
        return f"non-finite values (NaN/inf) in leaf {self.first_path}{more}"


class NonFiniteStateError(FloatingPointError):
    """`save` was given a state with NaN/inf in a floating leaf; nothing was written."""

    def __init__(self, step: int, nonfinite: NonFinite):
        self.step, self.nonfinite = step, nonfinite
        super().__init__(f"refusing to checkpoint step {step}: {nonfinite}; nothing was written")


class CheckpointRejectedError(RuntimeError):
    """A checkpoint step failed a restore check. check: 'checksum' (a file missing, resized, changed, or the manifest
    unreadable), 'unreadable' (orbax could not restore it) or 'non-finite' (a floating array holds NaN/inf);
    path: the file (relative to the step directory) or the leaf that failed, when known."""

    def __init__(self, step: int, check: str, detail: str, path: Optional[str] = None):
        self.step, self.check, self.detail, self.path = step, check, detail, path
        super().__init__(f"checkpoint step {step} rejected ({check}): {detail}")


class NoRestorableCheckpointError(RuntimeError):
    """No checkpoint step passed the restore checks; failures maps each step to why it was rejected."""

    def __init__(self, directory: Path, failures: dict[int, str]):
        self.directory, self.failures = directory, dict(failures)
        lines = "\n".join(f"  step {s}: {why}" for s, why in sorted(failures.items(), reverse=True))
        super().__init__(f"no checkpoint under {directory} passed the checks ({_CHECKS}):\n{lines}")


# ---------------------------------------------------------------------- finiteness


def _summarise_nonfinite(leaves: list) -> tuple[jax.Array, jax.Array]:
    bad = jnp.stack([jnp.logical_not(jnp.all(jnp.isfinite(x))) for x in leaves])
    return jnp.sum(bad, dtype=jnp.int32), jnp.argmax(bad)  # scalars: replicated, readable on every process


_nonfinite_on_device = jax.jit(_summarise_nonfinite)


def _scalar(x: Any) -> int:
    return int(np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x)


def _group_summary(leaves: list) -> tuple[int, int]:
    """(number of non-finite leaves, index of the first) for jax.Array leaves on one set of devices: one jitted
    reduction, or one per leaf when jit refuses the group (e.g. the same devices in different mesh orders)."""
    try:
        return tuple(_scalar(v) for v in _nonfinite_on_device(leaves))  # type: ignore[return-value]
    except ValueError:
        flags = [_scalar(_nonfinite_on_device([x])[0]) for x in leaves]
        return sum(flags), (flags.index(1) if any(flags) else 0)


def find_nonfinite(tree: Any) -> Optional[NonFinite]:
    """The NaN/inf-holding floating leaves of `tree` (jax arrays, sharded or not, numpy arrays, Python floats), or
    None when all are finite. Device arrays are checked on device (no transfer of the state to the host)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    bad: list[int] = []
    groups: dict[Any, list[int]] = {}
    for i, (_, x) in enumerate(flat):
        if isinstance(x, float):
            if not math.isfinite(x):
                bad.append(i)
            continue
        dtype = getattr(x, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            continue
        if isinstance(x, jax.Array):
            sharding = x.sharding  # jit needs one device order: a mesh's, else the device set's
            if isinstance(sharding, jax.sharding.NamedSharding):
                order: Any = tuple(d.id for d in sharding.mesh.devices.flat)
            else:
                order = frozenset(d.id for d in sharding.device_set)
            groups.setdefault((order, sharding.memory_kind), []).append(i)
        elif not np.isfinite(np.asarray(x)).all():
            bad.append(i)
    count = len(bad)
    for idx in groups.values():
        n, first = _group_summary([flat[i][1] for i in idx])
        if n:
            count += n
            bad.append(idx[first])
    return NonFinite(jax.tree_util.keystr(flat[min(bad)][0]), count) if bad else None


# ---------------------------------------------------------------------- integrity manifest


def _file_digest(path: Path) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _hash_files(paths: list[Path]) -> list[tuple[int, str]]:
    """(size, sha256) per file, hashed in parallel (hashlib releases the GIL); serially at interpreter exit, when
    no new thread pool may start."""
    if len(paths) > 1:
        try:
            with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1, len(paths))) as pool:
                return list(pool.map(_file_digest, paths))
        except RuntimeError as e:
            if "shutdown" not in str(e):
                raise
    return [_file_digest(p) for p in paths]


def write_manifest(step_dir: Path, step: int) -> Path:
    """Write `<step_dir>/_INTEGRITY_MANIFEST.json` (size + sha256 of every other file), atomically (tmp + rename)."""
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and not p.name.startswith(MANIFEST_NAME))
    digests = _hash_files(files)
    doc = {"format": _MANIFEST_FORMAT, "step": int(step), "algorithm": "sha256", "written_unix": time.time(),
           "files": {p.relative_to(step_dir).as_posix(): {"size": n, "sha256": h} for p, (n, h) in zip(files, digests)}}
    target, tmp = step_dir / MANIFEST_NAME, step_dir / f"{MANIFEST_NAME}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def verify_manifest(step_dir: Path, step: int) -> bool:
    """Check every file of the step against its manifest: True when all match, False when the step has no manifest
    (legacy); raises CheckpointRejectedError(check='checksum') naming the files that are missing, resized or
    changed (or the manifest itself when unreadable)."""
    path = step_dir / MANIFEST_NAME
    if not path.is_file():
        return False
    try:
        doc = json.loads(path.read_text())
        entries = {rel: (int(e["size"]), str(e["sha256"])) for rel, e in doc["files"].items()}
        if doc.get("algorithm") != "sha256":
            raise ValueError(f"unknown algorithm {doc.get('algorithm')!r}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointRejectedError(step, "checksum", f"integrity manifest {MANIFEST_NAME} is unreadable "
                                      f"({type(e).__name__}: {e})", MANIFEST_NAME) from e
    problems: list[tuple[str, str]] = []
    to_hash: list[str] = []
    for rel, (size, _) in sorted(entries.items()):  # sizes first: cheap, and catches missing/truncated files
        try:
            actual = (step_dir / rel).stat().st_size
        except OSError as e:
            problems.append((rel, f"missing or unreadable ({type(e).__name__}: {e.strerror or e})"))
            continue
        if actual != size:
            problems.append((rel, f"{actual} bytes, manifest says {size} (truncated or overwritten)"))
        else:
            to_hash.append(rel)
    try:
        digests = _hash_files([step_dir / rel for rel in to_hash])
    except OSError as e:
        raise CheckpointRejectedError(step, "checksum", f"could not read a file to checksum it ({e})",
                                      getattr(e, "filename", None)) from e
    for rel, (_, digest) in zip(to_hash, digests):
        if digest != entries[rel][1]:
            problems.append((rel, f"sha256 mismatch (manifest {entries[rel][1][:12]}..., file {digest[:12]}...): "
                                  "its bytes changed after it was saved"))
    if problems:
        problems.sort()
        detail = "; ".join(f"file {rel}: {why}" for rel, why in problems[:5])
        if len(problems) > 5:
            detail += f"; and {len(problems) - 5} more files"
        raise CheckpointRejectedError(step, "checksum", detail, problems[0][0])
    return True


class _ManifestWriter(threading.Thread):
    """Background writer of an async save's manifest: waits for orbax's atomic rename of the step directory (it
    never calls orbax, whose methods hold multi-host barriers), then hashes the files. `finish` is called once orbax
    reports the save done: the thread then checks one last time and exits."""

    def __init__(self, step_dir: Path, step: int, is_final):
        super().__init__(name=f"checkpoint-manifest-{step}", daemon=True)
        self.step_dir, self.step, self._is_final = step_dir, step, is_final
        self._done = threading.Event()
        self.error: Optional[BaseException] = None  # writing the manifest failed
        self.not_finalized = False  # orbax reported the save done (or failed) but the step never appeared

    def run(self) -> None:
        delay = 0.01
        while True:
            orbax_done = self._done.is_set()
            if self._is_final():
                try:
                    write_manifest(self.step_dir, self.step)
                except BaseException as e:  # noqa: BLE001 - reported by finish()
                    self.error = e
                return
            if orbax_done:
                self.not_finalized = True
                return
            self._done.wait(delay)
            delay = min(2 * delay, 0.5)

    def finish(self) -> None:
        """Wait for the thread; raise when the step was finalized but its manifest could not be written."""
        self._done.set()
        self.join()
        if self.not_finalized:
            logger.error("checkpoint: orbax never finalized step %d (the save failed, or the process exited before "
                         "`wait_until_finished`/`close`): there is no checkpoint for that step", self.step)
        if self.error is not None:
            raise OSError(f"could not write the integrity manifest of checkpoint step {self.step} in "
                          f"{self.step_dir} ({type(self.error).__name__}: {self.error}); the step itself is "
                          "complete and restores as legacy (unverified)") from self.error


def _finish_manifest_at_exit(ref: "weakref.ReferenceType[Checkpointer]") -> None:
    """atexit: orbax's (non-daemon) finalize thread has been joined by now, so a pending manifest can be written."""
    ckpt = ref()
    if ckpt is not None and ckpt._manifest_writer is not None:
        writer, ckpt._manifest_writer = ckpt._manifest_writer, None
        try:
            writer.finish()
        except OSError as e:
            logger.error("checkpoint: %s", e)


# ---------------------------------------------------------------------- multi-host helpers


def _all_agree(ok: bool) -> bool:
    """True when `ok` on every process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def _from_process_0(value: int) -> int:
    """Process 0's `value` on every process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


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
        return actions[_from_process_0(actions.index(action))], why

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
        _barrier(f"toolrl_checkpoint_set_aside_{step}")
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
        if not _from_process_0(failure is None):
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
        if not _all_agree(error is None):
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
