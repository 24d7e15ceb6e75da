"""MC-TI + CoOp under CoOp's protocol, the zero-shot references, and MC-TI Table 1's grid and datasets (issue 29).

Small cells on the embedded tiny model (mcti_jax/assets/tiny): K = 4 classes, N = 3 shots, random tokens; no
training.
"""

import dataclasses
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mcti_jax import data as D
from mcti_jax.config_files import load_config
from mcti_jax.configs import eval as eval_config
from mcti_jax.configs import mcti
from mcti_jax.evaluation import evaluate, evaluators
from mcti_jax.evaluation.evaluators import cell as cell_lib
from mcti_jax.evaluation.evaluators import clip_zeroshot
from mcti_jax.evaluation.evaluators import coop as coop_eval
from mcti_jax.models import tokenizer as tokenizer_lib
from mcti_jax.runtime import parallel

K, N = 4, 3


@pytest.fixture(scope="module")
def tiny_cell():
  """A cell of the tiny model: random tokens [K, 1, 32], cached shot features, shot images and test features."""
  cfg = mcti.get_config("tiny")
  models = cell_lib.Models.load(cfg, K, log=lambda _: None)
  rng = np.random.default_rng(0)
  tokens = rng.normal(0, 0.1, (K, 1, 32)).astype(np.float32)
  shot_features = rng.normal(size=(K, N, 32)).astype(np.float32)
  test_features = rng.normal(size=(6, 32)).astype(np.float32)
  pixels = rng.integers(0, 256, (K, N, 16, 16, 3), dtype=np.uint8)
  shots = D.FewShot(class_names=("a_b", "c", "d", "e"), class_indices=np.arange(K, dtype=np.int32),
                    shot_ids=tuple(tuple(f"{k}/{n}" for n in range(N)) for k in range(K)),
                    shot_positions=np.arange(K * N).reshape(K, N), seed=1, source="test", resolution=16, pixels=pixels)
  result = types.SimpleNamespace(tokens={"mcti": tokens}, vector_counts=None, shot_features=shot_features,
                                 class_names=("a_b", "c", "d", "e"), num_classes=K, shots=shots)
  test = types.SimpleNamespace(labels=np.arange(6) % K)
  return cell_lib.Cell(models, result, cfg, test, test_features, None, N, 1)


# ------------------------------------------------------------------ CoOp's schedule


def test_coop_lr_is_the_cosine_by_hand_after_one_warmup_epoch():
  lr, epochs, per_epoch = 2e-3, 200, 3
  at = coop_eval.schedule(lr, epochs, per_epoch, warmup_epochs=1, warmup_lr=1e-5)
  cosine = lambda e: 0.5 * lr * (1 + math.cos(math.pi * (e - 1) / epochs))  # noqa: E731  epoch e >= 1
  expected = {0: 1e-5, 1: 1e-5, 2: 1e-5,  # epoch 0: the constant warm-up
              3: lr, 5: lr,  # epoch 1: the cosine's start
              6: cosine(2), 3 * 101: cosine(101), 3 * 101 + 2: cosine(101), 3 * 199 + 2: cosine(199)}
  for step, want in expected.items():
    assert float(at(step)) == pytest.approx(want, rel=1e-6, abs=1e-10), step  # float32: 1 + cos(~pi)
  assert cosine(101) == pytest.approx(lr / 2)


def test_coop_batches_are_dasslss_drop_last_batches():
  assert coop_eval.batches_per_epoch(50, 32) == (32, 1)  # tiny: 10 classes x 5 shots
  assert coop_eval.batches_per_epoch(592, 32) == (32, 18)  # pets, 16 shots
  assert coop_eval.batches_per_epoch(10, 32) == (10, 1)  # fewer than a batch: one batch of all


