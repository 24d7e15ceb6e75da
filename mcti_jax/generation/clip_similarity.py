"""MC-TI's generation metric (Table 2): CLIP image-image similarity of generated images and the shots."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mcti_jax.models import clip as clip_lib
from mcti_jax.models.frozen import Frozen, freeze


@jax.jit
def _unit_features(clip_model: Frozen, images):
  features = clip_lib.image_features(clip_model.module, images).astype(jnp.float32)
  return features / jnp.linalg.norm(features, axis=-1, keepdims=True)


def unit_image_features(clip_model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """Unit-norm CLIP image features [B, P] of uint8 images [B, H, W, 3], in fixed-size batches (one compile)."""
  frozen = clip_model if isinstance(clip_model, Frozen) else freeze(clip_model)
  images = np.asarray(images)
  batch = min(batch_size, len(images))
  out = []
  for start in range(0, len(images), batch):
    part = images[start:start + batch]
    padded = np.concatenate([part, np.repeat(part[:1], batch - len(part), axis=0)])
    out.append(np.asarray(_unit_features(frozen, padded))[:len(part)])
  return np.concatenate(out)


def mean_pair_cosines(generated_features: np.ndarray, shot_features: np.ndarray) -> np.ndarray:
  """generated [K, G, P] and shots [K, N, P] CLIP image features (any norm) -> [K]: for class k, the mean cosine
  over all G x N pairs of its generations and its shots."""
  g, s = (np.asarray(x, np.float64) for x in (generated_features, shot_features))
  if g.ndim != 3 or s.ndim != 3 or g.shape[0] != s.shape[0] or g.shape[2] != s.shape[2]:
    raise ValueError(f"need generated [K, G, P] and shots [K, N, P] with the same K and P, got {g.shape} and "
                     f"{s.shape}")
  g, s = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (g, s))
  return np.einsum("kgp,knp->k", g, s) / (g.shape[1] * s.shape[1])


def clip_image_similarity(clip_model, generated: np.ndarray, shots: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """Per class, the mean CLIP image-image cosine of its generated images and its shots.

  generated [K, G, H, W, 3] and shots [K, N, H', W', 3] (uint8) -> [K]: for
  class k, the mean over all G x N pairs of cos(f(generated[k, g]), f(shots[k, n])).
  Report the values per class and their mean.
  """
  generated, shots = np.asarray(generated), np.asarray(shots)
  if generated.ndim != 5 or shots.ndim != 5 or generated.shape[0] != shots.shape[0]:
    raise ValueError(f"need generated [K, G, H, W, 3] and shots [K, N, H, W, 3] with the same K, got "
                     f"{generated.shape} and {shots.shape}")
  frozen = freeze(clip_model)
  k, g, n = generated.shape[0], generated.shape[1], shots.shape[1]
  gen = unit_image_features(frozen, generated.reshape(-1, *generated.shape[2:]), batch_size).reshape(k, g, -1)
  ref = unit_image_features(frozen, shots.reshape(-1, *shots.shape[2:]), batch_size).reshape(k, n, -1)
  return mean_pair_cosines(gen, ref)
