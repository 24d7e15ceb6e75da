"""The (classes, data) mesh: a class's batch split over devices trains the tokens of the 1-D mesh."""

import json

import numpy as np
import pytest

from conftest import tiny_train_config
from mcti_jax import methods
from mcti_jax.runtime import parallel
from mcti_jax.training import train
from mcti_jax.errors import ConfigError


def _config(checkpoint, workdir, data: int):
  """CoMPLe: TI's noise MSE plus negatives gathered over both axes; 2 items per class, 5 classes, 3 steps."""
  c = tiny_train_config(checkpoint, workdir, batch_per_class=2, **{"data.num_classes": 5, "mesh.data": data})
  c.phases = ("comple",)
  c.phase.comple = methods.phase("comple", steps=3, lr=1e-2, lam=1e-2, templates="ti")
  c.log_every = 1
  return c


@pytest.fixture(scope="module")
def meshes(tiny_checkpoint, tmp_path_factory):
  base = tmp_path_factory.mktemp("mesh")
  return {data: train.train(_config(tiny_checkpoint, base / f"data{data}", data), log=lambda _: None)
          for data in (1, 2)}


@pytest.mark.slow
def test_classes_by_data_mesh_gives_the_tokens_of_the_1d_mesh(meshes):
  one, two = meshes[1].tokens["comple"], meshes[2].tokens["comple"]
  np.testing.assert_allclose(two, one, atol=2e-6, rtol=0)
  assert np.abs(two[0] - two[1]).max() > 1e-4  # it trained: the classes started from one word and moved apart


@pytest.mark.slow
def test_metrics_are_those_of_the_whole_batch(meshes):
  rows = {d: [json.loads(line) for line in r.metrics.read_text().splitlines()] for d, r in meshes.items()}
  for a, b in zip(rows[1], rows[2]):
    for key in ("mse", "neg", "neg_raw"):
      if key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_mesh_layout_and_bad_data_sizes():
  mesh = parallel.make_mesh(8, data=2)
  assert dict(mesh.shape) == {"classes": 4, "data": 2}
  assert parallel.padded_num_classes(5, mesh) == 8 and parallel.data_size(mesh) == 2
  assert mesh.devices[1, 0].id == 2  # a class shard's devices are neighbours
  with pytest.raises(ValueError, match="must divide the 8 devices"):
    parallel.make_mesh(8, data=3)


def test_data_size_must_divide_the_batch(tiny_checkpoint, tmp_path):
  config = tiny_train_config(tiny_checkpoint, tmp_path / "run", batch_per_class=3, **{"mesh.data": 2})
  with pytest.raises(ConfigError, match=r"mesh.data.*batch_per_class=3"):
    train.train(config, log=lambda _: None)
