"""Decisions every process of a multi-process run must take together.

A multi-host run is one SPMD program: every process must make the same choices (resume or start, train the warm-up
or reuse it, keep or reject a checkpoint) and must not read a file before the process that writes it has finished.
These helpers are collectives (every process calls them, in the same order) and cost nothing in a 1-process run.
Following JAX's `multihost_utils` (broadcast_one_to_all, sync_global_devices), as MaxText and Levanter use it.
"""
from __future__ import annotations

import jax
import numpy as np


def multi_process() -> bool:
    """Whether this is one process of several. False before jax.distributed.initialize, without starting a backend
    (so it may be asked while flags are checked, before the runtime starts)."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def all_agree(ok: bool) -> bool:
    """True when `ok` on every process."""
    if not multi_process():
        return ok
    from jax.experimental import multihost_utils
    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def from_process_0(value: int) -> int:
    """Process 0's integer `value` on every process (process 0 decides, e.g. from what it sees on disk)."""
    if not multi_process():
        return value
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def barrier(name: str) -> None:
    """Waits until every process reached the barrier `name` (e.g. after process 0 wrote a file all will read)."""
    if multi_process():
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
