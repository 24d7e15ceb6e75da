"""Image decoding and Stable Diffusion style preprocessing.

Follows diffusers' textual_inversion example: take the centered square crop
(side = the shorter side), resize it to the model resolution (bicubic by
default), keep uint8 RGB. Cropping first and resizing the square is the same
as resizing the shorter side and then cropping, without rounding the aspect
ratio. Conversion to the VAE range [-1, 1] and horizontal flips are separate
functions so the cache can hold uint8 shots and both orientations.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

from mcti_jax.data.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def is_image_file(name: str) -> bool:
  base = os.path.basename(name)
  return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def to_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
  """Any PIL image or uint8/bool array (grey, grey+1, RGB, RGBA) -> uint8 [H, W, 3].

  Alpha is dropped, not composited, as PIL's convert("RGB") does in the
  diffusers scripts.
  """
  if isinstance(image, Image.Image):
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
  image = np.asarray(image)
  if image.dtype == bool:
    image = image.astype(np.uint8) * 255
  if image.dtype != np.uint8:
    raise DataError(f"expected a uint8 image array, got dtype {image.dtype}; convert it to uint8 (0..255) first")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise DataError(f"expected an image array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {image.shape}")
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  return np.ascontiguousarray(image[..., :3])


def read_image(path: str | os.PathLike) -> np.ndarray:
  """Decode an image file to uint8 RGB [H, W, 3], applying its EXIF orientation."""
  try:
    with Image.open(path) as img:
      return to_rgb(ImageOps.exif_transpose(img))
  except FileNotFoundError as e:
    raise DataError(f"image file {path} does not exist") from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f"cannot read image file {path}: {e}. Replace or remove the file.") from e


def decode_image_bytes(data: bytes, what: str) -> np.ndarray:
  """Decode encoded image bytes (PNG, JPEG, ...) to uint8 RGB; `what` names the record in errors."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      return to_rgb(img)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f"cannot decode the image of {what}: {e}") from e


def center_crop_resize(image: np.ndarray, resolution: int, interpolation: str = "bicubic") -> np.ndarray:
  """uint8 RGB [H, W, 3] -> the centered square crop resized to uint8 [resolution, resolution, 3]."""
  if interpolation not in INTERPOLATIONS:
    raise DataError(f"unknown interpolation {interpolation!r}; use one of {sorted(INTERPOLATIONS)}")
  image = to_rgb(image)
  h, w = image.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  image = image[top:top + side, left:left + side]
  if side != resolution:
    pil = Image.fromarray(image).resize((resolution, resolution), resample=INTERPOLATIONS[interpolation])
    image = np.asarray(pil, dtype=np.uint8)
  return np.ascontiguousarray(image)


def to_model_range(images):
  """uint8 images -> float32 in [-1, 1] (the VAE's input range). Works on numpy and jax arrays."""
  if images.dtype != np.uint8:
    raise DataError(f"to_model_range expects uint8 images, got dtype {images.dtype}")
  return images.astype(np.float32) / 127.5 - 1.0


def flip_horizontal(images):
  """Mirror images [..., H, W, C] left-right."""
  return images[..., ::-1, :]
