"""What a retrieval is set to do, apart from the code that does it: `mcti retrieve`'s config reads these without
importing JAX, so its --help answers at once.

LAMS are the fixed queries q(lam) every run reports; TINY_ATTRIBUTES the tiny world's attribute words; GairConfig
the settings of Generation-Aided Image Retrieval (gair.py, which says what each step does).
"""

from __future__ import annotations

import dataclasses
import math

from mcti_jax.errors import ConfigError

LAMS = (0.0, 0.25, 0.5, 0.75, 1.5, 2.0)  # the fixed queries q(lam); q(1) is the composite prompt, reported as it
TINY_ATTRIBUTES = ("ink", "width", "slant")  # the tiny world's queries: both words of each (tiny/captions.py)


@dataclasses.dataclass(frozen=True)
class GairConfig:
  num_images: int = 4  # drawings per query and round
  steps: int = 8  # DDIM steps
  guidance: float = 2.0  # classifier-free guidance (the tiny demo's)
  seed: int = 0  # starting noise
  rounds: int = 3  # bisection rounds (plus the lam = 0 reference, drawn with the first)
  lam_max: float = 1.0  # lam searched in [0, lam_max]; above 1 extrapolates past the composite prompt
  class_keep: float = 0.5  # class shown: p_class >= class_keep x p_class of the lam = 0 drawings
  attribute_threshold: float = 0.6  # attribute shown: p_attr >= this (0.5 = no preference)
  logit_scale: float = 100.0  # of both judges' softmax (CLIP's)
  head_template: str = "a photo of a {}"  # the class judge's prompt for every class token
  # Query expansion (step 5), our addition: add the drawings' mean CLIP feature to q(lam). Off: GAIR as published.
  expand_query: bool = False
  image_weight: float = 0.5  # with expand_query: the weight of the drawings' mean CLIP feature in the query
  judge_weighting: bool = True  # with expand_query: weight each drawing by p_class x p_attr in that mean
  batch_size: int = 256  # drawings per jitted call: memory and speed only, results do not depend on it

  def __post_init__(self):
    checks = {"num_images": self.num_images >= 1, "steps": self.steps >= 1, "rounds": self.rounds >= 1,
              "lam_max": self.lam_max > 0, "class_keep": self.class_keep >= 0,
              "attribute_threshold": 0 < self.attribute_threshold < 1, "logit_scale": self.logit_scale > 0,
              "image_weight": self.image_weight > 0 if self.expand_query else self.image_weight >= 0,
              "batch_size": self.batch_size >= 1, "guidance": True}
    finite = ("guidance", "lam_max", "class_keep", "attribute_threshold", "logit_scale", "image_weight")
    bad = [name for name, ok in checks.items() if not ok or (name in finite and not math.isfinite(getattr(self, name)))]
    if bad:
      raise ConfigError(f"GAIR settings out of range: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)} (see "
                        "GairConfig in mcti_jax/retrieval/settings.py)")


def from_config(entry) -> GairConfig:
  """GairConfig from a config entry (a dict or ConfigDict of its fields, `enabled` ignored); unknown names refused."""
  entry = dict(entry.items() if hasattr(entry, "items") else entry)
  entry.pop("enabled", None)
  fields = {f.name for f in dataclasses.fields(GairConfig)}
  unknown = sorted(set(entry) - fields)
  if unknown:
    raise ConfigError(f"GAIR has no settings {unknown}; it has: {', '.join(sorted(fields))}")
  return GairConfig(**entry)
