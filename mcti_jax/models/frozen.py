"""A frozen NNX module as a pytree: the weights are leaves, the graph is static.

Pass it into `jax.jit`/`shard_map` like any array pytree; inside, `frozen.module`
rebuilds the module (a trace-time operation, free at run time). Weights never
receive gradients because nothing differentiates with respect to them.
"""

from flax import nnx, struct


@struct.dataclass
class Frozen:
  graphdef: nnx.GraphDef = struct.field(pytree_node=False)
  params: nnx.State

  @property
  def module(self):
    return nnx.merge(self.graphdef, self.params)


def freeze(module: nnx.Module) -> Frozen:
  graphdef, params = nnx.split(module)
  return Frozen(graphdef, params)


def content_hash(state) -> str:
  """A sha256 of a pytree of arrays (paths, shapes, dtypes and bytes): equal weights, equal hash."""
  import hashlib

  import jax
  import numpy as np
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    h.update(f"{jax.tree_util.keystr(path)}|{a.shape}|{a.dtype}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()
