"""What the Diffusion Classifier does: its settings, checked, and the DiC paper's stage presets."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

ERRORS = ("l2", "l1", "huber")
STRATEGIES = ("stages", "eliminate")

# Stage settings of the DiC paper's commands (github.com/diffusion-classifier, commands.md).
PRESETS: dict[str, dict[str, Any]] = {
    "pets": dict(keep=(5, 1), samples=(25, 250), error="l1"),
    "flowers": dict(keep=(20, 10, 5, 1), samples=(20, 50, 100, 500), error="l1"),
    "food": dict(keep=(20, 10, 5, 1), samples=(20, 50, 100, 500), error="l2"),
    "aircraft": dict(keep=(20, 10, 5, 1), samples=(20, 50, 100, 500), error="l2"),
    "cifar10": dict(keep=(5, 1), samples=(50, 500), error="l1"),
    "stl10": dict(keep=(5, 1), samples=(100, 500), error="l1"),
    "imagenet": dict(keep=(500, 50, 10, 1), samples=(50, 100, 500, 1000), error="l2"),
    "objectnet": dict(keep=(25, 10, 5, 1), samples=(50, 100, 500, 1000), error="l2"),
    # The embedded tiny model and the tests: seconds on a CPU.
    "tiny": dict(keep=(3, 1), samples=(4, 8), error="l2"),
}


@dataclasses.dataclass(frozen=True)
class DiCConfig:
  """What the classifier does; all but the last two fields change its results.

  Attributes:
    keep: classes kept after each stage; strictly decreasing, ends with 1.
    samples: (t, noise) samples per stage; strictly increasing, the last is S (with "eliminate": the budget, the
      most samples a class is scored on).
    error: "l2", "l1" or "huber".
    seed: noise seed (see scorer.py).
    strategy: "stages" (the DiC code's keep/samples schedule) or "eliminate" (elimination.py: rounds of shared
      samples; a class whose paired error difference to the leader is significantly positive drops out).
    confidence: "eliminate": the one-sided confidence of each drop (a paired t-test).
    round_samples: "eliminate": new samples per round.
    min_samples: "eliminate": samples a class is scored on before the first test.
    shortlist: 0, or decide among only the first m classes of each image's prior ranking (a cheaper classifier's,
      e.g. the CLIP-token head); the other classes follow in the prior's order.
    batch_size: UNet batch per device (one jitted call scores devices x batch_size items); bounds memory.
    images_per_call: images whose items share the jitted calls.
  """
  keep: tuple[int, ...] = (5, 1)
  samples: tuple[int, ...] = (25, 250)
  error: str = "l2"
  seed: int = 0
  strategy: str = "stages"
  confidence: float = 0.99
  round_samples: int = 5
  min_samples: int = 10
  shortlist: int = 0
  batch_size: int = 16
  images_per_call: int = 1

  def __post_init__(self):
    object.__setattr__(self, "keep", _int_tuple(self.keep, "keep"))
    object.__setattr__(self, "samples", _int_tuple(self.samples, "samples"))
    keep, samples = self.keep, self.samples
    where = f"DiC stages keep={keep} samples={samples}"
    if not keep or len(keep) != len(samples):
      raise ValueError(f"{where}: keep and samples need one entry per stage (same non-zero length)")
    if min(keep) < 1 or min(samples) < 1:
      raise ValueError(f"{where}: every keep and samples entry must be at least 1")
    if any(a <= b for a, b in zip(keep, keep[1:])):
      raise ValueError(f"{where}: keep must strictly decrease (each stage drops classes)")
    if any(a >= b for a, b in zip(samples, samples[1:])):
      raise ValueError(f"{where}: samples must strictly increase (each stage scores more samples)")
    if keep[-1] != 1:
      raise ValueError(f"{where}: the last stage must keep exactly 1 class (the prediction), not {keep[-1]}")
    if self.error not in ERRORS:
      raise ValueError(f"DiC error {self.error!r} is not one of {ERRORS}")
    if self.strategy not in STRATEGIES:
      raise ValueError(f"DiC strategy {self.strategy!r} is not one of {STRATEGIES}")
    if not 0.5 < self.confidence < 1:
      raise ValueError(f"DiC confidence={self.confidence}: use a value in (0.5, 1), e.g. 0.99")
    if self.round_samples < 1 or self.min_samples < 2:
      raise ValueError(f"DiC round_samples={self.round_samples} must be >= 1 and min_samples={self.min_samples} >= 2 "
                       "(a paired test needs two samples)")
    if self.shortlist < 0:
      raise ValueError(f"DiC shortlist={self.shortlist} must be 0 (all classes) or the number of classes to keep")
    if self.batch_size < 1 or self.images_per_call < 1:
      raise ValueError(f"batch_size ({self.batch_size}) and images_per_call ({self.images_per_call}) must be >= 1")

  @property
  def max_samples(self) -> int:
    return self.samples[-1]

  def check(self, num_train_timesteps: int | None = None, num_classes: int | None = None) -> None:
    """Raise ValueError if the stages don't fit the schedule or the class count."""
    if num_train_timesteps is not None and self.max_samples > num_train_timesteps:
      raise ValueError(f"DiC samples={self.samples}: at most num_train_timesteps={num_train_timesteps} samples "
                       "(one per timestep)")
    if self.strategy == "eliminate" and self.min_samples > self.max_samples:
      raise ValueError(f"DiC min_samples={self.min_samples} is more than the budget of {self.max_samples} samples "
                       "(samples[-1]): nothing would ever be tested; lower min_samples or raise samples")
    if num_classes is not None:
      if num_classes < 1:
        raise ValueError("no classes to choose from: the conditioning contexts are empty")
      if self.shortlist > num_classes:
        raise ValueError(f"DiC shortlist={self.shortlist} keeps more classes than the {num_classes} there are")
      if self.strategy == "stages" and self.keep[0] > num_classes:
        raise ValueError(f"DiC keep={self.keep} keeps {self.keep[0]} classes after the first stage but there are "
                         f"only {num_classes}; lower keep (e.g. preset('tiny') or keep=({num_classes - 1}, 1))")

  def settings(self) -> dict[str, Any]:
    """The fields that change results (for cache keys)."""
    out = dict(keep=list(self.keep), samples=list(self.samples), error=self.error, seed=self.seed)
    if self.strategy == "eliminate":  # the stage schedule is unused but its budget, samples[-1]
      out.update(strategy=self.strategy, confidence=self.confidence, round_samples=self.round_samples,
                 min_samples=self.min_samples)
    if self.shortlist:
      out.update(shortlist=self.shortlist)
    return out


def _int_tuple(values, name: str) -> tuple[int, ...]:
  values = (values,) if isinstance(values, (int, np.integer)) else tuple(values)
  if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
    raise ValueError(f"DiC {name}={values!r} must be integers")
  return tuple(int(v) for v in values)


def preset(name: str, **overrides) -> DiCConfig:
  """The DiC paper's stages for a dataset (see PRESETS), with field overrides."""
  if name not in PRESETS:
    raise ValueError(f"no DiC preset {name!r}; choose one of {sorted(PRESETS)}")
  return DiCConfig(**{**PRESETS[name], **overrides})
