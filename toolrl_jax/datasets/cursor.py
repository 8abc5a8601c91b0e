"""A resumable (epoch, batch-in-epoch) position over a dataset's per-epoch batch order.

Shared by the GRPO prompt dataset and the SFT dataset: both define `epoch_batches(epoch)` (pure in the seed and
epoch), `make_batch(indices)` and `_identity()` (what must match for a saved position to be meaningful), and get
`next_batch`, `epoch`, `state()` and `restore()` from here.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


class EpochCursor:
    """Mixin: the position and its checkpointable state. Subclasses set `_epoch = _batch = 0` in __init__."""

    _epoch: int
    _batch: int
    _position_name = "data position"  # how errors name it
    _mismatch_hint = "different data, tokenizer or seed?"

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        raise NotImplementedError

    def make_batch(self, indices: Sequence[int]) -> Any:
        raise NotImplementedError

    def _identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def next_batch(self) -> Any:
        """The batch at the current position; advances the position (rolling over to the next epoch)."""
        batches = self.epoch_batches(self._epoch)
        if not batches:
            raise ValueError("an epoch has no batches (fewer examples than batch_size with drop_last)")
        if self._batch >= len(batches):
            self._epoch, self._batch = self._epoch + 1, 0
            batches = self.epoch_batches(self._epoch)
        batch = self.make_batch(batches[self._batch])
        self._batch += 1
        return batch

    @property
    def epoch(self) -> int:
        """The epoch of the most recently served batch (0 before any; an epoch's end rolls over on the next draw)."""
        return self._epoch

    def state(self) -> dict[str, Any]:
        """The resumable position (JSON-serialisable)."""
        return {"epoch": self._epoch, "batch_in_epoch": self._batch, **self._identity()}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continues from `state()` of a dataset with the same data and order settings."""
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise ValueError(f"cannot restore the {self._position_name}: {key} is {state.get(key)!r} in the "
                                 f"saved state but {value!r} here ({self._mismatch_hint})")
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or not 0 <= batch <= len(self.epoch_batches(epoch)):
            raise ValueError(f"invalid {self._position_name} epoch={epoch}, batch_in_epoch={batch}")
        self._epoch, self._batch = epoch, batch
