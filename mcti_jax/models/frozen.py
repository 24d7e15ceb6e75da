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
