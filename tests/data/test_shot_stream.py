"""Shots that stream: read a chunk of classes at a time, encoded once per class, memory flat in K."""

import dataclasses
import os
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_train_config

from mcti_jax import data as D
from mcti_jax.training import runs
from mcti_jax.training import setup as setup_lib
from mcti_jax.data import cache
from mcti_jax.errors import ConfigError


class Recorder:
  """A jitted stand-in for VAE/CLIP that records the images it was given (batches of 8: the pad repeats the last)."""

  def __init__(self):
    self.images = []
    w = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)), jnp.float32)
    self._fn = jax.jit(lambda x: {"latents": jnp.tanh(x.astype(jnp.float32) / 255 @ w), "feature": x.mean((1, 2))})

  def __call__(self, images):
    self.images.append(np.array(images))
    return jax.device_get(self._fn(images))

  def seen(self) -> set[bytes]:
    return {image.tobytes() for batch in self.images for image in batch}


def _pixels_of(few: D.FewShot, rows) -> set[bytes]:
  return {image.tobytes() for image in few.load_classes(rows).reshape(-1, few.resolution, few.resolution, 3)}


def _lazy(k: int, resolution: int = 16, n_shots: int = 3, **kw) -> D.FewShot:
  return D.sample_few_shot(D.from_synthetic(k, images_per_class=6), n_shots, seed=0, resolution=resolution,
                           load=False, **kw)


def test_a_lazy_few_shot_reads_the_same_pixels_as_an_eager_one():
  labeled = D.from_synthetic(10, images_per_class=6)
  eager = D.sample_few_shot(labeled, 3, seed=2, resolution=24, class_indices=[7, 2, 5])
  lazy = D.sample_few_shot(labeled, 3, seed=2, resolution=24, class_indices=[7, 2, 5], load=False)
  assert lazy.pixels is None and "read on demand" in repr(lazy) and lazy.manifest() == eager.manifest()
  np.testing.assert_array_equal(lazy.shots, eager.shots)
  np.testing.assert_array_equal(lazy.load_classes([2, 0]), eager.shots[[2, 0]])
  assert [rows.tolist() for rows, _ in lazy.chunks(2)] == [[0, 1], [2]]
  np.testing.assert_array_equal(np.concatenate([p for _, p in lazy.chunks(2)]), eager.shots)


@pytest.mark.parametrize("flip, chunk, exact", [
    (True, 4, True),    # 4 classes x 3 shots x 2 = 24 images a chunk: the whole set's batches of 8 exactly
    (False, 3, False),  # 9 images a chunk: other batch boundaries and pads
])
def test_streamed_encodings_equal_the_whole_set_encoded_at_once(tmp_path, flip, chunk, exact):
  """With aligned chunks the jitted encoder sees the very batches of encode_cached, so the result is bit for bit the
  same; other boundaries put an image beside other neighbours and pads, which may move it by float rounding."""
  lazy = _lazy(10)
  whole = D.encode_cached(D.sample_few_shot(D.from_synthetic(10, images_per_class=6), 3, seed=0, resolution=16),
                          Recorder(), tmp_path / "whole", {"m": 1}, flip=flip)
  streamed = D.encode_by_class(lazy, Recorder(), tmp_path / "stream", {"m": 1}, flip=flip, chunk=chunk)
  assert streamed.keys() == whole.keys()
  for name in whole:
    assert streamed[name].shape == whole[name].shape and streamed[name].dtype == whole[name].dtype
    if exact:
      np.testing.assert_array_equal(streamed[name], whole[name])
    else:
      np.testing.assert_allclose(streamed[name], whole[name], rtol=1e-6, atol=1e-6)
  assert len(os.listdir(tmp_path / "stream" / "classes")) == 10  # one entry per class


