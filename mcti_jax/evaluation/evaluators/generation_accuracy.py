"""Generation accuracy (DCT's Table 1): are the images a class token draws judged as its class by a classifier?

For every class k, G images from "a photo of a <cls-k>" (`template`) with a phase's tokens; a frozen classifier
(a guides spec, mcti_jax/guides/: the judge) scores them over all of its own C classes, and the row holds the
fraction of the K x G images whose class is the judge's top-1 (`gen_top1`) or among its top 5 (`gen_top5`).
Token k stands for the judge's class of the same name (`Classifier.index_of`, as DCT's `classifier.targets` names
its tokens), or for the judge's class `targets[k]` when given.

The SD baseline (`baseline=True`) is DCT's: "for our method and SD, the seed and textual context were held
constant, so the images correspond to each other, with the differences being due to the use of the token"
(Schwartz et al., Sec. 4). DCT's prompt is "A photo of a S_c <label>" and SD's "A photo of a <label>": the
class's name stays, the token goes. Here the token is replaced by `baseline_word`; by default the class's name
("a photo of a <cls-3>" -> "a photo of a three"), or nothing when the template already holds the name
("a photo of a {} {name}" -> "a photo of a three", exactly DCT's pair). Image g of class k starts from the same
noise in both (generated.py), and the baseline's top-1/top-5 go in `baseline_top1`/`baseline_top5`.

Top-k: the judge's classes are sorted by logit, ties to the lower index (as argmax), and an image is a hit when
its target is among the first min(k, C): with C <= 5 classes top-5 is 1.0 (every class is in it), as
metrics.classification_report. The judge sees the uint8 images (what a saved PNG holds).

  c.evals.gen_mcti = dict(type="generation_accuracy", tokens="mcti", classifier=dict(type="file", path=...))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcti_jax import guides
from mcti_jax.errors import ConfigError
from mcti_jax.evaluation.evaluators import generated

TOP_K = (1, 5)


def topk_hits(logits: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
  """bool [...]: is targets[...] among the min(k, C) highest of logits [..., C]? Ties go to the lower index."""
  logits = np.asarray(logits)
  order = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
  return (order == np.asarray(targets)[..., None]).any(-1)


def accuracy(logits: np.ndarray, targets: Sequence[int], prefix: str = "gen") -> dict[str, Any]:
  """logits [K, G, C] of class k's G images, targets [K] (class k's index among the C) -> the row's
  <prefix>_top1, <prefix>_top5 (over all K x G images) and <prefix>_top1_per_class [K]."""
  logits, targets = np.asarray(logits), np.asarray(targets)
  if logits.ndim != 3 or targets.shape != logits.shape[:1]:
    raise ValueError(f"need logits [K, G, C] and targets [K], got {logits.shape} and {targets.shape}")
  out: dict[str, Any] = {}
  for k in TOP_K:
    hits = topk_hits(logits, targets[:, None], k)  # [K, G]
    out[f"{prefix}_top{k}"] = float(hits.mean())
    if k == 1:
      out[f"{prefix}_top1_per_class"] = hits.mean(1).tolist()
  return out


def judge_targets(classifier, class_names: Sequence[str], targets: Sequence[int] | None, where: str) -> np.ndarray:
  """int32 [K]: each token class's index among the judge's classes, by name or from `targets`."""
  count = classifier.num_classes
  if targets is not None:
    t = np.asarray(targets)
    if t.shape != (len(class_names),) or not np.issubdtype(t.dtype, np.integer) or ((t < 0) | (t >= count)).any():
      raise ConfigError(f"{where}.targets={list(targets)!r}: give one index of the judge's {count} classes "
                        f"(0..{count - 1}) per token class, {len(class_names)} in all ({list(class_names)})")
    return t.astype(np.int32)
  position = {name: i for i, name in enumerate(classifier.class_names)}
  missing = [name for name in class_names if name not in position]
  if missing:
    shown = list(classifier.class_names[:12]) + (["..."] if count > 12 else [])
    raise ConfigError(f"{where}: the tokens' classes {missing} are not among the judge's classes {shown}; name the "
                      f"run's classes as the classifier does (data.class_names), or give {where}.targets: one judge "
                      f"class index per token class, {len(class_names)} in all")
  return np.asarray([position[name] for name in class_names], np.int32)


def load_judge(spec: Mapping[str, Any], class_names: Sequence[str], where: str):
  """The classifier of a guides spec; clip_zeroshot without class_names takes the run's."""
  spec = dict(spec)
  return guides.load(spec, class_names=class_names if spec.get("type") == "clip_zeroshot" else None, where=where)


