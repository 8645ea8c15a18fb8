"""Data parallelism with `jax.jit` + `Mesh` + `NamedSharding` (no pmap).

The mesh is one `data` axis over every device of every process. Batches are sharded along
`data`; parameters and optimizer state are replicated (the models here fit on one device). Under jit, the
contrastive logits are one global matmul and BatchNorm sees the global batch.
"""

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `data` mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`; the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated over the mesh."""
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape[DATA_AXIS]


def check_batch_size(global_batch_size: int, mesh: Mesh, key: str = "batch_size") -> None:
  """Fails with the config key named when the batch does not split evenly over devices/hosts."""
  n = data_parallel_size(mesh)
  if global_batch_size <= 0 or global_batch_size % n:
    raise ValueError(
      f"{key}={global_batch_size} must be a positive multiple of the {n} data-parallel devices"
    )
  if global_batch_size % jax.process_count():
    raise ValueError(f"{key}={global_batch_size} must divide over {jax.process_count()} processes")


def local_rows(mesh: Mesh, global_batch_size: int) -> np.ndarray:
  """The rows of a global batch that this process supplies to `make_global_batch`, in order.

  They are the rows of this process's devices along `data` (sorted, each once), which JAX's
  `make_array_from_process_local_data` fills from the local batch in this order. On CPU and GPU
  they are one contiguous block per process; on TPU pods device order can interleave hosts.
  """
  indices = data_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
  rows = {r for (index,) in indices.values() for r in range(*index.indices(global_batch_size))}
  return np.asarray(sorted(rows), np.int64)


def local_batch_size(global_batch_size: int) -> int:
  """The slice of the global batch that this process reads."""
  return global_batch_size // jax.process_count()


def make_global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Turns each process's local batch (a pytree of NumPy arrays) into global sharded jax.Arrays.

  Every process passes its own `local_batch_size` rows; the result has the global batch size
  along axis 0, sharded over `data`. Works the same on 1 device, 8 CPU devices or a pod.
  """
  sharding = data_sharding(mesh)
  return jax.tree_util.tree_map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )


def to_host(x: jax.Array) -> np.ndarray:
  """The whole value of a global array as NumPy, on every process (gathered across processes)."""
  if jax.process_count() > 1 and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree (params, optimizer state) replicated on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))
