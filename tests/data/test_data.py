"""The few-shot data layer on real photos (scikit-image samples), sklearn digits and a tiny tfds dataset."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from mcti_jax import data as D

# Class name -> the sample photo its images are cropped from (camera is greyscale, logo is RGBA).
PHOTOS = {"astronaut": skdata.astronaut, "cat": skdata.chelsea, "coffee": skdata.coffee,
          "camera": skdata.camera, "logo": skdata.logo}
PER_CLASS = {"astronaut": 6, "cat": 7, "coffee": 6, "camera": 6, "logo": 5}
RES = 32


def _variants(photo: np.ndarray, count: int, seed: int) -> list[np.ndarray]:
  """`count` different small crops of a photo (different sizes and aspect ratios)."""
  rng = np.random.default_rng(seed)
  h, w = photo.shape[:2]
  out = []
  for _ in range(count):
    ch, cw = rng.integers(h // 3, h // 2), rng.integers(w // 3, w // 2)
    top, left = rng.integers(0, h - ch), rng.integers(0, w - cw)
    crop = Image.fromarray(photo[top:top + ch, left:left + cw])
    out.append(np.asarray(crop.resize((cw // 4, ch // 4), Image.Resampling.BILINEAR)))
  return out


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory):
  """root/<class>/<i>.png|jpg, alternating formats; a README the loader must ignore."""
  root = tmp_path_factory.mktemp("photos")
  for c, (name, photo) in enumerate(PHOTOS.items()):
    os.makedirs(root / name)
    for i, img in enumerate(_variants(photo(), PER_CLASS[name], seed=c)):
      if i % 2 and img.ndim == 3 and img.shape[-1] == 4:
        img = img[..., :3]  # JPEG has no alpha
      Image.fromarray(img).save(root / name / f"{i:02d}.{'jpg' if i % 2 else 'png'}")
  (root / "cat" / "README.txt").write_text("not an image")
  return root


# ------------------------------------------------------------------ folder source and sampling


def test_folder_classes_sorted_and_labels(photo_root):
  labeled = D.from_folder(photo_root)
  assert labeled.class_names == tuple(sorted(PHOTOS))
  assert len(labeled) == sum(PER_CLASS.values())
  for c, name in enumerate(labeled.class_names):
    ids = [labeled.ids[i] for i in labeled.positions_of_class(c)]
    assert len(ids) == PER_CLASS[name]
    assert all(i.startswith(name + "/") for i in ids)
  assert labeled.labels.dtype == np.int32


def test_sampling_is_reproducible(photo_root):
  labeled = D.from_folder(photo_root)
  a = D.sample_few_shot(labeled, 2, seed=0, resolution=RES)
  b = D.sample_few_shot(labeled, 2, seed=0, resolution=RES)
  c = D.sample_few_shot(labeled, 2, seed=1, resolution=RES)
  assert a.shots.shape == (5, 2, RES, RES, 3) and a.shots.dtype == np.uint8
  assert a.shot_ids == b.shot_ids
  np.testing.assert_array_equal(a.shots, b.shots)
  assert a.shot_ids != c.shot_ids
  for c_idx, row in zip(a.class_indices, a.shot_ids):
    assert all(i.startswith(labeled.class_names[c_idx] + "/") for i in row)
    assert len(set(row)) == 2
  # The pixels are the preprocessed files.
  path = os.path.join(photo_root, a.shot_ids[0][1])
  np.testing.assert_array_equal(a.shots[0, 1], D.center_crop_resize(np.asarray(Image.open(path).convert("RGB")), RES))
  manifest = json.loads(json.dumps(a.manifest()))
  assert manifest["classes"][0]["shots"] == list(a.shot_ids[0])


def test_class_subset_gets_the_same_shots(photo_root):
  labeled = D.from_folder(photo_root)
  full = D.sample_few_shot(labeled, 3, seed=7, resolution=RES)
  part = D.sample_few_shot(labeled, 3, seed=7, class_indices=[3, 1], resolution=RES)
  assert part.class_names == (labeled.class_names[3], labeled.class_names[1])
  assert part.shot_ids == (full.shot_ids[3], full.shot_ids[1])
  np.testing.assert_array_equal(part.shots, full.shots[[3, 1]])


def test_remaining_is_the_rest_of_the_selected_classes(photo_root):
  labeled = D.from_folder(photo_root)
  few = D.sample_few_shot(labeled, 2, seed=3, class_indices=[0, 2], resolution=RES, with_remaining=True)
  rest = few.remaining
  shots = {i for row in few.shot_ids for i in row}
  assert not shots & set(rest.ids)
  expected = {labeled.ids[i] for c in (0, 2) for i in labeled.positions_of_class(c)}
  assert shots | set(rest.ids) == expected
  assert len(rest) == len(expected) - 4
  assert set(rest.labels.tolist()) == {0, 2}
  seen = 0
  for images, labels, positions in rest.batches(RES, batch_size=3):
    assert images.shape[1:] == (RES, RES, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, rest.labels[positions])
    seen += len(labels)
  assert seen == len(rest)
  shards = [rest.shard(i, 3) for i in range(3)]
  assert sorted(i for s in shards for i in s.ids) == sorted(rest.ids)


# ------------------------------------------------------------------ preprocessing


def test_center_crop_equals_numpy_crop():
  coffee, chelsea = skdata.coffee(), skdata.chelsea()  # 400x600, 300x451
  np.testing.assert_array_equal(D.center_crop_resize(coffee, 400), coffee[:, 100:500])
  np.testing.assert_array_equal(D.center_crop_resize(chelsea, 300), chelsea[:, 75:375])
  tall = np.ascontiguousarray(coffee.transpose(1, 0, 2))  # 600x400
  np.testing.assert_array_equal(D.center_crop_resize(tall, 400), tall[100:500])


def test_resize_output_shape_dtype_and_content():
  astronaut = skdata.astronaut()  # 512x512
  out = D.center_crop_resize(astronaut, 256)
  assert out.shape == (256, 256, 3) and out.dtype == np.uint8
  box = astronaut.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
  assert np.abs(out.astype(np.float64) - box).mean() < 3.0  # same picture, same orientation
  for interp in D.INTERPOLATIONS:
    assert D.center_crop_resize(skdata.coffee(), 48, interp).shape == (48, 48, 3)


def test_grey_and_rgba_become_rgb(tmp_path):
  camera = skdata.camera()
  out = D.center_crop_resize(camera, 512)
  assert out.shape == (512, 512, 3)
  for ch in range(3):
    np.testing.assert_array_equal(out[..., ch], camera)
  logo = skdata.logo()  # 500x500 RGBA
  np.testing.assert_array_equal(D.center_crop_resize(logo, 500), logo[..., :3])
  Image.fromarray(camera).save(tmp_path / "grey.png")
  Image.fromarray(logo).save(tmp_path / "rgba.png")
  np.testing.assert_array_equal(D.read_image(tmp_path / "grey.png"), np.stack([camera] * 3, -1))
  np.testing.assert_array_equal(D.read_image(tmp_path / "rgba.png"), logo[..., :3])


def test_16_bit_greyscale_is_scaled_to_8_bits_not_white(tmp_path):
  """A 16-bit PNG in a class folder reads as value >> 8, not 99.6% white (PIL's convert clips at 255)."""
  ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)  # every level, dark to light
  ramp[0, :4] = [255, 256, 32768, 65535]
  for name in ("deep", "flat"):
    os.makedirs(tmp_path / name)
  Image.fromarray(ramp).save(tmp_path / "deep" / "ramp.png")  # PIL mode I;16
  assert Image.open(tmp_path / "deep" / "ramp.png").mode == "I;16"
  Image.fromarray(skdata.camera()[:64, :64]).save(tmp_path / "flat" / "camera.png")
  labeled = D.from_folder(tmp_path)
  out = labeled.load(labeled.positions_of_class(0), resolution=64)[0]  # 64x64 already: no resize
  expected = (ramp // 256).astype(np.uint8)  # the high byte
  np.testing.assert_array_equal(out, np.stack([expected] * 3, -1))
  np.testing.assert_array_equal(out[0, :4, 0], [0, 1, 128, 255])
  assert (out == 255).mean() < 0.01 and out.mean() == pytest.approx(127.5, abs=1)
  # PIL reads a 16-bit PGM as 32-bit ints "I" (older Pillow did so for 16-bit PNGs too); a uint16 array from tfds.
  Image.fromarray(ramp).save(tmp_path / "ramp.pgm")
  assert Image.open(tmp_path / "ramp.pgm").mode == "I"
  np.testing.assert_array_equal(D.read_image(tmp_path / "ramp.pgm"), np.stack([expected] * 3, -1))
  np.testing.assert_array_equal(D.to_rgb(ramp), np.stack([expected] * 3, -1))


def test_float_and_32_bit_images_are_refused_naming_the_file(tmp_path):
  """Float or 32-bit pixels have no fixed range to map to 0..255: a clear error, not a guess."""
  os.makedirs(tmp_path / "a")
  for i in range(2):
    Image.fromarray(skdata.coffee()[:20, :20]).save(tmp_path / "a" / f"{i}.png")
  bad = {"2.tif": np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20),  # PIL mode F
         "3.tif": np.arange(400, dtype=np.int32).reshape(20, 20) * 1000}  # PIL mode I, 32-bit values
  for name, pixels in bad.items():
    Image.fromarray(pixels).save(tmp_path / "a" / name)
  labeled = D.from_folder(tmp_path)
  with pytest.raises(D.DataError, match=f"image file {tmp_path / 'a' / '2.tif'} holds 32-bit float pixels"):
    D.sample_few_shot(labeled, 4, seed=0, resolution=RES)
  for name, kind in (("2.tif", "float"), ("3.tif", "integer")):
    with pytest.raises(D.DataError, match=f"{tmp_path / 'a' / name} holds 32-bit {kind} pixels.*save it as an 8-bit"):
      D.read_image(tmp_path / "a" / name)


