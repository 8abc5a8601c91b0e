"""Integrity checks of checkpoint steps: finiteness of a state's floating arrays (on the devices, sharded or not)
and a per-step manifest of every file's size and sha256, written once the step is on disk and verified on restore.
`toolrl_jax.checkpointing.Checkpointer` applies them.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

MANIFEST_NAME = "_INTEGRITY_MANIFEST.json"
_MANIFEST_FORMAT = 1
_CHUNK = 8 << 20


@dataclasses.dataclass(frozen=True)
class NonFinite:
    """Floating leaves holding a NaN or inf: the first one's path (jax.tree_util.keystr) and how many there are."""

    first_path: str
    count: int

    def __str__(self) -> str:
        more = f" (and {self.count - 1} more non-finite leaves)" if self.count > 1 else ""
        return f"non-finite values (NaN/inf) in leaf {self.first_path}{more}"


class CheckpointRejectedError(RuntimeError):
    """A checkpoint step failed a restore check. check: 'checksum' (a file missing, resized, changed, or the manifest
    unreadable), 'unreadable' (orbax could not restore it) or 'non-finite' (a floating array holds NaN/inf);
    path: the file (relative to the step directory) or the leaf that failed, when known."""

    def __init__(self, step: int, check: str, detail: str, path: Optional[str] = None):
        self.step, self.check, self.detail, self.path = step, check, detail, path
        super().__init__(f"checkpoint step {step} rejected ({check}): {detail}")


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
