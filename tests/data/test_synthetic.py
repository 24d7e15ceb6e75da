"""The synthetic large-K world: distinct classes, reproducible pixels, disjoint splits, free to enumerate."""

import numpy as np
import pytest

from mcti_jax.training import config_checks
from mcti_jax import data as D
from mcti_jax.config_files import load_config
from mcti_jax.data import synthetic
from mcti_jax.errors import ConfigError


def _pixels(labeled: D.LabeledImages) -> np.ndarray:
  return labeled.load(np.arange(len(labeled)), synthetic.SIZE).astype(np.float64)


def test_classes_are_far_apart_next_to_the_spread_of_their_images():
  k, n = 50, 20
  train = _pixels(D.from_synthetic(k, images_per_class=n)).reshape(k, n, -1)
  means = train.mean(axis=1)
  within = np.sqrt(((train - means[:, None]) ** 2).sum(-1)).mean()
  between = np.sqrt(((means[:, None] - means[None]) ** 2).sum(-1))[~np.eye(k, dtype=bool)]
  assert between.min() > within and np.median(between) > 3 * within
  test = D.from_synthetic(k, "test", images_per_class=n)
  nearest = np.argmin(((_pixels(test).reshape(k * n, 1, -1) - means[None]) ** 2).sum(-1), axis=1)
  assert (nearest == test.labels).mean() > 0.95  # a nearest-mean classifier tells the classes apart


def test_the_same_seed_gives_the_same_pixels_and_another_seed_others():
  a, b = D.from_synthetic(8, images_per_class=3), D.from_synthetic(8, images_per_class=3)
  np.testing.assert_array_equal(_pixels(a), _pixels(b))
  assert np.abs(_pixels(a) - _pixels(D.from_synthetic(8, images_per_class=3, seed=1))).mean() > 20
  # A class's images depend on neither K nor the number of images per class.
  np.testing.assert_array_equal(_pixels(D.from_synthetic(20, images_per_class=5))[:3 * 5].reshape(3, 5, -1)[:, :3],
                                _pixels(a)[:9].reshape(3, 3, -1))
  assert a.class_names[:2] == ("class0000", "class0001") and a.source == "synthetic:0:train"


def test_train_and_test_are_disjoint_draws():
  train, test = D.from_synthetic(10, "train", 6), D.from_synthetic(10, "test", 6)
  assert not set(train.ids) & set(test.ids) and train.source != test.source
  np.testing.assert_array_equal(train.labels, test.labels)
  a, b = _pixels(train).reshape(60, -1), _pixels(test).reshape(60, -1)
  assert np.abs(a[:, None] - b[None]).max(-1).min() > 0  # no test image equals a training image


def test_a_thousand_classes_enumerate_without_drawing_a_pixel(monkeypatch):
  def no_pixels(*args):
    raise AssertionError("a pixel was drawn")

  monkeypatch.setattr(synthetic, "render", no_pixels)
  labeled = D.from_synthetic(1000)
  few = D.sample_few_shot(labeled, 16, seed=0, resolution=16, load=False)
  assert len(labeled) == 20_000 and labeled.num_classes == 1000 and few.num_shots == 16


def test_a_50000_image_test_split_is_read_a_batch_at_a_time(monkeypatch):
  """Evaluation streams its test set: reading two batches of 64 draws 128 images, not 50,000."""
  drawn = []
  render = synthetic.render
  monkeypatch.setattr(synthetic, "render", lambda *a: drawn.append(a) or render(*a))
  test = D.from_synthetic(1000, "test", images_per_class=50)
  batches = test.batches(16, 64)
  for _ in range(2):
    images, labels, positions = next(batches)
    assert images.shape == (64, 16, 16, 3) and np.array_equal(labels, test.labels[positions])
  assert len(test) == 50_000 and len(drawn) == 128


def test_the_synthetic_preset_loads_with_k_from_the_config():
  _, config = load_config("mcti:synthetic")
  config_checks.check_train_config(config)
  assert config.data.source == "synthetic" and config.data.num_classes == 64 and config.data.class_names is None
  assert D.load_labeled(config.data, "train").num_classes == 64
  config.data.num_classes = 1024
  assert D.load_labeled(config.data, "test").num_classes == 1024
  config.data.num_classes = None
  with pytest.raises(ConfigError, match=r"data.num_classes=None; set it, e.g. --config.data.num_classes=1024"):
    D.load_labeled(config.data, "train")
  _, evaluation = load_config("eval:synthetic")
  assert evaluation.train.data.source == "synthetic"
