"""Random initialisation without compiling one initializer per parameter shape.

Building an NNX module eagerly runs (and compiles) every initializer op on its
own: tens of seconds for a tiny UNet on 2 cores. Here the shapes come from
`nnx.eval_shape` and the values are drawn in numpy, by parameter kind, with
the usual scales: fan-in normal kernels, zero biases, unit norm scales,
N(0, 0.02) embeddings (as CLIP).
"""

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util


def create(build: Callable[[], nnx.Module], seed: int = 0) -> nnx.Module:
  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(abstract))
  values = {path: _draw(str(path[-1]), leaf, rng) for path, leaf in flat.items()}
  nnx.replace_by_pure_dict(abstract, traverse_util.unflatten_dict(values))
  return nnx.merge(graphdef, abstract)


def _draw(name: str, leaf, rng: np.random.Generator):
  shape, dtype = leaf.shape, leaf.dtype
  if name == "kernel":
    fan_in = int(np.prod(shape[:-1]))
    value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
  elif name == "bias":
    value = np.zeros(shape)
  elif name == "scale":
    value = np.ones(shape)
  elif name in ("embedding", "class_embedding"):
    value = rng.normal(0.0, 0.02, shape)
  elif name == "logit_scale":
    value = np.full(shape, np.log(1 / 0.07))  # CLIP's initial temperature
  else:
    raise ValueError(f"no initializer for a parameter named {name!r}")
  return jnp.asarray(value, dtype)
