"""Image classifiers as a plug-in (mcti_jax/guides) and the tiny world's guides (mcti_jax/tiny/guide.py)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from conftest import FLAT_NET, GREY, NAMES, POOLED_NET, random_classifier

from mcti_jax import guides
from mcti_jax.runtime import parallel
from mcti_jax.guides import Transform
from mcti_jax.guides import file as cfile
from mcti_jax.errors import ConfigError
from mcti_jax.models.hf_io import CheckpointError

RGB = Transform(resize=9, crop=(9, 9), method="bilinear", mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))


def logits(classifier, images):
  return np.asarray(_logits(classifier, images))


_logits = jax.jit(lambda classifier, images: classifier(images))


# ---------------------------------------------------------------- an independent NumPy forward pass


def np_resize_axis(x, axis, size):
  """Antialiased bilinear resize along one axis: a triangle kernel at sample centers (i + 0.5) / scale - 0.5,
  widened by 1 / scale when shrinking, weights normalised per output pixel."""
  n = x.shape[axis]
  scale = size / n
  centers = (np.arange(size) + 0.5) / scale - 0.5
  width = max(1.0 / scale, 1.0)
  w = np.maximum(0.0, 1.0 - np.abs(np.arange(n)[None, :] - centers[:, None]) / width)
  w /= w.sum(1, keepdims=True)
  return np.moveaxis(np.tensordot(w, np.moveaxis(x, axis, 0), axes=1), 0, axis)


def np_transform(t: Transform, images):
  x = images.astype(np.float64)
  if t.grayscale:
    x = x.mean(-1, keepdims=True)
  h, w = x.shape[1:3]
  short = min(h, w)
  new_h, new_w = (t.resize, int(t.resize * w / h)) if h <= w else (int(t.resize * h / w), t.resize)
  assert short != t.resize
  x = np_resize_axis(np_resize_axis(x, 1, new_h), 2, new_w)
  top, left = (new_h - t.crop[0]) // 2, (new_w - t.crop[1]) // 2
  x = x[:, top:top + t.crop[0], left:left + t.crop[1]]
  return (x - np.asarray(t.mean)) / np.asarray(t.std)


def np_conv(x, kernel, bias, stride, padding):
  kh, kw = kernel.shape[:2]
  if padding == "SAME":  # TensorFlow's: total padding so out = ceil(n / stride), the extra pixel at the end
    pads = []
    for n, k in ((x.shape[1], kh), (x.shape[2], kw)):
      total = max((-(-n // stride) - 1) * stride + k - n, 0)
      pads.append((total // 2, total - total // 2))
    x = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, kernel.shape[3]))
  for i in range(oh):
    for j in range(ow):
      patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, kernel)
  return out + bias


def np_max_pool(x, window):
  oh, ow = x.shape[1] // window, x.shape[2] // window
  out = np.zeros((x.shape[0], oh, ow, x.shape[3]))
  for i in range(oh):
    for j in range(ow):
      out[:, i, j] = x[:, i * window:(i + 1) * window, j * window:(j + 1) * window].max((1, 2))
  return out


def np_forward(layers, params, x):
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  for spec in layers:
    kind = spec["type"]
    if kind == "conv":
      x = np_conv(x, p[spec["name"] + ".kernel"], p[spec["name"] + ".bias"], spec.get("stride", 1),
                  spec.get("padding", "SAME"))
    elif kind == "dense":
      x = x @ p[spec["name"] + ".kernel"] + p[spec["name"] + ".bias"]
    elif kind == "relu":
      x = np.maximum(x, 0)
    elif kind == "max_pool":
      x = np_max_pool(x, spec["window"])
    elif kind == "global_mean_pool":
      x = x.mean((1, 2))
    elif kind == "flatten":
      x = x.reshape(len(x), -1)
  return x


@pytest.mark.parametrize("layers,transform", [(FLAT_NET, GREY), (POOLED_NET, RGB)], ids=["flat_grey", "pooled_rgb"])
def test_file_classifier_matches_numpy(layers, transform):
  c = random_classifier(layers, transform)
  images = np.random.default_rng(1).uniform(size=(2, 14, 18, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(jax.jit(transform)(images)), np_transform(transform, images), atol=1e-5)
  want = np_forward(layers, c.params, np_transform(transform, images))
  np.testing.assert_allclose(logits(c, images), want, rtol=1e-4, atol=1e-4)
  assert c.num_classes == 3 and np.abs(want).max() > 0.1


def test_images_already_at_size_are_not_resized():
  images = np.random.default_rng(0).uniform(size=(2, 9, 9, 3)).astype(np.float32)
  want = (images - np.asarray(RGB.mean)) / np.asarray(RGB.std)
  np.testing.assert_allclose(np.asarray(RGB(images)), want, atol=1e-6)
  np.testing.assert_allclose(np.asarray(RGB((images * 255).round().astype(np.uint8))),
                             (np.round(images * 255) / 255 - np.asarray(RGB.mean)) / np.asarray(RGB.std), atol=1e-5)


@pytest.mark.slow
def test_gradients_reach_the_images_under_jit_vmap_and_shard_map():
  c = random_classifier()
  images = jnp.asarray(np.random.default_rng(2).uniform(size=(8, 14, 18, 3)), jnp.float32)
  labels = jnp.arange(8) % 3

  def loss(classifier, x, y):
    return -jax.nn.log_softmax(classifier(x[None]))[0, y]

  per_image = jax.vmap(jax.grad(loss, argnums=1), in_axes=(None, 0, 0))
  grads = np.asarray(jax.jit(per_image)(c, images, labels))
  assert np.isfinite(grads).all() and (np.abs(grads).reshape(8, -1).max(1) > 1e-4).all()
  # The images sharded over the (simulated) devices, the classifier replicated: the same gradients.
  mesh = parallel.make_mesh(math.gcd(8, jax.device_count()))
  sharded = jax.jit(jax.shard_map(per_image, mesh=mesh, in_specs=(P(), P(parallel.CLASS_AXIS), P(parallel.CLASS_AXIS)),
                                  out_specs=P(parallel.CLASS_AXIS)))
  np.testing.assert_allclose(np.asarray(sharded(c, images, labels)), grads, atol=1e-6)


# ---------------------------------------------------------------- the file format


def test_save_load_round_trip(tmp_path):
  c = random_classifier()
  cfile.save(tmp_path / "clf", c, info={"made_by": "test"})
  assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == [cfile.CONFIG_NAME, cfile.WEIGHTS_NAME]
  config = json.loads((tmp_path / "clf" / cfile.CONFIG_NAME).read_text())
  assert config["format"] == "mcti-classifier" and config["version"] == 1 and config["info"] == {"made_by": "test"}
  assert config["layers"][3] == FLAT_NET[3]  # as written by hand
  loaded = guides.load({"type": "file", "path": str(tmp_path / "clf")})
  assert loaded.class_names == NAMES and loaded.transform == GREY and loaded.apply == c.apply
  for k, v in c.params.items():
    np.testing.assert_array_equal(np.asarray(loaded.params[k]), np.asarray(v))
  images = np.random.default_rng(3).uniform(size=(2, 12, 12, 3)).astype(np.float32)
  np.testing.assert_array_equal(logits(loaded, images), logits(c, images))


def _write(folder, config, tensors):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / cfile.CONFIG_NAME).write_text(json.dumps(config))
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / cfile.WEIGHTS_NAME))


def _parts(tmp_path):
  cfile.save(tmp_path / "good", random_classifier())
  config = json.loads((tmp_path / "good" / cfile.CONFIG_NAME).read_text())
  return config, dict(load_file(str(tmp_path / "good" / cfile.WEIGHTS_NAME)))


def _break(name, config, tensors):
  if name == "format":
    config["format"] = "torch-model"
  elif name == "version":
    config["version"] = 2
  elif name == "layer_type":
    config["layers"][1] = {"type": "softmax"}
  elif name == "missing_key":
    del tensors["fc.bias"], tensors["conv2.kernel"]
  elif name == "shape":
    tensors["conv1.kernel"] = np.ascontiguousarray(tensors["conv1.kernel"].transpose(3, 2, 0, 1))
  elif name == "class_count":
    config["class_names"] = ["a", "b"]
  elif name == "unused_key":
    tensors["fc2.kernel"] = np.zeros((2, 2), np.float32)
  elif name == "dense_on_image":
    del config["layers"][5]  # the flatten
  return config, tensors


BROKEN = {  # what breaks -> (file the message names, words it holds)
    "format": (cfile.CONFIG_NAME, ["format='torch-model'", "'mcti-classifier'"]),
    "version": (cfile.CONFIG_NAME, ["version=2", "reads version 1"]),
    "layer_type": (cfile.CONFIG_NAME, ["layers[1]", "'softmax'", "max_pool"]),
    "missing_key": (cfile.WEIGHTS_NAME, ["'conv2.kernel'", "'fc.bias'", "missing"]),
    "shape": (cfile.WEIGHTS_NAME, ["'conv1.kernel'", "(4, 1, 3, 3)", "(3, 3, 1, 4)", "HWIO"]),
    "class_count": (cfile.CONFIG_NAME, ["3 outputs", "2 class_names"]),
    "unused_key": (cfile.WEIGHTS_NAME, ["'fc2.kernel'", "no layer"]),
    "dense_on_image": (cfile.CONFIG_NAME, ["layer 5 (dense 'fc')", "flatten"]),
}


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_broken_files_are_named_with_the_fix(tmp_path, broken):
  folder = tmp_path / "bad"
  _write(folder, *_break(broken, *_parts(tmp_path)))
  before = sorted(p.name for p in folder.iterdir())
  with pytest.raises(CheckpointError) as e:
    cfile.load(folder)
  file, words = BROKEN[broken]
  assert str(folder / file) in str(e.value)
  for word in words:
    assert word in str(e.value)
  assert sorted(p.name for p in folder.iterdir()) == before


def test_missing_folder_and_files(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    cfile.load(tmp_path / "nowhere")
  config, tensors = _parts(tmp_path)
  (tmp_path / "no_json").mkdir()
  save_file(tensors, str(tmp_path / "no_json" / cfile.WEIGHTS_NAME))
  with pytest.raises(CheckpointError, match=f"no_json/{cfile.CONFIG_NAME} is missing"):
    cfile.load(tmp_path / "no_json")
  (tmp_path / "pickled").mkdir()
  (tmp_path / "pickled" / cfile.CONFIG_NAME).write_text(json.dumps(config))
  (tmp_path / "pickled" / "model.pt").write_bytes(b"not read")
  with pytest.raises(CheckpointError, match=rf"pickled/{cfile.WEIGHTS_NAME} is missing.*model.pt are not read"):
    cfile.load(tmp_path / "pickled")


def test_save_writes_nothing_for_a_classifier_that_would_not_load(tmp_path):
  c = random_classifier()
  bad = c.replace(params={k: v for k, v in c.params.items() if k != "fc.kernel"})
  with pytest.raises(CheckpointError, match="'fc.kernel'"):
    cfile.save(tmp_path / "out", bad)
  assert list(tmp_path.iterdir()) == []
  with pytest.raises(CheckpointError, match="3 outputs but there are 2 class_names"):
    cfile.save(tmp_path / "out", c.replace(class_names=("a", "b")))
  assert list(tmp_path.iterdir()) == []


def test_spec_errors(tmp_path):
  cfile.save(tmp_path / "clf", random_classifier())
  with pytest.raises(ConfigError, match=r"guide\.type='onnx'; classifier types: file, clip_zeroshot, clip_tokens"):
    guides.load({"type": "onnx"}, where="guide")
  with pytest.raises(ConfigError, match="needs clip_path, export"):
    guides.load({"type": "clip_tokens"})
  with pytest.raises(ConfigError, match=r"has no fields \['paht'\]"):
    guides.load({"type": "file", "path": str(tmp_path / "clf"), "paht": "x"})
  with pytest.raises(ConfigError, match="needs class_names"):
    guides.load({"type": "clip_zeroshot", "clip_path": "x"})
  with pytest.raises(ConfigError, match=r"classes \['d'\] are not among"):
    guides.load({"type": "file", "path": str(tmp_path / "clf")}, class_names=("a", "d"))
  c = guides.load({"type": "file", "path": str(tmp_path / "clf")}, class_names=("c", "a"))
  np.testing.assert_array_equal(c.index_of(["c", "a"]), [2, 0])


# ---------------------------------------------------------------- CLIP heads


@pytest.mark.slow
def test_clip_zeroshot_is_scaled_cosine_of_clip_features(tiny_checkpoint):
  from mcti_jax.models import clip as clip_lib
  from mcti_jax.models import pipeline
  from mcti_jax.models import tokenizer as tokenizer_lib
  from mcti_jax.models.frozen import freeze
  names = ("zero", "one", "two")
  c = guides.load({"type": "clip_zeroshot", "clip_path": str(tiny_checkpoint / "clip"), "class_names": names,
                        "template": "a photo of a {}"})
  images = np.random.default_rng(0).uniform(size=(3, 20, 24, 3)).astype(np.float32)
  model, tokenizer = pipeline.load_clip(tiny_checkpoint / "clip")
  frozen = freeze(model)
  image = np.asarray(jax.jit(lambda m, x: clip_lib.image_features(m.module, x))(frozen, images), np.float64)
  ids = tokenizer_lib.encode(tokenizer, [f"a photo of a {n}" for n in names])
  text = np.asarray(jax.jit(lambda m, i: m.module.get_text_features(i))(frozen, ids), np.float64)
  image /= np.linalg.norm(image, axis=-1, keepdims=True)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  want = np.exp(float(model.logit_scale[...])) * image @ text.T
  def loss(classifier, x):
    out = classifier(x)
    return jax.nn.log_softmax(out)[:, 1].sum(), out

  (_, got), grads = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True))(c, jnp.asarray(images))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  assert np.isfinite(grads).all() and float(jnp.abs(grads).max()) > 0
  np.testing.assert_allclose(np.asarray(c.transform(images)), np.asarray(clip_lib.preprocess(images, 16)), atol=1e-6)


def test_clip_tokens_of_word_embeddings_equal_zeroshot_of_the_words(tiny_checkpoint, tmp_path):
  """Tokens set to the embeddings of 'zero', 'one', 'two' give the zero-shot classifier of those words."""
  from mcti_jax.tokens import export
  from mcti_jax.tokens import placeholders as tok
  from mcti_jax.models import pipeline
  clip_path = str(tiny_checkpoint / "clip")
  model, tokenizer = pipeline.load_clip(clip_path)
  words = ("zero", "one", "two")
  table = np.asarray(tok.token_table(model))
  ids = [tokenizer.convert_tokens_to_ids(w + "</w>") for w in words]
  assert all(isinstance(i, int) and i != tokenizer.unk_token_id for i in ids)
  vectors = table[ids][:, None, :]  # [K, V=1, D]
  export.export_tokens(tmp_path / "mcti", vectors, tok.add_class_tokens(tokenizer, 3, 1), ["nought", "uno", "deux"],
                       {"pooling": "eos"})
  tokens = guides.load({"type": "clip_tokens", "clip_path": clip_path, "export": str(tmp_path / "mcti")})
  zeroshot = guides.load({"type": "clip_zeroshot", "clip_path": clip_path, "class_names": words})
  assert tokens.class_names == ("nought", "uno", "deux")
  images = np.random.default_rng(1).uniform(size=(4, 16, 16, 3)).astype(np.float32)
  np.testing.assert_allclose(logits(tokens, images), logits(zeroshot, images), rtol=1e-5, atol=1e-5)
  with pytest.raises(ConfigError, match=r"classifier\.export=.*holds no manifest\.json"):
    guides.load({"type": "clip_tokens", "clip_path": clip_path, "export": str(tmp_path)})


# ---------------------------------------------------------------- the tiny world's guides and judges


@pytest.mark.parametrize("name,bar", [("digits", 0.95), ("slant", 0.8)])
def test_committed_guides_reach_their_recorded_accuracy(name, bar):
  from mcti_jax import data as D
  from mcti_jax.tiny import guide
  folder = {"digits": guide.DIGITS_GUIDE, "slant": guide.SLANT_GUIDE}[name]
  card = json.loads((folder / guide.CARD_NAME).read_text())
  assert (folder / cfile.WEIGHTS_NAME).stat().st_size < 200_000
  c = guides.load({"type": "file", "path": str(folder)})
  images, labels = D.digits_images()
  parts = D.digits_split(labels)
  held = parts["heldout"]
  truth = labels if name == "digits" else guide.slant_levels(images, images[parts["pretrain"]])
  accuracy = guide.accuracy(c, images[held], truth[held])
  assert accuracy > bar
  assert abs(accuracy - card["heldout_accuracy"]) < 2e-3, (accuracy, card)
  assert list(c.class_names) == card["class_names"]
  # Larger generated images are resized to the guide's 16 x 16: the 2x-upsampled held-out digits still classify.
  big = np.repeat(np.repeat(images[held], 2, axis=1), 2, axis=2)
  assert guide.accuracy(c, big, truth[held]) > bar - 0.05


def test_guide_names():
  from mcti_jax.tiny import guide
  from mcti_jax.tiny.captions import ATTRIBUTES, NAMES
  assert json.loads((guide.DIGITS_GUIDE / cfile.CONFIG_NAME).read_text())["class_names"] == list(NAMES)
  assert guide.SLANT_NAMES == ("leaning right", "upright", "leaning left") and ATTRIBUTES[guide.SLANT][0] == "slant"


def test_pixel_knn_judge():
  from mcti_jax.tiny import judges
  judge, accuracy = judges.knn()
  assert accuracy > 0.9 and judge.n_neighbors == 3