def test_model_range_and_flip():
  img = skdata.astronaut()[:40, :50]
  x = D.to_model_range(img)
  assert x.dtype == np.float32
  np.testing.assert_allclose(x, img.astype(np.float64) * (2.0 / 255.0) - 1.0, atol=1e-6)
  ends = D.to_model_range(np.array([0, 255], np.uint8))
  np.testing.assert_array_equal(ends, [-1.0, 1.0])
  flipped = D.flip_horizontal(img[None])[0]
  for j in range(50):
    np.testing.assert_array_equal(flipped[:, j], img[:, 49 - j])
  with pytest.raises(D.DataError, match="uint8"):
    D.to_model_range(x)


# ------------------------------------------------------------------ digits


def test_digits_split_is_disjoint_and_complete():
  from sklearn.datasets import load_digits
  ref = load_digits()
  images, labels = D.digits_images()
  assert images.shape == (1797, 16, 16, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, ref.target)
  hand = np.kron(ref.images[5], np.ones((2, 2))) * 255.0 / 16.0
  np.testing.assert_allclose(images[5, ..., 1], hand, atol=0.5)
  parts = D.digits_split(labels)
  both = np.concatenate([parts["pretrain"], parts["heldout"]])
  np.testing.assert_array_equal(np.sort(both), np.arange(1797))  # each image exactly once
  for d in range(10):
    n = int((labels == d).sum())
    assert int((labels[parts["pretrain"]] == d).sum()) == (n + 1) // 2
  again = D.digits_split(labels)
  np.testing.assert_array_equal(again["heldout"], parts["heldout"])


