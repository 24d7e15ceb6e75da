"""Image decoding and Stable Diffusion style preprocessing.

Follows diffusers' textual_inversion example: take the centered square crop
(side = the shorter side), resize it to the model resolution (bicubic by
default), keep uint8 RGB (16-bit files keep their high byte). Cropping first and resizing the square is the same
as resizing the shorter side and then cropping, without rounding the aspect
ratio. Conversion to the VAE range [-1, 1] and horizontal flips are separate
functions so the cache can hold uint8 shots and both orientations.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

from mcti_jax.errors import DataError

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


# PIL modes whose convert("RGB") is right: 8 bits per sample (1-bit, palette and premultiplied alpha included).
EIGHT_BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "HSV")
# 16 bits per sample; PIL's convert("RGB") clips these at 255, so almost every pixel came out white.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_SAVE_AS = "save it as an 8-bit or 16-bit PNG (RGB or greyscale)"


def _from_16_bit(samples: np.ndarray) -> np.ndarray:
  """16-bit samples -> 8 bits by keeping the high byte (value >> 8).

  That is what PIL does with 16-bit RGB, RGBA and grey+alpha PNGs, and what
  skimage's img_as_ubyte does, so a greyscale 16-bit PNG reads like its RGB
  twin; it differs from round(value * 255 / 65535) by at most 1.
  """
  return (samples.astype(np.uint32) >> 8).astype(np.uint8)


def _pil_to_array(image: Image.Image, what: str) -> np.ndarray:
  """A PIL image -> a uint8 array, or a DataError for pixels with no fixed 8-bit meaning."""
  mode = image.mode
  if mode in EIGHT_BIT_MODES:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
  if mode in SIXTEEN_BIT_MODES:
    return _from_16_bit(np.asarray(image))
  if mode == "I" and image.format != "TIFF":
    # PIL returns 16-bit PGMs (and, in older versions, 16-bit PNGs) as 32-bit ints holding 0..65535. A TIFF
    # stores 16-bit samples as I;16, so its "I" is real 32-bit data, refused below.
    samples = np.asarray(image)
    if samples.size == 0 or (samples.min() >= 0 and samples.max() <= 65535):
      return _from_16_bit(samples)
    raise DataError(f"{what} holds 32-bit integer pixels ({samples.min()}..{samples.max()}), not 0..65535, "
                    f"so they have no fixed 8-bit meaning; {_SAVE_AS}")
  kind = {"I": "32-bit integer pixels", "F": "32-bit float pixels"}.get(mode, "pixels")
  raise DataError(f"{what} holds {kind} (PIL mode {mode!r}), which have no fixed 8-bit RGB meaning; {_SAVE_AS}")


def to_rgb(image: Image.Image | np.ndarray, what: str = "an image") -> np.ndarray:
  """Any PIL image, or a uint8/uint16/bool array (grey, grey+1, RGB, RGBA) -> uint8 [H, W, 3].

  Alpha is dropped, not composited, as PIL's convert("RGB") does in the
  diffusers scripts. 16-bit pixels keep their high byte (see _from_16_bit);
  float and 32-bit pixels are refused, since their range is unknown. `what`
  names the image (its file) in errors.
  """
  if isinstance(image, Image.Image):
    image = _pil_to_array(image, what)
  image = np.asarray(image)
  if image.dtype == bool:
    image = image.astype(np.uint8) * 255
  if image.dtype == np.uint16:
    image = _from_16_bit(image)
  if image.dtype != np.uint8:
    raise DataError(f"{what}: expected a uint8 or uint16 image array, got dtype {image.dtype}; "
                    f"convert it to uint8 (0..255) first")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise DataError(f"{what}: expected an image array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], "
                    f"got shape {image.shape}")
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  return np.ascontiguousarray(image[..., :3])


def read_image(path: str | os.PathLike) -> np.ndarray:
  """Decode an image file to uint8 RGB [H, W, 3], applying its EXIF orientation."""
  try:
    with Image.open(path) as img:
      ImageOps.exif_transpose(img, in_place=True)  # in place: a copy would lose img.format
      return to_rgb(img, what=f"image file {path}")
  except DataError:
    raise  # already names the file and the fix
  except FileNotFoundError as e:
    raise DataError(f"image file {path} does not exist") from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f"cannot read image file {path}: {e}. Replace or remove the file.") from e


def decode_image_bytes(data: bytes, what: str) -> np.ndarray:
  """Decode encoded image bytes (PNG, JPEG, ...) to uint8 RGB; `what` names the record in errors."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      return to_rgb(img, what=f"the image of {what}")
  except DataError:
    raise
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