@jax.jit
def _logits(classifier, images):
  return classifier(images).astype(jnp.float32)


def judge(classifier, images: np.ndarray) -> np.ndarray:
  """float32 logits [B, C] of uint8 images [B, H, W, 3]."""
  return np.asarray(_logits(classifier, jnp.asarray(images)))


def measure(sd, tokenizer, learned, classifier, targets: np.ndarray, settings: "Evaluator", guidance: float,
            mesh) -> dict[str, Any]:
  """The row: G images per class with `learned`'s tokens (and without, for the baseline), judged by `classifier`."""
  names = learned.class_names
  with_token, without = [], []
  for k, name in enumerate(names):
    images = generated.draw(sd, tokenizer, learned, generated.prompt(settings.template, k, name), settings, guidance,
                            mesh)
    with_token.append(judge(classifier, images))
    if settings.baseline:
      text = generated.prompt(settings.template, k, name, settings.baseline_text)
      without.append(judge(classifier, generated.draw(sd, tokenizer, None, text, settings, guidance, mesh)))
  row = accuracy(np.stack(with_token), targets, "gen")
  if settings.baseline:
    row.update(accuracy(np.stack(without), targets, "baseline"))
    row["baseline_prompt"] = generated.prompt(settings.template, 0, names[0], settings.baseline_text)
  return {**row, "prompt": generated.prompt(settings.template, 0, names[0]), "targets": targets.tolist(),
          "judge_classes": classifier.num_classes, **settings.drawn(guidance)}


@dataclasses.dataclass(frozen=True)
class Evaluator(generated.Settings):
  classifier: Any = None  # the judge: a guides spec, e.g. dict(type="file", path="mcti_jax/assets/tiny/guide_digits")
  targets: Any = None  # the judge's class of each token class; None: the class of the same name
  baseline: bool = True  # also the SD baseline: the same seeds and prompt, the token replaced by baseline_word
  baseline_word: str | None = None  # None: the class's name, or "" when the template holds "{name}" (see above)

  def __post_init__(self):
    super().__post_init__()
    spec = self.classifier
    if not isinstance(spec, Mapping) or spec.get("type") not in guides.TYPES:
      raise ConfigError(f"generation_accuracy evaluator: classifier={spec!r}; give the judge as a guides spec, e.g. "
                        "dict(type='file', path='mcti_jax/assets/tiny/guide_digits') (types: "
                        f"{', '.join(guides.TYPES)})")
    if not isinstance(self.baseline, bool):
      raise ConfigError(f"generation_accuracy evaluator: baseline={self.baseline!r} must be True or False")

  @property
  def baseline_text(self) -> str:
    """What replaces the token in the baseline's prompt."""
    if self.baseline_word is not None:
      return self.baseline_word
    return "" if "{name}" in self.template else "{name}"

  def run(self, cell, name: str) -> dict[str, Any]:
    learned, tokenizer = self.learned_tokens(cell, name)
    names = list(cell.result.class_names)
    classifier = load_judge(self.classifier, names, f"config.evals.{name}.classifier")
    targets = judge_targets(classifier, names, self.targets, f"config.evals.{name}")
    return measure(cell.models.sd, tokenizer, learned, classifier, targets, self, self.guidance_of(cell.train_config),
                   cell.models.mesh)
