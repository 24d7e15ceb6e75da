"""Shared test helpers. Tests run on CPU with 8 simulated devices (see Makefile)."""

import jax
import numpy as np
import pytest
from flax import nnx


def perturb_params(model: nnx.Module, seed: int = 0, std: float = 0.05) -> nnx.Module:
  """Add noise to every parameter, so zero biases and unit norm scales can't hide a layout bug."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  leaves = [x + rng.normal(0.0, std, x.shape).astype(x.dtype) for x in leaves]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def max_abs_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(autouse=True)
def _torch_threads():
  """Keep torch from oversubscribing the 2 cores that jax also uses."""
  try:
    import torch
    torch.set_num_threads(2)
  except ImportError:
    pass
  yield