def test_digits_demo_flow():
  pre = D.from_digits("pretrain", digits=range(5))
  assert pre.class_names == ("0", "1", "2", "3", "4") and set(pre.labels.tolist()) == set(range(5))
  held = D.from_digits("heldout")
  assert not set(pre.ids) & set(held.ids)
  few = D.sample_few_shot(held, 4, seed=0, resolution=16, interpolation="nearest", with_remaining=True)
  assert few.shots.shape == (10, 4, 16, 16, 3)
  assert len(few.remaining) == len(held) - 40
  images, labels = D.digits_images()
  k = int(few.shot_ids[7][0][len("digits["):-1])
  np.testing.assert_array_equal(few.shots[7, 0], images[k])
  assert labels[k] == 7


# ------------------------------------------------------------------ explicit file lists and split files


def test_split_file_coop_style(photo_root, tmp_path):
  labeled = D.from_folder(photo_root)
  rows = [[labeled.ids[i], int(labeled.labels[i]), labeled.class_names[labeled.labels[i]]]
          for i in range(len(labeled))]
  split = {"train": rows[0::2], "test": rows[1::2]}
  split["test"] = [r for r in split["test"] if r[1] != 4]  # class 4 only in train: names still complete
  path = tmp_path / "split_pets.json"
  path.write_text(json.dumps(split))
  train = D.from_split_file(path, "train", photo_root)
  test = D.from_split_file(path, "test", photo_root)
  assert train.class_names == test.class_names == labeled.class_names
  assert list(test.ids) == [r[0] for r in split["test"]]
  np.testing.assert_array_equal(train.labels, [r[1] for r in split["train"]])
  few = D.sample_few_shot(train, 2, seed=0, resolution=RES)
  assert few.shots.shape == (5, 2, RES, RES, 3)


