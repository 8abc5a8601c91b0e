"""Device mesh, parameter partition rules and batch sharding for data/FSDP/tensor parallelism.

Mesh axes are ("data", "fsdp", "tensor"). Parameters are sharded by regex rules over their '/'-joined pytree path
(e.g. "layers/3/attn/q_proj/kernel"); the same rules shard optimizer state, whose moment trees repeat the parameter
paths under a prefix. Batches are split along their leading axis over ("data", "fsdp"). `toolrl_jax.placement.Placement`
applies these rules for the trainers, the sampler and the loaders.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

logger = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH_SPEC = P(("data", "fsdp"))

PartitionRules = tuple[tuple[str, P], ...]

# Kernels are stored [in, out]: the "in" side of column-parallel layers (q/k/v/gate/up, lm_head) is FSDP-sharded and
# the "out" side tensor-sharded; row-parallel layers (o/down) and the [V, H] embedding the other way round.
DEFAULT_RULES: PartitionRules = (
    (r"embed/embedding$", P("tensor", "fsdp")),
    (r"attn/(q|k|v)_proj/kernel$", P("fsdp", "tensor")),
    (r"attn/(q|k|v)_proj/bias$", P("tensor")),
    (r"attn/o_proj/kernel$", P("tensor", "fsdp")),
    (r"mlp/(gate|up)_proj/kernel$", P("fsdp", "tensor")),
    (r"mlp/down_proj/kernel$", P("tensor", "fsdp")),
    (r"lm_head/kernel$", P("fsdp", "tensor")),
    (r"norm/scale$", P()),  # input_norm, post_attn_norm, final_norm: small, replicated
    (r".*", P()),  # anything else (scalars, step counters, unknown heads): replicated
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the (data, fsdp, tensor) mesh axes; at most one may be -1 = all remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Concrete axis sizes for `num_devices` devices; raises ValueError when they cannot multiply out."""
        sizes = [self.data, self.fsdp, self.tensor]
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"MeshConfig sizes must be positive or -1, got {self}")
        if sizes.count(-1) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1, got {self}")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"MeshConfig {self}: {num_devices} devices are not divisible by {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(f"MeshConfig {self} needs {math.prod(sizes)} devices, but {num_devices} are given")
        return tuple(sizes)  # type: ignore[return-value]


def make_mesh(config: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A Mesh with axes ("data", "fsdp", "tensor"); topology-aware device order when `devices` is None."""
    if devices is None:
        devices = jax.devices()
        shape = config.resolve(len(devices))
        try:
            from jax.experimental import mesh_utils

            arr = mesh_utils.create_device_mesh(shape, devices)
        except Exception:  # noqa: BLE001 - topology helpers do not know every platform; plain order works anywhere
            arr = np.asarray(devices).reshape(shape)
    else:
        shape = config.resolve(len(devices))
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, AXES)


def path_to_str(path: Sequence[Any]) -> str:
    """'/'-joined names of a pytree key path; an nnx Variable's trailing '.value' is dropped."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        parts.pop()
    return "/".join(parts)


def partition_spec(path: str, shape: Sequence[int], axis_sizes: Mapping[str, int],
                   rules: PartitionRules = DEFAULT_RULES) -> P:
    """The spec of the first rule whose regex matches `path`, made safe for `shape`.

    A dimension whose size is not divisible by its mesh axes is replicated instead (with a warning); a spec with
    more entries than the array has dimensions falls back to full replication. No rule matching means replicated.
    """
    for pattern, spec in rules:  # noqa: B007 - the matching rule's spec is used after the loop
        if re.search(pattern, path):
            break
    else:
        return P()
    if len(spec) > len(shape):
        if len(spec):
            logger.warning("sharding: rule %r gives %s for %s of shape %s (rank too small); replicating",
                           pattern, spec, path, tuple(shape))
        return P()
    entries = []
    for dim, axes in zip(shape, spec):
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        size = math.prod(axis_sizes[a] for a in names)
        if names and dim % size:
            logger.warning("sharding: %s dim of size %d is not divisible by mesh axes %s (size %d); replicating "
                           "that dim", path, dim, names, size)
            axes = None
        entries.append(axes)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def param_shardings(state_shapes: Any, mesh: Mesh, rules: PartitionRules = DEFAULT_RULES) -> Any:
    """A pytree of NamedSharding matching `state_shapes` (arrays or jax.ShapeDtypeStruct: params, opt state...)."""
    axis_sizes = dict(mesh.shape)

    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, partition_spec(path_to_str(path), shape, axis_sizes, rules))

    return jax.tree_util.tree_map_with_path(one, state_shapes)


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           local_device_ids: Optional[Sequence[int]] = None,
                           heartbeat_timeout_seconds: int = 100) -> None:
    """Start JAX's multi-host runtime (call once per process, before any other JAX call).

    With no arguments JAX auto-detects the cluster (Cloud TPU, SLURM, ...). Does nothing when already initialized.
    CPU processes exchange collectives through gloo (the CPU backend has no cross-process collectives otherwise;
    the setting does not touch GPU or TPU backends). A process that stops sending heartbeats for
    `heartbeat_timeout_seconds` (it died, or its host did) makes JAX's coordination service terminate every other
    process with "another task died" instead of leaving them blocked in a collective.
    """
    if jax.distributed.is_initialized():
        return
    if heartbeat_timeout_seconds < 1:
        raise ValueError(f"heartbeat_timeout_seconds must be >= 1, got {heartbeat_timeout_seconds}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    logger.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())