def test_coop_optimiser_is_torch_sgd_with_momentum_and_weight_decay():
  """Three steps of the evaluator's optimiser equal torch.optim.SGD's update, written out in numpy."""
  lr, mu, wd = 2e-3, 0.9, 5e-4
  at = coop_eval.schedule(lr, 200, 1)
  opt = optax.chain(optax.add_decayed_weights(wd), optax.sgd(at, momentum=mu))
  rng = np.random.default_rng(0)
  p = rng.normal(size=(4, 3)).astype(np.float32)
  grads = rng.normal(size=(3, 4, 3)).astype(np.float32)
  params, state = jnp.asarray(p), opt.init(jnp.asarray(p))
  want, buf = p.astype(np.float64), None
  for t in range(3):
    updates, state = opt.update(jnp.asarray(grads[t]), state, params)
    params = optax.apply_updates(params, updates)
    d = grads[t] + wd * want  # torch: d_p = grad + weight_decay * p; buf = mu * buf + d_p (buf = d_p at first)
    buf = d if buf is None else mu * buf + d
    want = want - float(at(t)) * buf
  np.testing.assert_allclose(np.asarray(params), want, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ CoOp's augmentation


def _torchvision_crop_box(rng, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision.transforms.RandomResizedCrop.get_params, with numpy's generator for torch's."""
  for _ in range(10):
    target = height * width * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
  return 0, 0, height, width  # this test's image aspect lies inside `ratio`


def test_random_resized_crop_draws_boxes_as_torchvision():
  """The same distribution as torchvision's (its area and aspect statistics), inside the image."""
  draw = jax.jit(jax.vmap(lambda k: jnp.stack(coop_eval.crop_box(k, 512, 384))))
  boxes = np.asarray(draw(jax.random.split(jax.random.PRNGKey(0), 3000)))
  rng = np.random.default_rng(0)
  ref = np.asarray([_torchvision_crop_box(rng, 512, 384) for _ in range(3000)])
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (top + h <= 512).all() and (left + w <= 384).all()
  stats = lambda b: (b[:, 2] * b[:, 3] / (512 * 384), b[:, 3] / b[:, 2])  # noqa: E731  area fraction, aspect
  (area, aspect), (ref_area, ref_aspect) = stats(boxes), stats(ref)
  assert area.min() > 0.079 and area.max() <= 1.0 and aspect.min() > 0.74 and aspect.max() < 1.34
  assert area.mean() == pytest.approx(ref_area.mean(), abs=0.015)  # standard error ~0.005
  assert np.median(area) == pytest.approx(np.median(ref_area), abs=0.025)
  assert aspect.mean() == pytest.approx(ref_aspect.mean(), abs=0.01)
  assert (top / (512 - h + 1)).mean() == pytest.approx(0.5, abs=0.02)  # uniform positions
  assert len({tuple(b) for b in boxes}) > 2900


def test_augmentation_without_crop_or_flip_is_the_identity_and_a_flip_mirrors():
  image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  keys = jax.random.split(jax.random.PRNGKey(0), 8)
  run = jax.jit(jax.vmap(lambda k, flip: coop_eval.augment(k, jnp.asarray(image), 16, (1.0, 1.0), flip),
                         in_axes=(0, None)), static_argnums=1)
  np.testing.assert_allclose(np.asarray(run(keys, False)), np.broadcast_to(image / 255.0, (8, 16, 16, 3)), atol=1e-6)
  outs = np.asarray(run(keys, True))
  mirrored = [np.allclose(o, image[:, ::-1] / 255.0, atol=1e-6) for o in outs]
  assert all(m or np.allclose(o, image / 255.0, atol=1e-6) for m, o in zip(mirrored, outs))
  assert 0 < sum(mirrored) < 8


def test_augmentation_is_seeded_and_the_same_on_1_and_8_devices():
  """The same crops and flips, image by image, however the batch is sharded or ordered; the same pixels up to
  float rounding (XLA vectorises the resampling differently for 16 and 2 images per device)."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  images = np.random.default_rng(1).integers(0, 256, (16, 24, 24, 3), dtype=np.uint8)
  indices = np.arange(100, 116, dtype=np.int32)
  pixels = jax.jit(lambda key, e, x, i: coop_eval.augment_batch(key, e, x, i, 16))
  draws = jax.jit(lambda key, e, i: jax.vmap(lambda k: coop_eval.draw(k, 24, 24))(coop_eval.image_keys(key, e, i)))

  def on(devices, key=jax.random.PRNGKey(3), epoch=7):
    sharding = parallel.class_sharding(parallel.make_mesh(devices))
    x, i = jax.device_put(images, sharding), jax.device_put(indices, sharding)
    return np.asarray(draws(key, epoch, i)), np.asarray(pixels(key, epoch, x, i))

  (d1, p1), (d8, p8) = on(1), on(8)
  np.testing.assert_array_equal(d1, d8)
  np.testing.assert_allclose(p1, p8, atol=1e-6)
  np.testing.assert_array_equal(on(1)[1], p1)  # seeded
  assert 0 < d1[:, 4].sum() < 16 and len({tuple(d) for d in d1[:, :4]}) == 16
  assert not (on(1, epoch=8)[0] == d1).all() and not (on(1, key=jax.random.PRNGKey(4))[0] == d1).all()
  reversed_draws = np.asarray(draws(jax.random.PRNGKey(3), 7, indices[::-1]))  # image i's draw is its own
  np.testing.assert_array_equal(reversed_draws[::-1], d1)


@pytest.mark.slow
def test_coop_protocol_learns_the_same_context_on_1_and_8_devices(tiny_cell):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  ev = coop_eval.Evaluator(epochs=3)  # 12 shots < 32: one batch of all per epoch
  results = {}
  for devices in (1, 8):
    cell = dataclasses.replace(tiny_cell, models=dataclasses.replace(tiny_cell.models,
                                                                     mesh=parallel.make_mesh(devices)))
    results[devices] = ev.run(cell, "mcti_coop")
  (s1, labels, info), (s8, _, _) = results[1], results[8]
  np.testing.assert_allclose(s1, s8, atol=1e-5)
  assert info["coop_steps"] == 3 and np.isfinite(info["coop_final_loss"]) and "SGD lr 0.002" in info["protocol"]
  assert s1.shape == (6, K) and (labels == np.arange(6) % K).all()


# ------------------------------------------------------------------ the cached path is the old evaluator


# The old `coop` evaluator's scores (AdamW, 5 full-batch steps on cached features) on `tiny_cell`, computed before
# CoOp's protocol became the default (same machine, 1 and 8 devices alike).
OLD_SCORES_5_STEPS = np.array([
    [0.16578344, 0.1790561, 0.11594757, 0.16714597],
    [-0.07813498, -0.079557, -0.07182696, -0.08494725],
    [-0.34665236, -0.32449183, -0.252317, -0.32791093],
    [-0.2747442, -0.26831788, -0.20972899, -0.27166232],
    [0.09387498, 0.09823845, 0.09338799, 0.10012972],
    [-0.07958061, -0.08586518, -0.0987612, -0.08710885]])


def test_cached_protocol_gives_the_old_evaluators_numbers(tiny_cell):
  scores, _, info = coop_eval.Evaluator(protocol="cached", steps=5).run(tiny_cell, "mcti_coop")
  np.testing.assert_allclose(scores, OLD_SCORES_5_STEPS, atol=2e-6)
  assert info["protocol"].startswith("cached features, 5 full-batch AdamW steps")


def test_an_unknown_protocol_is_refused():
  with pytest.raises(ValueError, match="protocol='coOp'.*coop, cached"):
    evaluators.make("mcti_coop", dict(type="coop", protocol="coOp"))


# ------------------------------------------------------------------ zero-shot references


def test_the_ensemble_text_feature_is_the_normalised_mean_of_normalised_template_features(tiny_cell, monkeypatch):
  clip, tokenizer = tiny_cell.models.clip, tiny_cell.models.sd.tokenizer
  names = ["zero", "one", "two"]
  templates = clip_zeroshot.IMAGENET_TEMPLATES[:5]
  got = clip_zeroshot.name_text_features(clip, tokenizer, names, templates)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  want = []
  for name in names:
    per_template = [np.asarray(clip.module.get_text_features(jnp.asarray(
        tokenizer_lib.encode(tokenizer, [t.format(name)]))))[0] for t in templates]
    want.append(unit(np.mean(unit(np.stack(per_template)), 0)))
  np.testing.assert_allclose(got, np.stack(want), atol=1e-5)
  monkeypatch.setattr(clip_zeroshot, "PROMPTS_PER_CALL", 10)  # 2 classes a call: chunked and padded, same features
  np.testing.assert_allclose(clip_zeroshot.name_text_features(clip, tokenizer, names, templates), got, atol=1e-6)


def test_zero_shot_rows_use_the_presets_template_or_clips_80_prompts(tiny_cell):
  assert len(clip_zeroshot.IMAGENET_TEMPLATES) == len(set(clip_zeroshot.IMAGENET_TEMPLATES)) == 80
  row = clip_zeroshot.Evaluator()
  assert row.templates(tiny_cell) == ("a photo of the digit {}",)  # the tiny preset's data.template
  assert clip_zeroshot.Evaluator(ensemble="imagenet80").templates(tiny_cell) == clip_zeroshot.IMAGENET_TEMPLATES
  assert clip_zeroshot.Evaluator(template="a {}").templates(tiny_cell) == ("a {}",)
  scores, _, info = row.run(tiny_cell, "clip_zeroshot")
  text = clip_zeroshot.name_text_features(tiny_cell.models.clip, tiny_cell.models.sd.tokenizer,
                                          ["a b", "c", "d", "e"], ("a photo of the digit {}",))  # "_" -> " "
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  np.testing.assert_allclose(scores, unit(tiny_cell.test_features) @ text.T, atol=1e-5)
  assert info == {"templates": "a photo of the digit {}"}
  c = eval_config.get_config("pets")
  assert c.evals.clip_zeroshot.template == "dataset" and c.evals.clip_zeroshot_ensemble.ensemble == "imagenet80"
  assert evaluators.make("x", c.evals.clip_zeroshot.to_dict()).templates(
      types.SimpleNamespace(train_config=c.train)) == ("a photo of {}, a type of pet.",)


# ------------------------------------------------------------------ MC-TI Table 1's grid and datasets


def test_the_default_grid_is_mc_tis_table_1():
  assert tuple(eval_config.get_config("pets").n_shots) == (1, 2, 4, 5, 8, 16)
  assert tuple(eval_config.get_config("tiny").n_shots) == (5,)
  coop_row = eval_config.get_config("pets").evals.mcti_coop
  assert (coop_row.protocol, coop_row.epochs, coop_row.batch_size, coop_row.lr, coop_row.flip) == (
      "coop", 200, 32, 2e-3, True)
  assert eval_config.get_config("imagenet").evals.mcti_coop.epochs == 50
  assert eval_config.get_config("tiny").evals.mcti_coop.flip is False  # digits are not mirror-symmetric
  for name, entry in evaluate.evals_of(eval_config.get_config("tiny")).items():
    evaluators.make(name, entry)


@pytest.mark.parametrize("preset, source, name, template, word", [
    ("cifar10", "tfds", "cifar10", "a photo of a {}.", "object"),
    ("stl10", "tfds", "stl10", "a photo of a {}.", "object"),
    ("ucf101", "split_file", "", "a photo of a person doing {}.", "action"),
])
def test_table_1_presets_load_without_data(preset, source, name, template, word):
  c = load_config(f"mcti:{preset}")[1]
  assert (c.data.source, c.data.name, c.data.template, c.tokens.init_word) == (source, name, template, word)
  assert (c.phase.mcti.alpha, c.phase.mcti.beta, c.phase.mcti.scale) == (1.0, 1.0, 10.0)  # MC-TI Sec. 4.1
  e = load_config(f"eval:{preset}")[1]
  assert e.train.data.template == template and tuple(e.n_shots) == (1, 2, 4, 5, 8, 16)


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("stl10", 10)])
def test_table_1_tfds_presets_name_builders_of_the_installed_tfds(name, classes, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  features = tfds.builder(name, data_dir=str(tmp_path)).info.features  # the registry's builder; no download
  assert "image" in features and features["label"].num_classes == classes
  assert list(tmp_path.iterdir()) == []
