"""A synthetic world of K procedurally distinct classes, for measuring scale on CPU (no accuracy claim).

Each class draws its style from its own random stream (seed, class): background and foreground colours, a shape,
an orientation, a stripe frequency and phase, a position and a size. Its images are that style under small jitter
(position, angle, size) and pixel noise, at 16x16 like the embedded tiny model's digits. Nothing is drawn until
read: the items are (class, split, index) triples, so a world of a thousand classes enumerates in milliseconds and
memory, throughput and DiC calls can be measured against K in minutes.
"""

from __future__ import annotations

import functools

import numpy as np

from mcti_jax.errors import DataError
from mcti_jax.data.labeled import LabeledImages

SIZE = 16  # the tiny models' resolution
SPLITS = ("train", "test")  # separate random streams: the splits never share an image
SHAPES = ("disk", "square", "ring", "cross", "bar", "triangle")
_GRID = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5  # [2 (y, x), S, S] pixel centres


@functools.lru_cache(maxsize=4096)
def class_style(seed: int, class_index: int) -> dict:
  """The parameters that make a class itself: they depend on (seed, class) only."""
  rng = np.random.default_rng([int(seed), int(class_index)])
  background = rng.uniform(0, 255, 3)
  foreground = rng.uniform(0, 255, 3)
  if np.abs(foreground - background).max() < 96:  # keep the shape visible
    foreground = 255.0 - background
  return dict(background=background, foreground=foreground, shape=int(rng.integers(len(SHAPES))),
              angle=rng.uniform(0, np.pi), frequency=rng.uniform(0.0, 3.0), phase=rng.uniform(0, 2 * np.pi),
              centre=rng.uniform(5.0, 11.0, 2), size=rng.uniform(3.0, 6.0))


def _mask(shape: str, u: np.ndarray, v: np.ndarray, size: float) -> np.ndarray:
  """1 inside the shape, 0 outside; u, v are coordinates in the shape's rotated frame."""
  r = np.hypot(u, v)
  if shape == "disk":
    return r < size
  if shape == "square":
    return np.maximum(np.abs(u), np.abs(v)) < 0.8 * size
  if shape == "ring":
    return np.abs(r - size) < 1.3
  if shape == "cross":
    return (np.minimum(np.abs(u), np.abs(v)) < 1.2) & (np.maximum(np.abs(u), np.abs(v)) < size)
  if shape == "bar":
    return (np.abs(v) < 1.5) & (np.abs(u) < 1.5 * size)
  return (v > -0.6 * size) & (np.abs(u) < 0.6 * (size - v))  # triangle


def render(seed: int, class_index: int, split: str, index: int) -> np.ndarray:
  """uint8 [16, 16, 3]: image `index` of a class in a split, the same on every call."""
  style = class_style(seed, class_index)
  rng = np.random.default_rng([int(seed), int(class_index), SPLITS.index(split), int(index)])
  cy, cx = style["centre"] + rng.normal(0.0, 0.6, 2)
  angle = style["angle"] + rng.normal(0.0, 0.1)
  size = style["size"] * rng.uniform(0.9, 1.1)
  y, x = _GRID[0] - cy, _GRID[1] - cx
  u, v = x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)
  stripes = 0.5 + 0.5 * np.cos(2 * np.pi * style["frequency"] * u / SIZE + style["phase"])
  alpha = _mask(SHAPES[style["shape"]], u, v, size) * (0.55 + 0.45 * stripes)
  image = style["background"] + (style["foreground"] - style["background"]) * alpha[..., None]
  image += rng.normal(0.0, 6.0, image.shape)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def from_synthetic(num_classes: int, split: str = "train", images_per_class: int = 20, seed: int = 0
                   ) -> LabeledImages:
  """K classes "class0000", ... of `images_per_class` images each, drawn on demand; splits are disjoint draws."""
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise DataError(f"a synthetic world needs num_classes >= 1 (data.num_classes), got {num_classes!r}")
  if split not in SPLITS:
    raise DataError(f"synthetic split {split!r} is unknown; use one of {SPLITS}")
  if images_per_class < 1:
    raise DataError(f"images_per_class must be at least 1, got {images_per_class}")
  k, n = int(num_classes), int(images_per_class)
  width = max(4, len(str(k - 1)))
  names = [f"class{c:0{width}d}" for c in range(k)]
  items = [(c, i) for c in range(k) for i in range(n)]
  return LabeledImages(
      class_names=names,
      items=items,
      ids=[f"{split}/{names[c]}/{i}" for c, i in items],
      labels=np.repeat(np.arange(k, dtype=np.int32), n),
      read_fn=lambda batch: [render(seed, c, split, i) for c, i in batch],
      source=f"synthetic:{seed}:{split}")  # not K: class c's images don't depend on it, so its cached encodings stay
