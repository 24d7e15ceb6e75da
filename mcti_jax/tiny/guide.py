"""Two small frozen "guide" classifiers of the tiny world.

A guide is what Discriminative Class Tokens back-propagate through: a convnet
on 16x16 digits, in the `guides/file.py` format, trained here on the
pretraining half of ALL ten digits (random shifts of up to 2 px):

  guide_digits   the ten digits ("zero" ... "nine")
  guide_slant    the slant terciles ("leaning right", "upright", "leaning left") of captions.ATTRIBUTES,
                 cut at the terciles of the pretraining images

  python -m mcti_jax.tiny.guide [OUT_ROOT]   # default mcti_jax/assets/tiny; ~30 s on 2 CPU cores
  guides.load(dict(type="file", path=str(guide.DIGITS_GUIDE)))

Each folder also holds guide_card.json (held-out accuracy, seed, steps, date).
The judges of what DCT's tokens draw are in judges.py.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mcti_jax import data as D
from mcti_jax.guides import Classifier, Transform
from mcti_jax.guides import file as classifier_file
from mcti_jax.tiny import DEFAULT_OUT, trainer
from mcti_jax.tiny.captions import ATTRIBUTES, NAMES, attribute_levels, shape_measures
from mcti_jax.tiny.data import shift_images

DIGITS_GUIDE, SLANT_GUIDE = DEFAULT_OUT / "guide_digits", DEFAULT_OUT / "guide_slant"
CARD_NAME = "guide_card.json"
SLANT = 4  # the slant's column of shape_measures / ATTRIBUTES
SLANT_NAMES = (ATTRIBUTES[SLANT][1], "upright", ATTRIBUTES[SLANT][2])  # levels 0, 1, 2 (low slant leans right)
STEPS, BATCH_SIZE, LEARNING_RATE, MAX_SHIFT = 1500, 128, 3e-3, 2


def layers(num_classes: int) -> list[dict]:
  """conv16/2-relu-conv32/2-relu-flatten-dense: ~10k weights, 16 -> 8 -> 4 pixels.

  Strided convs, not max-pools: a pool's gradient reaches one pixel per
  window, and XLA computes it slowly on CPU (4x the whole step).
  """
  return [{"type": "conv", "name": "conv1", "features": 16, "kernel": 3, "stride": 2}, {"type": "relu"},
          {"type": "conv", "name": "conv2", "features": 32, "kernel": 3, "stride": 2}, {"type": "relu"},
          {"type": "flatten"}, {"type": "dense", "name": "fc", "features": num_classes}]


def _halves() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  images, labels = D.digits_images()
  return images, labels, D.digits_split(labels)


def slant_levels(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """0 / 1 / 2 (leaning right / upright / leaning left) of uint8 images, cut at the terciles of `reference`."""
  measure = lambda x: shape_measures(x)[:, SLANT:SLANT + 1]  # noqa: E731
  return attribute_levels(measure(images), measure(reference))[:, 0]


def input_transform(pretrain_images: np.ndarray) -> Transform:
  """Grey, 16x16 (larger images are resized and cropped), normalised by the pretraining images' statistics."""
  grey = pretrain_images.astype(np.float64).mean(-1) / 255.0
  return Transform(resize=16, crop=(16, 16), grayscale=True, mean=(round(float(grey.mean()), 4),),
                   std=(round(float(grey.std()), 4),))


