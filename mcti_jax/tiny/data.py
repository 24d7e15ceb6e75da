"""What the tiny models see: the pretraining half of digits 0-4, shifted by a few pixels."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mcti_jax import data as D
from mcti_jax.tiny.captions import KNOWN_DIGITS


def pretraining_data(digits: Sequence[int] = KNOWN_DIGITS) -> tuple[np.ndarray, np.ndarray]:
  """The pretraining half of sklearn digits of `digits` only: uint8 [N, 16, 16, 3], digit labels [N]."""
  images, labels = D.digits_images()
  positions = D.digits_split(labels)["pretrain"]
  positions = positions[np.isin(labels[positions], list(digits))]
  return images[positions], labels[positions]


def shift_images(key, images, max_shift: int):
  """Random translation by up to `max_shift` pixels (zero = black background fill), per image.

  Without it, CLIP features of 5-9 are at chance even for image features.
  """
  if max_shift == 0:
    return images
  b, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
  offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
  crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, image.shape[-1]))  # noqa: E731
  return jax.vmap(crop)(padded, offsets)


def translate(x, dy: int, dx: int):
  """Shift images [B, H, W, C] by (dy, dx) pixels, filling with zeros."""
  h, w = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0)))
  return padded[:, abs(dy) - dy:abs(dy) - dy + h, abs(dx) - dx:abs(dx) - dx + w]
