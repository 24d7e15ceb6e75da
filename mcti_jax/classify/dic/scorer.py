"""The UNet error grid of the Diffusion Classifier, sharded over the mesh.

The noise of sample j of an image is normal(fold_in(fold_in(key(seed),
image_index), j)): it depends on the image's index in the dataset, not on its
place in a batch, the device count or the stage configuration.

Speed: the [images x classes x new samples] grid of UNet calls of a stage is
flattened, padded to a multiple of (devices x chunk), sharded over the mesh and
run in chunks of `batch_size` per device by `lax.map`, in ONE jitted call.
Its shapes depend only on the stage, so a whole evaluation compiles once per
stage.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mcti_jax import parallel
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


@functools.partial(jax.jit, static_argnames=("mesh", "chunk", "error"))
def _score_items(unet: Frozen, schedule, contexts, x0, image_indices, seed, item_image, item_class, item_sample,
                 item_t, *, mesh, chunk: int, error: str):
  """Errors [P] of P (image, class, sample) items; items sharded over the mesh, `chunk` UNet calls at a time."""

  def local(unet, schedule, contexts, x0, image_indices, seed, item_image, item_class, item_sample, item_t):
    model = unet.module

    def one_chunk(args):
      b, c, j, t = args
      x = x0[b].astype(jnp.float32)
      noise = jax.vmap(lambda i, s: sample_noise(seed, i, s, x0.shape[1:]))(image_indices[b], j)
      x_t = schedule.add_noise(x, noise, t)
      prediction = model(x_t, t, contexts[c])
      return prediction_errors(prediction, schedule.training_target(x, noise, t), error)

    n = item_image.shape[0]
    chunks = [a.reshape(n // chunk, chunk) for a in (item_image, item_class, item_sample, item_t)]
    return jax.lax.map(one_chunk, chunks).reshape(n)

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

  def __call__(self, classes: np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
    classes, sample_ids = np.asarray(classes, np.int32), np.asarray(sample_ids, np.int32)
    num_images, num_classes = classes.shape
    b = np.repeat(np.arange(num_images, dtype=np.int32), num_classes * len(sample_ids))
    c = np.repeat(classes.ravel(), len(sample_ids))
    j = np.tile(sample_ids, num_images * num_classes)
    items = len(b)
    devices = self.mesh.devices.size
    chunk = min(self.cfg.batch_size, -(-items // devices))  # small grids: don't pad to a full batch
    padded = -(-items // (devices * chunk)) * devices * chunk
    pad = lambda a: np.concatenate([a, np.repeat(a[:1], padded - items)])
    sharding = parallel.class_sharding(self.mesh)
    args = [jax.device_put(pad(a), sharding) for a in (b, c, j, self.timesteps[j])]
    seed = jax.device_put(np.uint32(self.cfg.seed), parallel.replicated(self.mesh))
    errors = _score_items(self.unet, self.schedule, self.contexts, self.x0, self.image_indices, seed, *args,
                          mesh=self.mesh, chunk=chunk, error=self.cfg.error)
    self.unet_evals += self.num_real * num_classes * len(sample_ids)
    return np.asarray(jax.device_get(errors))[:items].reshape(num_images, num_classes, len(sample_ids))


def error_grid(unet: Frozen, schedule, contexts, x0, image_index: int, cfg: DiCConfig, mesh,
               sample_ids: Sequence[int] | None = None) -> np.ndarray:
  """Errors [K, n] of one image (x0 [h, w, c]) for every class and the given sample ids (default all S)."""
  scorer = Scorer(unet, schedule, contexts, cfg, mesh)
  scorer.set_images(np.asarray(x0)[None], [image_index])
  ids = np.arange(cfg.max_samples) if sample_ids is None else np.asarray(sample_ids)
  return scorer(np.arange(scorer.num_classes)[None], ids)[0]
