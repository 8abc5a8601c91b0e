"""`Placement`: the one object that decides where arrays live: the device mesh, the shardings of parameter and
optimizer-state pytrees, and how host batches become device batches.

Every trainer (GRPO/PPO actor, critic, SFT), the sampler and the loaders take a Placement instead of a mesh, a
sharding function and a batch-placement callback each. One device: no mesh, plain jit, arrays as they are. Several
devices: a (data, fsdp, tensor) mesh, parameters sharded by the partition rules of `toolrl_jax.sharding`, and batch
rows split over (data, fsdp).

Batches follow one convention on every host: a host batch is the WHOLE batch (every process holds the same rows, as
they come from the same seeded data order and from `fetch`); `place_rows` gives each process's devices their share.
`fetch` is the way back: a device array as a full host array on every process (an all-gather across processes).
Following EasyLM's `get_partition_rules` / MaxText's logical axes: parameter names map to mesh axes in one place.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, Sharding
from jax.sharding import PartitionSpec as P

from toolrl_jax.sharding import (
    BATCH_SPEC,
    DEFAULT_RULES,
    MeshConfig,
    PartitionRules,
    make_mesh,
    param_shardings,
    partition_spec,
)


class Placement:
    """Where parameters, optimizer state and batches live (see the module doc)."""

    def __init__(self, mesh: Optional[Mesh] = None, rules: PartitionRules = DEFAULT_RULES):
        self.mesh = mesh
        self.rules = rules

    @classmethod
    def from_config(cls, config: MeshConfig, devices: Optional[Sequence[jax.Device]] = None,
                    rules: PartitionRules = DEFAULT_RULES) -> "Placement":
        """A mesh over `devices` (default: all); a single device gets no mesh (plain jit)."""
        devices = list(jax.devices() if devices is None else devices)
        if len(devices) == 1:
            return cls(None, rules)
        return cls(make_mesh(config, devices), rules)

    @property
    def sharded(self) -> bool:
        return self.mesh is not None

    @property
    def rows_multiple(self) -> int:
        """Batch rows must be a multiple of this (the data-parallel size, data x fsdp)."""
        if self.mesh is None:
            return 1
        return math.prod(self.mesh.shape[a] for a in BATCH_SPEC[0] if a in self.mesh.shape)

    # ------------------------------------------------------------------ parameters and optimizer state
    def state_shardings(self, tree: Any) -> Any:
        """Shardings of a state pytree (arrays or ShapeDtypeStructs) by the partition rules; None without a mesh."""
        if self.mesh is None:
            return None
        return param_shardings(tree, self.mesh, self.rules)

    def param_sharding(self, path: Sequence[Any], shape: Sequence[int]) -> Optional[Sharding]:
        """The sharding of one parameter by its path (a loader's callback, e.g. `hf_io.load_hf_model(shardings=)`)."""
        if self.mesh is None:
            return None
        name = "/".join(str(p) for p in path)
        return NamedSharding(self.mesh, partition_spec(name, shape, dict(self.mesh.shape), self.rules))

    def loader_shardings(self):
        """`param_sharding` for loaders, or None without a mesh (loaders then keep arrays on the default device)."""
        return None if self.mesh is None else self.param_sharding

    def place_state(self, tree: Any) -> Any:
        """`tree` on the devices with its rule shardings (unchanged without a mesh)."""
        if self.mesh is None:
            return tree
        return jax.device_put(tree, self.state_shardings(tree))

    def init_opt_state(self, optimizer: Any, params: Any) -> Any:
        """optimizer.init(params) created directly with the rule shardings (no replicated intermediate)."""
        shardings = self.state_shardings(jax.eval_shape(optimizer.init, params))
        return jax.jit(optimizer.init, out_shardings=shardings)(params)

    def jit_update(self, fn: Any, params: Any, opt_state: Any, donate_argnums: tuple[int, ...] = (0, 1),
                   extra_outputs: int = 1) -> Any:
        """jit(fn) for an update fn(params, opt_state, ...) -> (params, opt_state, *extra): the new state keeps the
        shardings of `params` / `opt_state` (donated), the extra outputs are left to the compiler."""
        if self.mesh is None:
            return jax.jit(fn, donate_argnums=donate_argnums)
        shardings = (self.state_shardings(params), self.state_shardings(opt_state), *([None] * extra_outputs))
        return jax.jit(fn, donate_argnums=donate_argnums, out_shardings=shardings)

    # ------------------------------------------------------------------ batches
    def row_sharding(self, ndim: int, leading: int = 0) -> Optional[NamedSharding]:
        """Rows (axis `leading`) split over (data, fsdp), every other axis replicated."""
        if self.mesh is None:
            return None
        return NamedSharding(self.mesh, P(*([None] * leading), *BATCH_SPEC, *([None] * (ndim - leading - 1))))

    def _put(self, value: Any, leading: int) -> jax.Array:
        value = np.asarray(value)
        if self.mesh is None:
            return jnp.asarray(value)
        rows = value.shape[leading]
        if rows % self.rows_multiple:
            raise ValueError(f"a batch of {rows} rows cannot be split over the data-parallel devices (data x fsdp = "
                             f"{self.rows_multiple}); use a multiple")
        sharding = self.row_sharding(value.ndim, leading)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    def place_rows(self, batch: Mapping[str, Any], row_axis: int = 0) -> dict[str, jax.Array]:
        """A host batch {name: [rows, ...]} (the whole batch, on every process) on the devices, rows (axis
        `row_axis`, e.g. 1 for batches already stacked [num_micro, micro_rows, ...]) split."""
        return {k: self._put(v, row_axis) for k, v in batch.items()}

    def place_stacked(self, micro_batches: Sequence[Mapping[str, Any]]) -> dict[str, jax.Array]:
        """Micro-batches {name: [micro_rows, ...]} stacked into [num_micro, micro_rows, ...] with the micro_rows axis
        split (each micro-batch's rows over the data-parallel devices, as a scan over micro-batches needs)."""
        keys = micro_batches[0].keys()
        return {k: self._put(np.stack([np.asarray(m[k]) for m in micro_batches]), 1) for k in keys}

    def fetch(self, tree: Any) -> Any:
        """Device arrays as full numpy arrays on every process (all-gathered across processes when there are
        several)."""
        if jax.process_count() == 1:
            return jax.device_get(tree)
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
