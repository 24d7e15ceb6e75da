"""The Diffusion Classifier: error grid vs a loop and diffusers, adaptive stages, sharding, resume, bad input."""

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import max_abs_diff
from mcti_jax.runtime import parallel
from mcti_jax.classify import dic
from mcti_jax.models import init, schedule as schedule_lib, unet as unet_lib
from mcti_jax.tiny import checkpoints as tiny_checkpoints
from mcti_jax.models.frozen import freeze


def _noise(seed, image_index, sample_id, shape):
  """The documented noise rule, written out: normal(fold_in(fold_in(key(seed), image_index), sample_id))."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), image_index), sample_id)
  return np.asarray(jax.random.normal(key, shape, jnp.float32))


@pytest.fixture(scope="module")
def small():
  """A one-block random UNet (compiles in seconds) and SD's schedule, for the tests that don't need torch."""
  config = unet_lib.UNetConfig(sample_size=8, block_out_channels=(8,), layers_per_block=1,
                               down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                               attention_head_dim=4, norm_num_groups=4, cross_attention_dim=16)
  unet = freeze(init.create(lambda: unet_lib.UNet2DConditionModel(config, rngs=nnx.Rngs(0)), 3))
  schedule = schedule_lib.NoiseSchedule.from_config(tiny_checkpoints.scheduler_config())
  contexts = np.random.default_rng(1).normal(size=(3, 77, 16)).astype(np.float32)
  return unet, schedule, contexts


# ------------------------------------------------------------- error grid


def test_error_grid_equals_a_loop_and_diffusers(tiny_checkpoint):
  import diffusers
  import torch
  import torch.nn.functional as F

  folder = tiny_checkpoint / "sd"
  model = unet_lib.from_pretrained(folder, "unet")
  schedule = schedule_lib.from_pretrained(folder)
  rng = np.random.default_rng(0)
  contexts = rng.normal(size=(3, 77, model.config.cross_attention_dim)).astype(np.float32)
  x0 = rng.normal(size=(8, 8, 4)).astype(np.float32)
  cfg = dic.DiCConfig(keep=(2, 1), samples=(2, 4), seed=3, batch_size=2)
  image_index = 7
  grid = dic.error_grid(freeze(model), schedule, contexts, x0, image_index, cfg, parallel.make_mesh(8))

  ts = dic.timestep_grid(1000, 4)
  np.testing.assert_array_equal(ts, [125, 375, 625, 875])  # T//S//2 + j*(T//S), the DiC code's grid
  one_pair = jax.jit(lambda u, x, t, c: u.module(x, t, c))
  frozen = freeze(model)
  torch_unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
  torch_schedule = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler")
  abar = np.asarray(schedule.alphas_cumprod)
  loop = np.zeros((3, 4))
  noises = np.stack([_noise(3, image_index, j, x0.shape) for j in range(4)])  # the same noise for every class
  for k in range(3):
    for j, t in enumerate(ts):
      x_t = np.sqrt(abar[t]) * x0 + np.sqrt(1 - abar[t]) * noises[j]
      prediction = one_pair(frozen, x_t[None], jnp.asarray([t]), contexts[k][None])
      loop[k, j] = np.mean((noises[j] - np.asarray(prediction[0])) ** 2)

  # diffusers on the same pairs, in one batch: class-major, then sample.
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, -3)))
  tt = torch.from_numpy(np.tile(ts, 3).astype(np.int64))
  noise = nchw(np.tile(noises, (3, 1, 1, 1)))
  with torch.no_grad():
    noisy = torch_schedule.add_noise(nchw(x0)[None].expand(12, -1, -1, -1), noise, tt)
    out = torch_unet(noisy, tt, encoder_hidden_states=torch.from_numpy(np.repeat(contexts, 4, axis=0))).sample
    reference = F.mse_loss(noise, out, reduction="none").mean(dim=(1, 2, 3)).numpy().reshape(3, 4)
  assert grid.shape == (3, 4)
  assert max_abs_diff(grid, loop) <= 1e-5
  assert max_abs_diff(grid, reference) <= 1e-4


def test_v_prediction_target_and_huber_error_equal_a_loop(small):
  import torch
  import torch.nn.functional as F

  unet, _, contexts = small
  schedule = schedule_lib.NoiseSchedule.from_config(
      dataclasses.replace(tiny_checkpoints.scheduler_config(), prediction_type="v_prediction"))
  x0 = np.random.default_rng(2).normal(size=(8, 8, 4)).astype(np.float32) * 2
  cfg = dic.DiCConfig(keep=(1,), samples=(3,), error="huber", seed=5, batch_size=4)
  grid = dic.error_grid(unet, schedule, contexts, x0, 4, cfg, parallel.make_mesh(1), sample_ids=[0, 2])
  one_pair = jax.jit(lambda u, x, t, c: u.module(x, t, c))
  abar = np.asarray(schedule.alphas_cumprod)
  ts = dic.timestep_grid(1000, 3)
  loop = np.zeros((3, 2))
  for k in range(3):
    for col, j in enumerate([0, 2]):
      t, noise = ts[j], _noise(5, 4, j, x0.shape)
      x_t = np.sqrt(abar[t]) * x0 + np.sqrt(1 - abar[t]) * noise
      v = np.sqrt(abar[t]) * noise - np.sqrt(1 - abar[t]) * x0
      prediction = np.array(one_pair(unet, x_t[None], jnp.asarray([t]), contexts[k][None])[0])
      loop[k, col] = F.huber_loss(torch.from_numpy(prediction), torch.from_numpy(v)).item()
  assert max_abs_diff(grid, loop) <= 1e-5


@pytest.mark.parametrize("kind", ["l2", "l1", "huber"])
def test_error_kinds_equal_torch_losses(kind):
  import torch
  import torch.nn.functional as F
  rng = np.random.default_rng(0)
  a, b = (rng.normal(0, 2, size=(5, 4, 4, 3)).astype(np.float32) for _ in range(2))
  torch_loss = {"l2": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss}[kind]
  expected = torch_loss(torch.from_numpy(a), torch.from_numpy(b), reduction="none").mean(dim=(1, 2, 3)).numpy()
  assert max_abs_diff(dic.prediction_errors(jnp.asarray(a), jnp.asarray(b), kind), expected) <= 1e-6


# ---------------------------------------------------------- adaptive stages


def _table():
  """Errors [2 images, 6 classes, 6 sample ids], made of dyadic numbers so means are exact.

  Class k has error a_k on ids {1, 4} (stage 1 of samples (2, 3, 6)), b_k on
  {3, 5} (new in stage 2) and c_k on {0, 2} (new in stage 3). Image 1 is
  image 0 with the classes reversed, so ties go the other way.
  """
  a = np.array([1.0, 0.5, 0.5, 0.75, 0.875, 0.625])
  b = np.array([0.0, 1.0, 0.25, 0.25, 0.0, 0.5])
  c = np.array([0.0, 0.0, 0.5, 0.25, 0.0, 0.0])
  image0 = np.stack([c, a, c, b, a, b], axis=1)  # columns = sample ids 0..5
  return np.stack([image0, image0[::-1]])


def test_stages_keep_the_right_classes_break_ties_by_index_and_reuse_samples():
  table = _table()
  plan = dic.make_plan(dic.DiCConfig(keep=(4, 2, 1), samples=(2, 3, 6)), 1000)
  calls = []

  def score(classes, ids):
    calls.append((classes.copy(), ids.copy()))
    return table[np.arange(2)[:, None, None], classes[:, :, None], ids]

  rankings = dic.run_stages(score, 2, 6, plan)
  # Sample ids of stages of 2, 3, 6 among S=6: [1, 4], then [1, 3, 5] less 1, then the rest.
  assert [list(ids) for _, ids in calls] == [[1, 4], [3, 5], [0, 2]]
  # Stage 1 (mean a): image 0 keeps 1, 2 (tied 0.5), 5, 3; image 1 (reversed) 3, 4 (tied), 0, 2.
  assert [set(c) for c in calls[0][0]] == [set(range(6))] * 2
  assert [set(c) for c in calls[1][0]] == [{1, 2, 5, 3}, {3, 4, 0, 2}]
  # Stage 2 (mean (a+b)/2): image 0: 2 (0.375), 3 (0.5) stay; 5 (0.5625), 1 (0.75) drop.
  assert [set(c) for c in calls[2][0]] == [{2, 3}, {2, 3}]
  # Stage 3: both survivors average 1.25/3: the lower index wins (2 in both images).
  assert [r.prediction for r in rankings] == [2, 2]
  np.testing.assert_array_equal(rankings[0].ranking, [2, 3, 5, 1, 4, 0])
  np.testing.assert_array_equal(rankings[1].ranking, [2, 3, 0, 4, 1, 5])
  np.testing.assert_array_equal(rankings[0].num_samples, [6, 6, 4, 4, 2, 2])
  np.testing.assert_allclose(rankings[0].mean_error, [1.25 / 3, 1.25 / 3, 0.5625, 0.75, 0.875, 1.0])
  assert dic.stage_calls(plan, 6) == sum(c.shape[1] * len(ids) for c, ids in calls) == 6 * 2 + 4 * 2 + 2 * 2


def test_preset_plans_compute_every_sample_once():
  imagenet = dic.make_plan(dic.preset("imagenet"), 1000)
  # DiC's grids for 50, 100, 500, 1000 of 1000 don't nest: 50 + 100 + (500 - 100) + the remaining 450.
  assert [len(n) for n in imagenet.new] == [50, 100, 400, 450]
  assert [len(s) for s in imagenet.scored] == [50, 150, 550, 1000]
  np.testing.assert_array_equal(np.sort(np.concatenate(imagenet.new)), np.arange(1000))
  pets = dic.make_plan(dic.preset("pets"), 1000)
  assert [len(n) for n in pets.new] == [25, 225]
  np.testing.assert_array_equal(pets.timesteps, 2 + 4 * np.arange(250))
  # UNet calls per image, by hand: pets at 37 classes, imagenet at 1000.
  assert dic.stage_calls(pets, 37) == 37 * 25 + 5 * 225 == 2050
  assert dic.stage_calls(imagenet, 1000) == 1000 * 50 + 500 * 100 + 50 * 400 + 10 * 450 == 124_500


# ---------------------------------------------------- sequential elimination


def test_sample_order_is_a_stratified_permutation():
  order = dic.sample_order(250)
  np.testing.assert_array_equal(np.sort(order), np.arange(250))
  for n in (2, 4, 8, 16, 32):  # every power-of-two prefix has one id in each of n equal bins of [0, 256)
    np.testing.assert_array_equal(np.sort(order[:n] * n // 256), np.arange(n))


def test_the_paired_test_drops_what_scipy_calls_significant():
  from scipy import stats
  rng = np.random.default_rng(0)
  errors = 1 + rng.normal(0, 0.3, (6, 12)) + np.array([0, 0.05, 0.1, 0.3, 0.6, 0.0])[:, None]
  classes = np.array([4, 1, 2, 0, 5, 3])
  for confidence in (0.9, 0.99):
    worse = dic.significantly_worse(errors, classes, confidence)
    leader = np.argmin(errors.mean(1))
    for k in range(6):
      expected = k != leader and stats.ttest_rel(errors[k], errors[leader], alternative="greater").pvalue < 1 - confidence
      assert worse[k] == expected, (confidence, k)
    assert 0 < worse.sum() < 5  # the data decide some, not all
  tied = np.ones((2, 4))  # equal errors: the lower class index leads, nothing is worse
  np.testing.assert_array_equal(dic.significantly_worse(tied, np.array([7, 3]), 0.99), [False, False])


def _elimination_table():
  """Errors [2 images, 4 classes, 16 sample ids]. Image 0: class 2 is clearly best, class 0 clearly worst after
  4 samples, class 1 and 3 only slightly worse than 2 (with noise). Image 1: every class equal but for noise."""
  rng = np.random.default_rng(5)
  noise = rng.normal(0, 0.02, (2, 4, 16))
  image0 = np.array([2.0, 1.05, 1.0, 1.3])[:, None] + noise[0]
  image1 = np.ones((4, 1)) + noise[1]
  return np.stack([image0, image1])


def test_elimination_asks_each_item_once_and_stops_when_one_class_is_left():
  table = _elimination_table()
  asked = []

  def score(rows, classes, ids):
    asked.extend(zip(rows.tolist(), classes.tolist(), ids.tolist()))
    return table[rows, classes, ids]

  cfg = dic.DiCConfig(keep=(1,), samples=(16,), strategy="eliminate", confidence=0.99, round_samples=2,
                      min_samples=4)
  rankings = dic.run_elimination(score, np.tile(np.arange(4), (2, 1)), cfg)
  assert len(asked) == len(set(asked))  # no item twice
  order = dic.sample_order(16)
  for image, ranking in enumerate(rankings):  # replay the rule by hand from the table
    alive, dropped, n = [0, 1, 2, 3], [], 0
    while len(alive) > 1 and n < 16:
      n += 2
      if n < 4:
        continue
      e = table[image][np.ix_(alive, order[:n])]
      worse = dic.significantly_worse(e, np.array(alive), 0.99)
      dropped = [(n, k, e[i].mean()) for i, k in enumerate(alive) if worse[i]] + dropped
      alive = [k for i, k in enumerate(alive) if not worse[i]]
    means = table[image][np.ix_(alive, order[:n])].mean(1)
    survivors = [alive[i] for i in np.lexsort((alive, means))]
    dropped.sort(key=lambda d: (-d[0], d[2]))
    assert list(ranking.ranking) == survivors + [k for _, k, _ in dropped]
    assert list(ranking.num_samples) == [n] * len(survivors) + [m for m, _, _ in dropped]
    assert sum(1 for r, _, _ in asked if r == image) == sum(ranking.num_samples)  # only what was needed
  assert rankings[0].prediction == 2 and rankings[0].num_samples[0] < 16  # decided early
  assert rankings[1].num_samples[0] == 16  # a tie runs the whole budget


def test_elimination_and_shortlist_on_the_unet_equal_the_rules_on_its_error_table(small):
  unet, schedule, contexts = small
  x0 = np.random.default_rng(6).normal(size=(2, 8, 8, 4)).astype(np.float32)
  mesh = parallel.make_mesh(8)
  cfg = dic.DiCConfig(keep=(1,), samples=(8,), strategy="eliminate", confidence=0.9, round_samples=2, min_samples=2,
                      batch_size=1, images_per_call=2)
  table = np.stack([dic.error_grid(unet, schedule, contexts, x, i, cfg, mesh) for x, i in zip(x0, [20, 21])])
  from_table = lambda rows, classes, ids: table[rows, classes, ids]  # noqa: E731
  expected = dic.run_elimination(from_table, np.tile(np.arange(3), (2, 1)), cfg)
  programs = dic.scorer._score_items._cache_size()
  got = dic.classify(unet, schedule, contexts, x0, [20, 21], cfg, mesh)
  for e, g in zip(expected, got):
    assert g.ranking == e.ranking.tolist() and g.num_samples == e.num_samples.tolist()
    assert max_abs_diff(g.mean_error, e.mean_error) <= 1e-5

  # A shortlist of 2 from a prior ranking: stages among those two, the third class last, unscored.
  prior = np.array([[2, 0, 1], [1, 2, 0]])
  stages = dataclasses.replace(cfg, strategy="stages", keep=(2, 1), samples=(2, 8), shortlist=2)
  expected = dic.run_stages(lambda c, ids: table[np.arange(2)[:, None, None], c[:, :, None], ids], 2, 3,
                            dic.make_plan(stages, 1000), prior[:, :2])
  got = dic.classify(unet, schedule, contexts, x0, [20, 21], stages, mesh, prior=prior)
  for e, g, p in zip(expected, got, prior):
    assert g.ranking == e.ranking.tolist() + [int(p[2])] and g.num_samples == e.num_samples.tolist() + [0]
  with pytest.raises(ValueError, match="needs prior"):
    dic.classify(unet, schedule, contexts, x0, [20, 21], stages, mesh)
  # Rounds of every size and both stages ran one compiled program (none if another test compiled it).
  assert dic.scorer._score_items._cache_size() - programs <= 1


# ------------------------------------------------------- large class sets


class _TableScorer:
  """A stand-in for dic.Scorer: errors from a table [images, K, S] by dataset index; counts the items asked for."""

  def __init__(self, table):
    self.table, self.asked = table, 0

  def set_images(self, x0, image_indices, num_real=None):
    self.x0, self.images = np.asarray(x0), np.asarray(image_indices)

  def flat(self, rows, classes, ids):
    self.asked += len(rows)
    return self.table[self.images[rows], classes, ids]

  def __call__(self, classes, ids):
    rows, classes_, ids_ = np.broadcast_arrays(np.arange(len(classes))[:, None, None], classes[:, :, None], ids)
    return self.flat(rows.ravel(), classes_.ravel(), ids_.ravel()).reshape(*classes.shape, len(ids))


def test_auto_picks_the_heads_shortlist_and_elimination_from_large_k_and_explicit_settings_win():
  from mcti_jax.evaluation.evaluators.dic import LARGE_K_SHORTLIST, Evaluator
  pick = lambda K, **kw: (lambda c: (c.strategy, c.shortlist))(Evaluator(large_k=50, **kw).config(K))  # noqa: E731
  assert pick(20) == pick(49) == ("stages", 0)  # the preset's stages over every class
  assert pick(50) == pick(1000) == ("eliminate", LARGE_K_SHORTLIST) == ("eliminate", 5)
  assert pick(1000, shortlist=0) == ("eliminate", 0)  # explicit: every class (not bounded)
  assert pick(1000, strategy="stages") == ("stages", 5)
  assert pick(1000, strategy="stages", shortlist=0) == ("stages", 0)
  assert pick(20, shortlist=3) == ("stages", 3) and pick(20, strategy="eliminate") == ("eliminate", 0)
  assert Evaluator(large_k=3).config(4).shortlist == 4  # never more than there are
  # The tiny preset's budget (8) is under the default min_samples (10): auto tests from 4, in rounds of 2.
  tiny = Evaluator(preset="tiny", large_k=3).config(10)
  assert (tiny.min_samples, tiny.round_samples, tiny.max_samples) == (4, 2, 8)
  assert Evaluator().config(10).settings() == dic.preset("pets").settings()  # small K: as before
  for bad in (dict(strategy="fast"), dict(shortlist=-1), dict(shortlist="top5"), dict(large_k=0),
              dict(large_k=float("nan"))):
    with pytest.raises(ValueError, match="dic "):
      Evaluator(**bad)


@pytest.mark.parametrize("spread", [0.0, 0.5])  # 0: every class ties, elimination runs the whole budget
def test_calls_per_image_at_large_k_are_bounded_by_the_shortlist_times_the_budget(spread):
  from mcti_jax.evaluation.evaluators.dic import Evaluator, calls_info
  schedule = types.SimpleNamespace(num_train_timesteps=1000)
  rng = np.random.default_rng(7)
  per_image = {}
  for K in (20, 200, 2000):
    cfg = Evaluator(large_k=50).config(K)
    labels = rng.integers(0, K, 3)
    table = rng.normal(1.0, 0.1, (3, 1, 250)) + np.zeros((1, K, 1))  # shared per sample: a paired design
    table += spread * (np.arange(K)[None, :, None] != labels[:, None, None])  # the true class predicts best
    prior = np.stack([np.concatenate([[y], rng.permutation(np.delete(np.arange(K), y))]) for y in labels])
    scorer = _TableScorer(table)
    results = dic.classify(None, schedule, np.zeros((K, 1, 1)), np.zeros((3, 1, 1, 1)), [0, 1, 2], cfg, None,
                           labels=labels, scorer=scorer, prior=prior if cfg.shortlist else None)
    calls = [sum(r.num_samples) for r in results]
    assert sum(calls) == scorer.asked
    info = calls_info(cfg, K, results, "mcti")
    assert info["unet_calls_max"] == max(calls) <= info["unet_calls_bound"] == dic.max_calls(cfg, K)
    per_image[K] = (max(calls), info["unet_calls_bound"])
    assert all(r.correct for r in results) or spread == 0
  assert per_image[20] == (20 * 25 + 5 * 225,) * 2  # pets' stages on all 20 classes: exactly this many
  assert per_image[200][1] == per_image[2000][1] == 5 * 250  # head top 5 x the budget, whatever K
  if spread == 0:
    assert per_image[200][0] == per_image[2000][0] == 5 * 250  # ties: the bound is reached
  else:
    assert per_image[2000][0] < 5 * 250  # clear winners drop the rest early


# ------------------------------------------------------- sharding, batching


def test_eight_devices_and_batched_images_equal_one_device(small):
  unet, schedule, contexts = small
  x0 = np.random.default_rng(3).normal(size=(2, 8, 8, 4)).astype(np.float32)
  base = dict(keep=(2, 1), samples=(2, 4), batch_size=1)
  # Two images per call on one device; one per call on eight (the resume test reuses that program).
  one = dic.classify(unet, schedule, contexts, x0, [10, 11], dic.DiCConfig(**base, images_per_call=2),
                     parallel.make_mesh(1))
  eight = dic.classify(unet, schedule, contexts, x0, [10, 11], dic.DiCConfig(**base), parallel.make_mesh(8))
  for r1, r8 in zip(one, eight):
    assert (r1.id, r1.index, r1.ranking, r1.num_samples) == (r8.id, r8.index, r8.ranking, r8.num_samples)
    assert max_abs_diff(r1.mean_error, r8.mean_error) <= 1e-5


# ------------------------------------------------------------------- resume


def _encode(images):
  """A stand-in for the VAE: 16x16x3 uint8 -> 8x8x4 latents."""
  x = images.astype(np.float32).reshape(-1, 8, 2, 8, 2, 3).mean((2, 4)) / 64 - 2
  return np.concatenate([x, x[..., :1]], axis=-1)


def _batches(images, labels, size):
  for start in range(0, len(images), size):
    idx = np.arange(start, min(start + size, len(images)))
    yield images[idx], labels[idx], idx + 100


def test_resume_skips_scored_images_and_a_changed_setting_recomputes(small, tmp_path):
  unet, schedule, contexts = small
  images = np.random.default_rng(4).integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
  labels = np.array([0, 1, 2])
  mesh = parallel.make_mesh(8)
  cfg = dic.DiCConfig(keep=(2, 1), samples=(2, 4), batch_size=1)
  path = tmp_path / "dic.jsonl"
  cache = lambda c: dic.ResultCache(path, dic.settings_key(c, schedule, contexts, {"unet": "small"}))
  run = lambda u, c: dic.evaluate(u, schedule, contexts, _batches(images, labels, 2), c, encode=_encode, mesh=mesh,
                                  cache=cache(c), total=3, progress=False)

  first = run(unet, cfg)
  assert first.num_images == first.num_computed == 3
  assert first.unet_evals == 3 * (3 * 2 + 2 * 2)  # all classes x 2 samples, then 2 classes x 2 new samples
  assert [r.index for r in first.results] == [100, 101, 102]

  # A crash mid-write leaves a partial last line: it is dropped on reopening.
  with open(path, "a") as f:
    f.write('{"settings": "x", "id": "1')
  again = run(None, cfg)  # no UNet: everything must come from the cache
  assert again.num_computed == 0 and again.unet_evals == 0
  assert [r.ranking for r in again.results] == [r.ranking for r in first.results]
  assert again.accuracy == first.accuracy == sum(r.prediction == y for r, y in zip(first.results, labels)) / 3

  changed = run(unet, dic.DiCConfig(keep=(2, 1), samples=(2, 4), batch_size=1, seed=1))
  assert changed.num_computed == 3
  lines = path.read_text().splitlines()
  assert len(lines) == 6 and all(json.loads(line)["id"] for line in lines)
  with pytest.raises(ValueError, match="the UNet is needed"):
    run(None, dic.DiCConfig(keep=(2, 1), samples=(2, 4), error="l1"))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("keep, samples, match", [
    ((1, 2), (2, 4), "strictly decrease"),
    ((2, 1), (4, 4), "strictly increase"),
    ((3, 2), (2, 4), "exactly 1"),
    ((2, 1), (4,), "same non-zero length"),
    ((), (), "same non-zero length"),
    ((0,), (4,), "at least 1"),
    ((2.5, 1), (2, 4), "integers"),
])
def test_nonsense_stages_are_refused(keep, samples, match):
  with pytest.raises(ValueError, match=match):
    dic.DiCConfig(keep=keep, samples=samples)


def test_stages_that_dont_fit_the_problem_are_refused(small):
  unet, schedule, contexts = small
  with pytest.raises(ValueError, match="not one of"):
    dic.DiCConfig(keep=(1,), samples=(2,), error="l3")
  with pytest.raises(ValueError, match="only 3"):  # 3 classes
    dic.classify(unet, schedule, contexts, np.zeros((1, 8, 8, 4)), [0], dic.preset("pets"), parallel.make_mesh(1))
  with pytest.raises(ValueError, match="num_train_timesteps=1000"):
    dic.DiCConfig(keep=(1,), samples=(1001,)).check(1000, 3)
  with pytest.raises(ValueError, match="no DiC preset"):
    dic.preset("mnist")


def test_empty_split_and_bad_labels_are_refused(small, tmp_path):
  unet, schedule, contexts = small
  cfg = dic.preset("tiny", keep=(2, 1))
  kw = dict(encode=_encode, mesh=parallel.make_mesh(1), progress=False)
  with pytest.raises(ValueError, match="test split is empty"):
    dic.evaluate(unet, schedule, contexts, iter([]), cfg, **kw)
  images = np.zeros((1, 16, 16, 3), np.uint8)
  with pytest.raises(ValueError, match="outside the 3 classes"):
    dic.evaluate(unet, schedule, contexts, [(images, np.array([3]), np.array([0]))], cfg, **kw)
  bad = tmp_path / "bad.jsonl"
  bad.write_text("not json\n{}\n")
  with pytest.raises(ValueError, match="bad.jsonl:1"):
    dic.ResultCache(bad, "key")


# ------------------------------------------------------------------ inputs


def test_contexts_and_latents_equal_transformers_and_diffusers(tiny_checkpoint):
  import diffusers
  import torch
  import transformers

  from mcti_jax.tokens import conditioning, placeholders as tok
  from mcti_jax.models import clip, tokenizer as tokenizer_lib, vae as vae_lib

  folder = tiny_checkpoint / "sd"
  text_encoder = freeze(clip.text_from_pretrained(folder, "text_encoder"))
  tokenizer = tokenizer_lib.load_tokenizer(folder, "tokenizer")
  zero_shot = dic.class_contexts(text_encoder, tokenizer, class_names=["zero", "one"])
  torch_text = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
  ids = torch.from_numpy(tokenizer_lib.encode(tokenizer, ["a photo of a zero", "a photo of a one"]).astype(np.int64))
  with torch.no_grad():
    expected = torch_text(ids).last_hidden_state.numpy()
  assert zero_shot.shape == (2, 77, 32)
  assert max_abs_diff(zero_shot, expected) <= 1e-4

  # Learned tokens whose vectors are the words' own embeddings condition exactly as the words.
  table = np.asarray(text_encoder.module.text_model.embeddings.token_embedding.embedding[...])
  word_ids = [tokenizer_lib.encode(tokenizer, [w])[0, 1] for w in ("zero", "one")]
  few_tokenizer = tokenizer_lib.load_tokenizer(folder, "tokenizer")
  learned = conditioning.LearnedTokens(tok.add_class_tokens(few_tokenizer, 2, 1), table[word_ids][:, None],
                                       ("zero", "one"))
  few_shot = dic.class_contexts(text_encoder, few_tokenizer, learned=learned)
  assert max_abs_diff(few_shot, zero_shot) <= 1e-5
  with pytest.raises(ValueError, match="exactly one"):
    dic.class_contexts(text_encoder, tokenizer)

  images = np.random.default_rng(5).integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
  x0 = dic.latent_encoder(freeze(vae_lib.from_pretrained(folder, "vae")), parallel.make_mesh(1))(images)
  torch_vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval()
  pixels = torch.from_numpy(np.moveaxis(images, -1, 1).astype(np.float32) / 127.5 - 1)
  with torch.no_grad():
    mean = torch_vae.encode(pixels).latent_dist.mean.numpy() * torch_vae.config.scaling_factor
  assert max_abs_diff(x0, np.moveaxis(mean, 1, -1)) <= 1e-4