def test_a_run_with_more_classes_encodes_only_the_new_ones(tmp_path):
  first = Recorder()
  old = D.encode_by_class(_lazy(6), first, tmp_path, {"m": 1}, chunk=4)
  more = Recorder()
  new = D.encode_by_class(_lazy(9), more, tmp_path, {"m": 1}, chunk=4)
  assert more.seen() == _pixels_of(_lazy(9), [6, 7, 8])  # 9 images: 2 batches (the pad repeats the last)
  assert len(more.images) == 2
  for name in old:
    np.testing.assert_array_equal(new[name][:6], old[name])
  again = Recorder()
  for name, value in D.encode_by_class(_lazy(9), again, tmp_path, {"m": 1}).items():
    np.testing.assert_array_equal(value, new[name])
  assert not again.images


def test_a_changed_image_re_encodes_its_class_only_and_the_stale_entry_is_never_read(tmp_path, monkeypatch):
  labeled = D.from_synthetic(5, images_per_class=6)
  few = D.sample_few_shot(labeled, 3, seed=0, resolution=16, load=False)
  D.encode_by_class(few, Recorder(), tmp_path, {"m": 1})
  digest = cache.class_digest({"m": 1}, False, few.shot_ids[2], few.load_classes([2])[0])
  stale = cache.class_cache_path(tmp_path, digest)
  assert os.path.exists(stale)
  changed = int(few.shot_positions[2, 1])
  read = labeled.read_fn
  edited = D.LabeledImages(labeled.class_names, labeled.items, labeled.ids, labeled.labels, source=labeled.source,
                           read_fn=lambda items: [255 - x if item == labeled.items[changed] else x
                                                  for item, x in zip(items, read(items))])
  few = D.sample_few_shot(edited, 3, seed=0, resolution=16, load=False)
  loaded = []
  load = cache._load
  monkeypatch.setattr(cache, "_load", lambda path: loaded.append(path) or load(path))
  enc = Recorder()
  out = D.encode_by_class(few, enc, tmp_path, {"m": 1})
  assert enc.seen() == _pixels_of(few, [2]) and stale not in loaded and len(loaded) == 4
  np.testing.assert_array_equal(out["feature"][2, 1], few.load_classes([2])[0, 1].mean((0, 1)))
  enc = Recorder()  # another key: every class again
  D.encode_by_class(few, enc, tmp_path, {"m": 2})
  assert enc.seen() == _pixels_of(few, range(5))


def test_an_encoder_crash_keeps_the_finished_chunks_and_no_partial_file(tmp_path):
  few, calls = _lazy(8), []

  def crash_in_the_third_chunk(images):
    calls.append(1)
    if len(calls) == 3:  # 2 classes x 3 shots = 6 images a chunk: one call each
      raise RuntimeError("encoder crashed")
    return _encode_means(images)

  with pytest.raises(RuntimeError, match="encoder crashed"):
    D.encode_by_class(few, crash_in_the_third_chunk, tmp_path, {"m": 1}, chunk=2)
  assert len(os.listdir(tmp_path / "classes")) == 4 and not [p for p in os.listdir(tmp_path) if p.startswith(".")]
  enc = Recorder()
  D.encode_by_class(few, enc, tmp_path, {"m": 1}, chunk=2)
  assert enc.seen() == _pixels_of(few, range(4, 8))


def test_digests_given_up_front_skip_reading_the_cached_classes(tmp_path):
  few = _lazy(6)
  D.encode_by_class(few, Recorder(), tmp_path, {"m": 1})
  digests = [cache.class_digest({"m": 1}, False, ids, pixels) for ids, pixels in zip(few.shot_ids, few.shots)]
  reads = []
  read = few.images.read_fn
  spy = D.LabeledImages(few.images.class_names, few.images.items, few.images.ids, few.images.labels,
                        read_fn=lambda items: reads.append(len(items)) or read(items), source=few.images.source)
  D.encode_by_class(dataclasses.replace(few, images=spy), Recorder(), tmp_path, {"m": 1}, digests=digests)
  assert reads == []