def test_file_lists_dict_and_json(photo_root, tmp_path):
  lists = {"cat": ["cat/00.png", "cat/01.jpg"], "astronaut": ["astronaut/02.png"]}
  labeled = D.from_file_lists(lists, root=photo_root)
  assert labeled.class_names == ("cat", "astronaut")
  np.testing.assert_array_equal(labeled.labels, [0, 0, 1])
  (tmp_path / "lists.json").write_text(json.dumps({k: [str(photo_root / f) for f in v] for k, v in lists.items()}))
  from_json = D.from_file_lists(tmp_path / "lists.json")
  np.testing.assert_array_equal(from_json.load([2], RES), labeled.load([2], RES))


# ------------------------------------------------------------------ cache


class CountingEncoder:
  """A stand-in for VAE/CLIP: 'latents' = 2x2 mean-pooled pixels, 'feature' = channel means."""

  def __init__(self, fail_after: int | None = None):
    self.calls, self.batch_sizes, self.fail_after = 0, [], fail_after

  def __call__(self, images):
    if self.fail_after is not None and self.calls >= self.fail_after:
      raise RuntimeError("encoder crashed")
    self.calls += 1
    self.batch_sizes.append(len(images))
    b, h, w, _ = images.shape
    x = images.astype(np.float32)
    return {"latents": x.reshape(b, h // 2, 2, w // 2, 2, 3).mean(axis=(2, 4)), "feature": x.mean(axis=(1, 2))}


@pytest.fixture(scope="module")
def few(photo_root):
  return D.sample_few_shot(D.from_folder(photo_root), 3, seed=0, resolution=8)


def test_cache_hit_and_miss(few, tmp_path):
  enc = CountingEncoder()
  key = {"model": "tiny", "resolution": 8}
  out = D.encode_cached(few, enc, tmp_path, key, batch_size=4)
  assert enc.calls == 4 and set(enc.batch_sizes) == {4}  # 15 shots -> 4 padded batches
  assert out["latents"].shape == (5, 3, 4, 4, 3) and out["feature"].shape == (5, 3, 3)
  np.testing.assert_allclose(out["feature"][2, 1], few.shots[2, 1].reshape(-1, 3).mean(0), rtol=1e-6)
  again = D.encode_cached(few, enc, tmp_path, dict(key))
  assert enc.calls == 4  # loaded, not encoded
  for name in out:
    np.testing.assert_array_equal(again[name], out[name])
  D.encode_cached(few, enc, tmp_path, {**key, "model": "other"}, batch_size=4)
  assert enc.calls == 8  # changed key -> encoded again
  assert len([f for f in os.listdir(tmp_path) if f.endswith(".npz")]) == 2


def test_cache_flip_encodes_both_orientations(few, tmp_path):
  enc = CountingEncoder()
  out = D.encode_cached(few, enc, tmp_path, {"m": 1}, flip=True, batch_size=8)
  assert out["latents"].shape == (5, 3, 2, 4, 4, 3)
  np.testing.assert_allclose(out["latents"][:, :, 1], out["latents"][:, :, 0, :, ::-1], rtol=1e-6)
  np.testing.assert_allclose(out["feature"][:, :, 0], out["feature"][:, :, 1], rtol=1e-5)
  D.encode_cached(few, enc, tmp_path, {"m": 1}, flip=False)
  assert enc.calls == 4 + 2  # flip is part of the cache identity


def test_cache_depends_on_the_shots(photo_root, few, tmp_path):
  other = D.sample_few_shot(D.from_folder(photo_root), 3, seed=1, resolution=8)
  assert D.cache_path(few, tmp_path, {}, False) != D.cache_path(other, tmp_path, {}, False)


def test_cache_failure_leaves_no_file(few, tmp_path, monkeypatch):
  with pytest.raises(RuntimeError, match="encoder crashed"):
    D.encode_cached(few, CountingEncoder(fail_after=1), tmp_path / "c", {"m": 1}, batch_size=4)
  assert not os.path.exists(tmp_path / "c") or not os.listdir(tmp_path / "c")

  def broken_savez(f, **arrays):
    f.write(b"half a file")
    raise OSError("disk full")

  monkeypatch.setattr(np, "savez", broken_savez)
  with pytest.raises(OSError, match="disk full"):
    D.encode_cached(few, CountingEncoder(), tmp_path / "c", {"m": 1}, batch_size=4)
  assert os.listdir(tmp_path / "c") == []


def test_cache_rejects_bad_encoder_output_and_key(few, tmp_path):
  with pytest.raises(D.DataError, match="'x'.*first axis"):
    D.encode_cached(few, lambda b: {"x": np.zeros(3)}, tmp_path, {"m": 1})
  with pytest.raises(D.DataError, match="JSON"):
    D.encode_cached(few, CountingEncoder(), tmp_path, {"m": object()})
  assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ errors


def test_error_missing_root(tmp_path):
  with pytest.raises(D.DataError, match=f"image folder {tmp_path / 'nope'} does not exist"):
    D.from_folder(tmp_path / "nope")
  with pytest.raises(D.DataError, match="no class subfolders"):
    D.from_folder(tmp_path)


def test_error_empty_class_folder(tmp_path):
  os.makedirs(tmp_path / "a")
  Image.fromarray(skdata.coffee()[:20, :20]).save(tmp_path / "a" / "x.png")
  os.makedirs(tmp_path / "b")
  (tmp_path / "b" / "notes.txt").write_text("hi")
  with pytest.raises(D.DataError, match=f"class folder {tmp_path / 'b'} contains no images"):
    D.from_folder(tmp_path)


def test_error_too_few_images(photo_root):
  labeled = D.from_folder(photo_root)
  with pytest.raises(D.DataError, match=r"class 'logo' \(index 4\).* has 5 image\(s\), fewer than n_shots=6"):
    D.sample_few_shot(labeled, 6, seed=0, resolution=RES)
  with pytest.raises(D.DataError, match="out of range"):
    D.sample_few_shot(labeled, 1, seed=0, class_indices=[5], resolution=RES)


def test_error_corrupt_image(tmp_path):
  os.makedirs(tmp_path / "a")
  for i in range(2):
    Image.fromarray(skdata.coffee()[:20, :20]).save(tmp_path / "a" / f"{i}.png")
  (tmp_path / "a" / "2.jpg").write_bytes(b"\xff\xd8\xff this is not a jpeg")
  labeled = D.from_folder(tmp_path)
  with pytest.raises(D.DataError, match=f"cannot read image file {tmp_path / 'a' / '2.jpg'}"):
    D.sample_few_shot(labeled, 3, seed=0, resolution=RES)


def test_error_split_file_missing_files(photo_root, tmp_path):
  rows = [["cat/00.png", 0, "cat"], ["cat/missing.png", 0, "cat"], ["coffee/00.png", 1, "coffee"]]
  path = tmp_path / "split.json"
  path.write_text(json.dumps({"train": rows, "test": rows[:1]}))
  with pytest.raises(D.DataError, match=r"split 'train'.*1 of 3 listed image files do not exist:\n.*cat/missing.png"):
    D.from_split_file(path, "train", photo_root)
  assert len(D.from_split_file(path, "test", photo_root)) == 1
  with pytest.raises(D.DataError, match="no split 'val'"):
    D.from_split_file(path, "val", photo_root)
  with pytest.raises(D.DataError, match="does not exist"):
    D.from_split_file(tmp_path / "none.json", "train", photo_root)
  with pytest.raises(D.DataError, match="gone.png"):
    D.from_file_lists({"cat": ["cat/gone.png"]}, root=photo_root)


# ------------------------------------------------------------------ tensorflow-datasets without tensorflow

TFDS_CLASSES = ["astronaut", "cat", "coffee"]


def _tfds_images():
  photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee()]
  return [(v, c) for c, p in enumerate(photos) for v in _variants(p, 4, seed=10 + c)]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """A real prepared array_record dataset, written by tfds itself (no tensorflow needed for that)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  from tensorflow_datasets.core import registered

  with registered.skip_registration():  # readers find it from the files, as a user's copy would be

    class McTiPhotos(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=TFDS_CLASSES)}))

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

      def _generate_examples(self):
        for i, (img, label) in enumerate(_tfds_images()):
          yield i, {"image": Image.fromarray(img), "label": label}

  data_dir = tmp_path_factory.mktemp("tfds")
  McTiPhotos(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_array_record(tfds_dir):
  labeled = D.from_tfds("mc_ti_photos", "train", tfds_dir)
  assert labeled.class_names == tuple(TFDS_CLASSES)
  assert len(labeled) == 12
  assert sorted(labeled.labels.tolist()) == sorted(c for _, c in _tfds_images())
  # Records are shuffled on write: match each decoded record to a written image by pixels.
  written = [img for img, _ in _tfds_images()]
  raw = labeled.read_fn(list(labeled.items))
  for img, label in zip(raw, labeled.labels):
    match = [k for k, w in enumerate(written) if w.shape == img.shape and np.array_equal(w, img)]
    assert len(match) == 1 and _tfds_images()[match[0]][1] == label
  few = D.sample_few_shot(labeled, 2, seed=0, resolution=RES, with_remaining=True)
  assert few.shots.shape == (3, 2, RES, RES, 3) and len(few.remaining) == 6
  assert few.shot_ids[0][0].startswith("mc_ti_photos/train[")


def test_tfds_errors(tfds_dir, tmp_path):
  with pytest.raises(D.DataError, match="'no_such_dataset_xyz' is not a dataset known"):
    D.from_tfds("no_such_dataset_xyz", "train", tmp_path)
  with pytest.raises(D.DataError, match="'mnist' is not prepared in .*--file_format=array_record"):
    D.from_tfds("mnist", "train", tmp_path)
  assert os.listdir(tmp_path) == []  # nothing downloaded or created
  with pytest.raises(D.DataError, match="no feature 'img'"):
    D.from_tfds("mc_ti_photos", "train", tfds_dir, image_key="img")
  with pytest.raises(D.DataError, match="no split 'validation'"):
    D.from_tfds("mc_ti_photos", "validation", tfds_dir)


def test_tfds_tfrecord_needs_tensorflow(tfds_dir, tmp_path):
  # Writing tfrecord needs tensorflow, so relabel a copy of the array_record data as tfrecord.
  import shutil
  copy = tmp_path / "tfds"
  shutil.copytree(tfds_dir, copy)
  info_path = copy / "mc_ti_photos" / "1.0.0" / "dataset_info.json"
  info = json.loads(info_path.read_text())
  assert info["fileFormat"] == "array_record"
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))
  with pytest.raises(D.DataError, match="prepared in the tfrecord format, which needs tensorflow"):
    D.from_tfds("mc_ti_photos", "train", copy)
