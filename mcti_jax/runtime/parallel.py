"""The mesh: classes are sharded over devices, frozen weights replicated.

Every per-class quantity (tokens, optimiser state, cached shot latents) has a
leading class axis padded to a multiple of the class axis's size. Padded
classes are masked out of the loss, so they train nothing and report nothing.

The trainer's mesh may have a second axis, `data`: the devices of one class
shard split that class's per-class batch (each draws its slice of the same
items) and average their gradients. Use it when there are fewer classes than
devices, or per-class batches too large for one device; the tokens are those
of the 1-D mesh (up to float summation order). Evaluators use the 1-D mesh.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

CLASS_AXIS = "classes"
DATA_AXIS = "data"  # the trainer's optional second axis: a class's batch split over devices


def make_mesh(num_devices: int | None = None, data: int = 1) -> Mesh:
  """A mesh over the first `num_devices` devices (all of them by default): 1-D (classes), or with `data` > 1
  2-D (classes, data), the devices of a class's data shards adjacent (on one host where possible)."""
  devices = jax.devices()
  if num_devices is not None:
    if num_devices > len(devices):
      raise ValueError(f"asked for {num_devices} devices but only {len(devices)} are visible "
                       f"({devices[0].platform}). On CPU, simulate more with "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices}.")
    devices = devices[:num_devices]
  if data == 1:
    return Mesh(np.asarray(devices), (CLASS_AXIS,))
  if data < 1 or len(devices) % data:
    raise ValueError(f"mesh.data={data} must divide the {len(devices)} devices: each class shard splits its batch "
                     "over that many of them")
  return Mesh(np.asarray(devices).reshape(-1, data), (CLASS_AXIS, DATA_AXIS))


def data_size(mesh: Mesh) -> int:
  """How many devices split one class's batch (1 on a 1-D mesh)."""
  return mesh.shape.get(DATA_AXIS, 1)


def padded_num_classes(num_classes: int, mesh: Mesh) -> int:
  n = mesh.shape[CLASS_AXIS]
  return -(-num_classes // n) * n


def class_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(CLASS_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_classes(mesh: Mesh, num_padded: int) -> np.ndarray:
  """The (padded) class indices whose shards live on this process's devices, sorted."""
  index_map = class_sharding(mesh).addressable_devices_indices_map((num_padded,))
  held = set()
  for (cls_slice,) in index_map.values():
    held.update(range(*cls_slice.indices(num_padded)))
  return np.asarray(sorted(held), np.int32)


def shard_by_class(local_values: np.ndarray, mesh: Mesh, num_padded: int) -> jax.Array:
  """A global array sharded on the class axis, built from the rows this process holds.

  `local_values` has one row per entry of `local_classes(mesh, num_padded)`, so
  with several processes each loads only its own classes.
  """
  global_shape = (num_padded, *local_values.shape[1:])
  return jax.make_array_from_process_local_data(class_sharding(mesh), local_values, global_shape)


def pad_rows(values: np.ndarray, num_rows: int) -> np.ndarray:
  """Pad the leading axis with copies of row 0 (masked out later; zeros could make NaNs in norms)."""
  extra = num_rows - values.shape[0]
  if extra < 0:
    raise ValueError(f"cannot pad {values.shape[0]} rows down to {num_rows}")
  return np.concatenate([values, np.repeat(values[:1], extra, axis=0)]) if extra else values