def test_the_trainers_shot_digests_are_runs_shot_digests_over_the_whole_array(monkeypatch):
  few = _lazy(10, resolution=20)
  monkeypatch.setattr(D.labeled, "SHOT_CHUNK", 3)  # several chunks and a short one
  key = {"sd": "x", "source": few.source}
  digests, cache_digests = setup_lib._hash_shots(few, key, flip=True)
  np.testing.assert_array_equal(digests, runs.shot_digests(few.class_names, few.shot_ids, few.shots))
  assert cache_digests == [cache.class_digest(key, True, ids, p) for ids, p in zip(few.shot_ids, few.shots)]


def _encode_means(images):
  return {"feature": images.mean((1, 2), dtype=np.float32)}


def _peak(fn) -> int:
  tracemalloc.start()
  try:
    fn()
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def _stream(k: int, chunk: int, cache_dir) -> None:
  """Hash and encode (with flips) the shots of K synthetic classes at 64 px, as the trainer does, `chunk` at a time."""
  few = _lazy(k, resolution=64, n_shots=4)
  for rows, pixels in few.chunks(chunk):
    runs.shot_digests([few.class_names[r] for r in rows], [few.shot_ids[r] for r in rows], pixels)
  D.encode_by_class(few, _encode_means, cache_dir, {"m": 1}, flip=True, chunk=chunk)


@pytest.mark.slow
def test_host_memory_is_bounded_by_the_chunk_not_by_k(tmp_path):
  """256 classes x 4 shots at 64 px are 12.6 MB of pixels; a chunk of 32 classes 1.6 MB (5 MB with its flips)."""
  small = _peak(lambda: _stream(32, 32, tmp_path / "32"))
  large = _peak(lambda: _stream(256, 32, tmp_path / "256"))
  assert large < 1.5 * small, (small, large)
  few = _lazy(256, resolution=64, n_shots=4)
  whole = _peak(lambda: D.encode_cached(few, _encode_means, tmp_path / "whole", {"m": 1}, flip=True))
  assert whole > 4 * large, (whole, large)  # every pixel at once, as before


@pytest.mark.slow
def test_prepare_encodes_only_the_classes_a_bigger_run_adds(tiny_checkpoint, tmp_path, monkeypatch):
  """The trainer on the synthetic world: rerun with more classes, only the new classes' shots reach the encoder."""
  counts = []
  make = setup_lib.make_encoder

  def counting(sd, clip):
    encode = make(sd, clip)
    counts.append(0)

    def call(images):
      counts[-1] += 1
      return encode(images)
    return call

  monkeypatch.setattr(setup_lib, "make_encoder", counting)
  fields = {"data.source": "synthetic", "data.class_names": None, "tokens.label_words": (), "data.n_shots": 4}
  first = setup_lib.prepare(tiny_train_config(tiny_checkpoint, tmp_path / "a", **fields, **{"data.num_classes": 6}),
                        log=lambda _: None)
  second = setup_lib.prepare(tiny_train_config(tiny_checkpoint, tmp_path / "b", **fields, **{"data.num_classes": 10}),
                         log=lambda _: None)
  assert counts == [3, 2]  # 6 x 4 shots in batches of 8, then the 4 new classes' 16
  assert second.shots.pixels is None and second.shots.num_classes == 10
  a, b = np.asarray(first.data.image_features), np.asarray(second.data.image_features)
  np.testing.assert_array_equal(b[:6], a[:6])
  assert first.signature["fingerprints"]["data"] != second.signature["fingerprints"]["data"]


def test_a_file_as_cache_dir_is_refused_before_the_models_load(tiny_checkpoint, tmp_path, monkeypatch):
  monkeypatch.setattr(setup_lib.pipeline, "load_stable_diffusion", lambda *a, **k: pytest.fail("models loaded"))
  (tmp_path / "cache").write_text("not a folder")
  config = tiny_train_config(tiny_checkpoint, tmp_path / "run", **{"data.cache_dir": str(tmp_path / "cache")})
  with pytest.raises(ConfigError, match=r"cache is a file, not a folder"):
    setup_lib.prepare(config, log=lambda _: None)
