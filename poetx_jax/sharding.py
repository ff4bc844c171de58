"""Device mesh and shardings: data parallel over `data`, fully sharded over `fsdp`.

Every array large enough to matter is split along its largest dimension that the
`fsdp` axis divides (parameters, POET-X base kernels, optimizer moments alike);
small ones are replicated. With `fsdp = 1` this is plain data parallelism, where
POET-X only all-reduces the gradients of its small orthogonal parameters and the
unwrapped layers (embeddings, norms, head).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)
# Arrays with fewer elements are replicated: sharding them buys nothing.
MIN_SHARDED_SIZE = 2**14


def make_mesh(data: int, fsdp: int, devices=None) -> Mesh:
  """A `(data, fsdp)` mesh over all devices; `-1` on one axis takes the rest.

  Raises:
    ValueError: if the axes do not multiply to the device count.
  """
  devices = list(devices if devices is not None else jax.devices())
  count = len(devices)
  if data == -1 and fsdp == -1:
    raise ValueError("only one of mesh.data and mesh.fsdp may be -1.")
  if data == -1:
    data = count // fsdp if fsdp > 0 and count % fsdp == 0 else 0
  if fsdp == -1:
    fsdp = count // data if data > 0 and count % data == 0 else 0
  if data < 1 or fsdp < 1 or data * fsdp != count:
    raise ValueError(f"mesh.data × mesh.fsdp must equal the {count} devices; got data={data}, fsdp={fsdp}.")
  grid = np.asarray(devices).reshape(data, fsdp)
  return Mesh(grid, (DATA, FSDP), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def array_spec(shape: tuple[int, ...], fsdp_size: int) -> PartitionSpec:
  """Shards the largest dimension divisible by `fsdp_size` over `fsdp`, else replicates."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_SIZE:
    return PartitionSpec()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = FSDP
      return PartitionSpec(*spec)
  return PartitionSpec()


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """A NamedSharding for every leaf of a tree of arrays or ShapeDtypeStructs."""
  fsdp_size = mesh.shape[FSDP]
  return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, array_spec(np.shape(x), fsdp_size)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches split over every device along their first axis."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def device_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows of the global batch as one global array per key."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
