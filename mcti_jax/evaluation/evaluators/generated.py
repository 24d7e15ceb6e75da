"""What the generation evaluators (generation_accuracy, clip_similarity) share: their drawing settings and prompts,
and class k's G images drawn from its prompt.

Noise: image g of every class starts from the noise of fold_in(key(seed), g), generate's rule with one class's
prompt per call. So a class's images don't depend on the device count, the batch size or which other classes are
drawn, and the prompt without the token (DCT's SD baseline) starts from the same G noises as the prompt with it:
the two images (k, g) differ by the token alone. One class's images are held at a time, whatever K.

Not an evaluator type itself (not in TYPES).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from mcti_jax.errors import ConfigError
from mcti_jax.generation import generate

DEFAULT_TEMPLATE = generate.CLASS_PROMPT  # "a photo of a {}": MC-TI's Table 2 and DCT's Table 1 prompt


@dataclasses.dataclass(frozen=True)
class Settings:
  """The drawing fields of a generation evaluator's config entry."""
  tokens: str = "mcti"  # whose tokens: a phase of the training run
  num_images: int = 8  # G, per class
  steps: int = 50  # DDIM steps
  guidance: float | None = None  # classifier-free guidance; None: the run's model.guidance (tiny: 2.0, SD: 7.5)
  seed: int = 0  # image g of every class starts from fold_in(key(seed), g)
  template: str = DEFAULT_TEMPLATE  # "{}": the class token; "{name}" (optional): the class's name
  batch_size: int = 64  # images per compiled program (rounded up to the device count); the images don't depend on it

  def __post_init__(self):
    kind = type(self).__module__.rsplit(".", 1)[-1]
    for field in ("num_images", "steps", "batch_size"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{kind} evaluator: {field}={value!r} must be a whole number >= 1")
    if self.guidance is not None and (isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float))
                                      or not math.isfinite(self.guidance)):
      raise ConfigError(f"{kind} evaluator: guidance={self.guidance!r} must be a number (<= 1: no guidance) or None "
                        "(the run's model.guidance)")
    if not isinstance(self.template, str) or self.template.replace("{name}", "").count("{}") != 1:
      raise ConfigError(f"{kind} evaluator: template={self.template!r} must hold exactly one '{{}}' where the class "
                        "token goes (and optionally '{name}', the class's name), e.g. 'a photo of a {}'")

  def drawn(self, guidance: float) -> dict:
    """How the row's images were drawn, for the row. Not "seed" nor "num_images": the harness's rows hold the cell's
    shot seed and test image count under those names."""
    return {"images_per_class": self.num_images, "steps": self.steps, "guidance": guidance,
            "generation_seed": self.seed}

  def guidance_of(self, train_config) -> float:
    return float(train_config.model.guidance if self.guidance is None else self.guidance)

  def learned_tokens(self, cell, name: str):
    """(LearnedTokens of the phase `tokens`, the tokenizer that knows them); a ConfigError for a phase not trained."""
    if self.tokens not in cell.result.tokens:
      raise ConfigError(f"config.evals.{name}.tokens={self.tokens!r}, but the run trained phases "
                        f"{sorted(cell.result.tokens)}; set tokens to one of them")
    return cell.learned_tokens(self.tokens)


def prompt(template: str, k: int, name: str, word: str | None = None) -> str:
  """Class k's prompt: `template` with its '{}' as the class token <cls-k>, or as `word` (no token: the baseline;
  '{name}' in it is the class's name), and its '{name}' as `name`. Runs of spaces collapse ("a photo of a  zero")."""
  token = f"<cls-{k}>" if word is None else word.replace("{name}", name)
  return " ".join(template.replace("{name}", name).replace("{}", token).split())


def draw(sd, tokenizer, learned, text: str, settings: Settings, guidance: float, mesh) -> np.ndarray:
  """uint8 images [G, H, W, 3] of one prompt; image g from fold_in(key(settings.seed), g). `learned` None: a prompt
  without class tokens."""
  sd = dataclasses.replace(sd, tokenizer=tokenizer)  # the one that knows the tokens' placeholders
  return generate.generate(sd, [text], learned=learned, num_images_per_prompt=settings.num_images,
                           steps=settings.steps, guidance=guidance, seed=settings.seed, mesh=mesh,
                           batch_size=settings.batch_size)
