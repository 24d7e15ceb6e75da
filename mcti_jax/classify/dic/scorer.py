"""The UNet error grid of the Diffusion Classifier, sharded over the mesh.

The noise of sample j of an image is normal(fold_in(fold_in(key(seed),
image_index), j)): it depends on the image's index in the dataset, not on its
place in a batch, the device count or the stage configuration.

Speed: the (image, class, sample) items of a stage or round are flattened
and scored in jitted calls of exactly devices x batch_size items (the last
padded), sharded over the mesh: the calls' shapes never change, so a whole
evaluation compiles once, whatever the stages, rounds or survivors. The
calls are dispatched back to back and read once at the end.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mcti_jax.runtime import parallel
from mcti_jax.classify.dic.config import ERRORS, DiCConfig
from mcti_jax.classify.dic.stages import timestep_grid
from mcti_jax.models.frozen import Frozen


def prediction_errors(prediction: jax.Array, target: jax.Array, kind: str) -> jax.Array:
  """Per-item error [N] of predictions [N, ...] against targets, averaged over all but the first axis (float32)."""
  diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
  if kind == "l2":
    e = diff**2
  elif kind == "l1":
    e = jnp.abs(diff)
  elif kind == "huber":  # torch.nn.functional.huber_loss with delta=1
    a = jnp.abs(diff)
    e = jnp.where(a < 1.0, 0.5 * diff**2, a - 0.5)
  else:
    raise ValueError(f"error kind {kind!r} is not one of {ERRORS}")
  return e.mean(axis=tuple(range(1, e.ndim)))


def sample_noise(seed, image_index, sample_id, shape) -> jax.Array:
  """The noise of one (image, sample): normal(fold_in(fold_in(key(seed), image_index), sample_id))."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), image_index), sample_id)
  return jax.random.normal(key, shape, jnp.float32)


@functools.partial(jax.jit, static_argnames=("mesh", "error"))
def _score_items(unet: Frozen, schedule, contexts, x0, image_indices, seed, item_image, item_class, item_sample,
                 item_t, *, mesh, error: str):
  """Errors [P] of P (image, class, sample) items, sharded over the mesh: one UNet batch per device."""

  def local(unet, schedule, contexts, x0, image_indices, seed, b, c, j, t):
    x = x0[b].astype(jnp.float32)
    noise = jax.vmap(lambda i, s: sample_noise(seed, i, s, x0.shape[1:]))(image_indices[b], j)
    x_t = schedule.add_noise(x, noise, t)
    prediction = unet.module(x_t, t, contexts[c])
    return prediction_errors(prediction, schedule.training_target(x, noise, t), error)

  shard = P(parallel.CLASS_AXIS)
  errors = jax.shard_map(local, mesh=mesh, in_specs=(P(),) * 6 + (shard,) * 4, out_specs=shard,
                         check_vma=False)(unet, schedule, contexts, x0, image_indices, seed, item_image, item_class,
                                          item_sample, item_t)
  return jax.lax.with_sharding_constraint(errors, parallel.replicated(mesh))  # every process reads all errors


class Scorer:
  """The UNet error grid of a batch of images on the mesh: the `score_fn` of `run_stages`.

  Frozen weights, schedule and contexts are placed (replicated) on the mesh once.
  """

  def __init__(self, unet: Frozen, schedule, contexts, cfg: DiCConfig, mesh):
    self.cfg, self.mesh = cfg, mesh
    replicated = parallel.replicated(mesh)
    self.unet, self.schedule = jax.device_put((unet, schedule), replicated)
    self.contexts = jax.device_put(jnp.asarray(contexts), replicated)
    self.timesteps = timestep_grid(schedule.num_train_timesteps, cfg.max_samples)
    self.unet_evals = 0  # real (unpadded) UNet evaluations so far
    self.x0 = self.image_indices = None

  @property
  def num_classes(self) -> int:
    return self.contexts.shape[0]

  def set_images(self, x0, image_indices, num_real: int | None = None) -> None:
    """The batch the next calls score; rows past `num_real` are padding (not counted)."""
    replicated = parallel.replicated(self.mesh)
    self.x0 = jax.device_put(jnp.asarray(x0, jnp.float32), replicated)
    self.image_indices = jax.device_put(np.asarray(image_indices, np.int32), replicated)
    self.num_real = len(image_indices) if num_real is None else num_real

  def flat(self, rows: np.ndarray, classes: np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
    """Errors [P] of items (image row of the batch, class, sample id), each [P]: `run_elimination`'s score_fn."""
    rows, classes, sample_ids = (np.asarray(a, np.int32).reshape(-1) for a in (rows, classes, sample_ids))
    items = len(rows)
    if not items:
      return np.zeros(0, np.float32)
    call = self.mesh.devices.size * self.cfg.batch_size
    padded = -(-items // call) * call
    pad = lambda a: np.concatenate([a, np.repeat(a[:1], padded - items)])  # noqa: E731
    items_arrays = [pad(rows), pad(classes), pad(sample_ids), pad(self.timesteps[sample_ids])]
    sharding = parallel.class_sharding(self.mesh)
    seed = jax.device_put(np.uint32(self.cfg.seed), parallel.replicated(self.mesh))
    outputs = []
    for start in range(0, padded, call):  # dispatched back to back; read once below
      part = slice(start, start + call)
      args = [jax.device_put(a[part], sharding) for a in items_arrays]
      outputs.append(_score_items(self.unet, self.schedule, self.contexts, self.x0, self.image_indices, seed, *args,
                                  mesh=self.mesh, error=self.cfg.error))
    self.unet_evals += int(np.sum(rows < self.num_real))
    return np.concatenate([np.asarray(e) for e in jax.device_get(outputs)])[:items]

  def __call__(self, classes: np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
    """Errors [B, Kc, n] of every image's classes [B, Kc] on the sample ids [n]: `run_stages`' score_fn."""
    classes, sample_ids = np.asarray(classes, np.int32), np.asarray(sample_ids, np.int32)
    num_images, num_classes = classes.shape
    rows = np.repeat(np.arange(num_images, dtype=np.int32), num_classes * len(sample_ids))
    errors = self.flat(rows, np.repeat(classes.ravel(), len(sample_ids)), np.tile(sample_ids, num_images * num_classes))
    return errors.reshape(num_images, num_classes, len(sample_ids))


def error_grid(unet: Frozen, schedule, contexts, x0, image_index: int, cfg: DiCConfig, mesh,
               sample_ids: Sequence[int] | None = None) -> np.ndarray:
  """Errors [K, n] of one image (x0 [h, w, c]) for every class and the given sample ids (default all S)."""
  scorer = Scorer(unet, schedule, contexts, cfg, mesh)
  scorer.set_images(np.asarray(x0)[None], [image_index])
  ids = np.arange(cfg.max_samples) if sample_ids is None else np.asarray(sample_ids)
  return scorer(np.arange(scorer.num_classes)[None], ids)[0]