def accuracy(classifier: Classifier, images: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 accuracy on uint8 images."""
  return float(np.mean(np.asarray(_logits(classifier, jnp.asarray(images))).argmax(-1) == labels))


_logits = jax.jit(lambda classifier, images: classifier(images))


def train(images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...], transform: Transform, seed: int = 0,
          steps: int = STEPS, progress: bool = False) -> tuple[Classifier, float]:
  """The `layers` convnet trained with cross-entropy on uint8 `images`, shifted at random; (classifier, seconds)."""
  key = jax.random.key(seed)
  classifier = classifier_file.init(layers(len(class_names)), class_names, transform, seed)
  images_f, labels_j = jnp.asarray(images, jnp.float32) / 255.0, jnp.asarray(labels)
  optimizer = trainer.optimizer(LEARNING_RATE, steps)

  def loss_fn(params, batch, key):
    x = shift_images(key, images_f[batch], MAX_SHIFT)
    logits = classifier.replace(params=params)(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels_j[batch]).mean()
    return loss, {"accuracy": jnp.mean(logits.argmax(-1) == labels_j[batch])}

  rng = np.random.default_rng(seed)
  batches = [rng.choice(len(images), BATCH_SIZE, replace=False) for _ in range(steps)]
  step = trainer.make_step(loss_fn, optimizer)
  params, _, seconds = trainer.train_loop(
      "guide", step, classifier.params, optimizer.init(classifier.params), steps,
      lambda s: (batches[s], jax.random.fold_in(key, s + 1)), log_every=100, progress=progress)
  return classifier.replace(params=params), seconds


def train_digit_guide(seed: int = 0, steps: int = STEPS, progress: bool = False) -> tuple[Classifier, dict]:
  """The ten-digit guide, trained on the pretraining half; (classifier, card with its held-out accuracy)."""
  images, labels, parts = _halves()
  pre, held = parts["pretrain"], parts["heldout"]
  classifier, seconds = train(images[pre], labels[pre], NAMES, input_transform(images[pre]), seed, steps, progress)
  return classifier, _card("the ten sklearn digits", classifier, images[held], labels[held], len(pre), seed, steps,
                           seconds)


def train_slant_guide(seed: int = 0, steps: int = STEPS, progress: bool = False) -> tuple[Classifier, dict]:
  """The slant-tercile guide, on the pretraining half of all ten digits; (classifier, card)."""
  images, labels, parts = _halves()
  pre, held = parts["pretrain"], parts["heldout"]
  levels = slant_levels(images, images[pre])
  classifier, seconds = train(images[pre], levels[pre], SLANT_NAMES, input_transform(images[pre]), seed, steps,
                              progress)
  cuts = np.quantile(shape_measures(images[pre])[:, SLANT], [1 / 3, 2 / 3])
  task = ("the slant terciles of all ten digits (captions.shape_measures[:, 4], cut at the terciles of the "
          f"pretraining half: {cuts[0]:.4f}, {cuts[1]:.4f})")
  return classifier, _card(task, classifier, images[held], levels[held], len(pre), seed, steps, seconds)


def _card(task: str, classifier: Classifier, held_images, held_labels, num_train: int, seed: int, steps: int,
          seconds: float) -> dict:
  return {"task": task, "class_names": list(classifier.class_names),
          "heldout_accuracy": accuracy(classifier, held_images, held_labels), "heldout_images": len(held_labels),
          "train": f"pretraining half of digits_split ({num_train} images), random shifts up to {MAX_SHIFT} px",
          "seed": seed, "steps": steps, "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE,
          "train_seconds": round(seconds, 1), "date": datetime.date.today().isoformat(),
          "made_by": "python -m mcti_jax.tiny.guide"}


def main(out_root: str | Path = DEFAULT_OUT, seed: int = 0, progress: bool = True) -> dict[str, dict]:
  """Train both guides and write <out_root>/guide_digits/ and <out_root>/guide_slant/ (each with its card)."""
  cards = {}
  for name, make in (("guide_digits", train_digit_guide), ("guide_slant", train_slant_guide)):
    classifier, card = make(seed, progress=progress)
    folder = Path(out_root) / name
    classifier_file.save(folder, classifier, info={"made_by": card["made_by"], "task": card["task"]},
                         extra_files={CARD_NAME: card})
    print(f"{folder}: held-out accuracy {100 * card['heldout_accuracy']:.1f}% ({card['train_seconds']} s)")
    cards[name] = card
  return cards


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT)
