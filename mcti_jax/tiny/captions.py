"""How the tiny CLIP learns words: captions that name digits 0-4 and, now and then, their shapes.

A caption names its image's digit in a Textual Inversion template ("a photo
of the digit three") and may add words for the image's shape attributes,
measured on the image ("... bold leaning left"). Without the attributes every
CLIP feature collapses onto the five known digits, and nothing, learned tokens
included, can tell 5-9 apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mcti_jax.tokens import placeholders as tok
from mcti_jax.models import tokenizer as tokenizer_lib

KNOWN_DIGITS = (0, 1, 2, 3, 4)
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# How a digit is named in captions: the TI templates (the trainer's prompts) hold the name
# alone or as "digit <name>"; a few more phrasings on top.
# The CLIP phase tokenizes captions to this length, not 77: the text tower is causal and pools at
# the first EOS, so the pooled feature does not depend on later positions (exact, and much cheaper).
CLIP_TEXT_LENGTH = 32
_EXTRA_TEMPLATES = ("a photo of the digit {}", "the number {}", "a handwritten {}", "a picture of the digit {}",
                    "an image of the number {}", "a handwritten digit {}")


def caption_templates() -> tuple[str, ...]:
  as_digit = [t.format("digit {}") for t in tok.TI_TEMPLATES]
  return tuple(dict.fromkeys([*tok.TI_TEMPLATES, *as_digit, *_EXTRA_TEMPLATES]))


def captions_of(digit: int) -> list[str]:
  return [t.format(NAMES[digit]) for t in caption_templates()]


def caption_ids(tokenizer, digits: Sequence[int]) -> np.ndarray:
  """Token ids [len(digits), T, 77] of every caption of every digit."""
  return np.stack([tokenizer_lib.encode(tokenizer, captions_of(d)) for d in digits])


# Shape attributes, measured on an image's ink around its own centroid (so shifts don't change them) and
# cut at the terciles of the pretraining images: (words for the low third, words for the high third).
ATTRIBUTES = (
    ("ink", "thin", "bold"),
    ("width", "narrow", "wide"),
    ("skew_y", "heavy at the bottom", "heavy at the top"),  # y grows downwards: a tail below = mass on top
    ("skew_x", "heavy on the right", "heavy on the left"),
    ("slant", "leaning right", "leaning left"),  # cov(x, y) > 0: the bottom sits right of the top
)


def shape_measures(images: np.ndarray) -> np.ndarray:
  """[N, len(ATTRIBUTES)] ink, width, vertical and horizontal skew, slant of uint8 images [N, H, W, 3]."""
  w = images[..., 0].astype(np.float64) / 255.0
  h, wd = w.shape[1:]
  ys, xs = np.mgrid[0:h, 0:wd].astype(np.float64)
  mass = w.sum((1, 2)) + 1e-6
  mean = lambda f: (w * f).sum((1, 2)) / mass  # noqa: E731
  cy, cx = mean(ys), mean(xs)
  dy, dx = ys - cy[:, None, None], xs - cx[:, None, None]
  vy, vx = mean(dy ** 2) + 1e-6, mean(dx ** 2) + 1e-6
  return np.stack([mass, np.sqrt(vx), mean(dy ** 3) / vy ** 1.5, mean(dx ** 3) / vx ** 1.5, mean(dx * dy) / vy], -1)


def attribute_levels(measures: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """0 (low third), 1 (middle), 2 (high third) of each measure, by the terciles of `reference`."""
  cuts = np.quantile(reference, [1 / 3, 2 / 3], axis=0)  # [2, A]
  return (measures > cuts[0]).astype(np.int32) + (measures > cuts[1]).astype(np.int32)


def attribute_caption(template: str, digit: int, levels: np.ndarray, mention: np.ndarray) -> str:
  """A caption naming the digit and the mentioned non-middle attributes, e.g. 'a photo of a three bold leaning left'."""
  words = [ATTRIBUTES[a][1 + levels[a] // 2] for a in np.flatnonzero(mention & (levels != 1))]
  return " ".join([template.format(NAMES[digit]), *words])
