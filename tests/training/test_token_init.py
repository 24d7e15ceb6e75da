"""Tokens that start from each class's own label or caption, with a per-class number of vectors V_k."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import tiny_train_config, train_keeping_setup
from mcti_jax.tokens import conditioning, export
from mcti_jax.evaluation import evaluators
from mcti_jax import tiny
from mcti_jax.training import token_init, train
from mcti_jax.training import setup as setup_lib
from mcti_jax.tokens import placeholders as tok
from mcti_jax.classify import clip_head
from mcti_jax.errors import ConfigError
from mcti_jax.models import clip as clip_lib
from mcti_jax.models import pipeline
from mcti_jax.models.frozen import freeze
from mcti_jax.training.step import make_optimizer

CAPTIONS = ("bold leaning left", "three")  # 3 tokens and 1 token in the tiny vocabulary


@pytest.fixture(scope="module")
def caption_run(tiny_checkpoint, tmp_path_factory):
  """TI on K=2 classes (6 padded ones on 8 devices), class 0 from a 3-token caption, class 1 from a 1-token one."""
  base = tmp_path_factory.mktemp("caption_run")
  (base / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
  config = tiny_train_config(tiny_checkpoint, base / "run", phases=("ti",),
                             **{"data.num_classes": 2, "tokens.init": "caption",
                                "tokens.caption_file": str(base / "captions.txt")})
  result, setup = train_keeping_setup(config)
  return config, result, setup


@pytest.mark.slow
def test_classes_with_3_and_1_vectors_train_in_one_step_and_the_unused_vectors_stay_exactly(caption_run):
  _, result, setup = caption_run
  ct = setup.class_tokens
  assert ct.counts.tolist() == [3, 1] and ct.num_vectors == 3
  assert setup.init_tokens.shape == (8, 3, 32) and setup.num_padded == 8

  # Each class's prompts hold exactly its V_k placeholders, its own once the step shifts them.
  ids = np.asarray(setup.template_ids["ti"])  # [Kp, T, L]
  assert ids.ndim == 3 and ids.shape[:2] == (8, len(tok.TI_TEMPLATES))
  first = int(ct.ids[0, 0])
  for k, count in enumerate(ct.counts):
    shifted = np.asarray(tok.ids_for_class(jnp.asarray(ids[k]), first, ct.num_vectors, k))
    for row in shifted:
      assert sorted(row[row >= first].tolist()) == ct.ids[k, :count].tolist()

  # Vector v of class k starts at the v-th token of its caption, a row of SD's embedding table.
  table = np.asarray(tok.token_table(setup.sd.text_encoder))
  init = np.asarray(setup.init_tokens)
  for k, caption in enumerate(CAPTIONS):
    caption_ids = setup.sd.tokenizer(caption, add_special_tokens=False)["input_ids"]
    assert len(caption_ids) == ct.counts[k]
    np.testing.assert_array_equal(init[k, : len(caption_ids)], table[caption_ids])

  trained = result.tokens["ti"]
  unused = ~ct.vector_valid
  assert unused.tolist() == [[False, False, False], [False, True, True]]
  np.testing.assert_array_equal(trained[unused], init[:2][unused])  # bitwise
  moved = np.abs(trained - init[:2]).max(-1)
  assert np.all(moved[ct.vector_valid] > 1e-6), moved
  # The check could fail: AdamW's weight decay alone would move the unused vectors (they are not zero).
  optimizer = make_optimizer(2e-3)
  updates, _ = optimizer.update(jnp.zeros_like(init), optimizer.init(jnp.asarray(init)), jnp.asarray(init))
  assert np.all(np.abs(np.asarray(updates)[:2][unused]).max(-1) > 0)


@pytest.mark.slow
def test_the_export_holds_each_class_with_its_own_vectors_and_loads_back(caption_run, tmp_path):
  config, result, setup = caption_run
  folder = result.exports["ti"]
  manifest = json.loads((folder / export.MANIFEST).read_text())
  assert [c["num_vectors"] for c in manifest["classes"]] == [3, 1]
  assert [c["init_text"] for c in manifest["classes"]] == list(CAPTIONS)
  for k, c in enumerate(manifest["classes"]):
    per_class = load_file(str(folder / c["file"]))[f"<cls-{k}>"]
    assert per_class.shape == ((3, 32), (1, 32))[k]
    np.testing.assert_array_equal(per_class, result.tokens["ti"][k, : per_class.shape[0]])
  combined = load_file(str(folder / export.COMBINED))
  assert combined["tokens"].shape == (2, 3, 32) and combined["num_vectors"].tolist() == [3, 1]
  assert result.vector_counts.tolist() == [3, 1]

  # Generation and DiC prompts: "<cls-k>" expands to V_k placeholders.
  sd = pipeline.load_stable_diffusion(config.model.sd_path)
  learned = conditioning.LearnedTokens.from_export(folder, sd.tokenizer, sd.text_width)
  assert learned.class_tokens.counts.tolist() == [3, 1]
  ids = conditioning.tokenize(sd.tokenizer, ["a photo of a <cls-0>", "a photo of a <cls-1>"], learned)
  assert np.isin(ids, learned.class_tokens.ids).sum(1).tolist() == [3, 1]

  # An export from before per-class counts (no num_vectors anywhere) loads with all V vectors per class.
  old = tok.ClassTokens(tok.token_names(2, 2), np.array([[5, 6], [7, 8]]))
  export.export_tokens(tmp_path / "old", np.ones((2, 2, 32)), old, ["a", "b"])
  manifest = json.loads((tmp_path / "old" / export.MANIFEST).read_text())
  for c in manifest["classes"]:
    del c["num_vectors"]
  (tmp_path / "old" / export.MANIFEST).write_text(json.dumps(manifest))
  tokens, manifest = export.load_tokens(tmp_path / "old")
  assert export.vector_counts(manifest, tokens).tolist() == [2, 2]


@pytest.mark.slow
def test_the_token_head_scores_each_class_as_a_run_of_its_own_vectors_would(caption_run):
  """The evaluators' CLIP text features of the padded [K, 3, D] tokens equal, class by class, those of a one-class
  token set holding only that class's V_k vectors."""
  config, result, _ = caption_run
  models = evaluators.Models.load(config, 2, log=lambda _: None)  # tokens.num_vectors=1: the run's V=3 is another
  templates = tuple(clip_head.TEMPLATES.values())
  tokens = result.tokens["ti"]
  got = np.asarray(models.token_text_features(tokens, templates, result.vector_counts))
  clip_model, _ = pipeline.load_clip(config.model.clip_path)
  for k, count in enumerate(result.vector_counts):
    _, tokenizer = pipeline.load_clip(config.model.clip_path)
    alone = tok.add_class_tokens(tokenizer, 1, int(count))
    want = clip_head.class_text_features(freeze(clip_model), jnp.asarray(tokens[k:k + 1, :count]),
                                         jnp.asarray(tok.template_ids(tokenizer, templates, alone)),
                                         first_id=int(alone.ids[0, 0]))
    np.testing.assert_allclose(got[k], np.asarray(want)[0], atol=1e-5)
  padded_as_all = np.asarray(models.token_text_features(tokens, templates))  # all 3 vectors of class 1: not the same
  assert np.abs(padded_as_all[1] - got[1]).max() > 1e-3


@pytest.mark.slow
def test_label_is_clips_zero_shot_vote_on_the_shots(tmp_path):
  """On the pretrained tiny models: each class's label is the word CLIP ranks first on most of its shots, computed
  here from the shots' pixels; CLIP knows the names of 0-4, so those come out right."""
  config = tiny_train_config(tiny.DEFAULT_OUT, tmp_path / "run", phases=("ti",),
                             **{"tokens.init": "label", "data.n_shots": 3})
  setup = setup_lib.prepare(config, log=lambda _: None)
  assert setup.clip is None  # loaded for the labels only
  words = list(config.tokens.label_words)
  clip_model, clip_tokenizer = pipeline.load_clip(config.model.clip_path)
  shots = setup.shots.shots  # [K, N, 16, 16, 3]
  image = np.asarray(clip_lib.image_features(clip_model, jnp.asarray(shots.reshape(-1, *shots.shape[2:]))))
  text = np.asarray(clip_model.get_text_features(jnp.asarray(clip_tokenizer(
      [config.tokens.label_template.format(w) for w in words], padding="max_length", max_length=77,
      return_tensors="np")["input_ids"])))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  cos = (unit(image) @ unit(text).T).reshape(10, 3, len(words))
  scale = min(float(np.exp(clip_model.logit_scale[...])), 100.0)
  want = []
  for k in range(10):
    votes = np.bincount(cos[k].argmax(-1), minlength=len(words))
    tied = np.flatnonzero(votes == votes.max())
    probs = np.asarray(jax.nn.softmax(scale * cos[k], -1)).mean(0)
    want.append(words[tied[np.argmax(probs[tied])]])
  assert list(setup.class_tokens.init_texts) == want
  assert sum(w == name for w, name in zip(want[:5], words[:5])) >= 4, want
  table = np.asarray(tok.token_table(setup.sd.text_encoder))
  for k, label in enumerate(want):
    label_ids = setup.sd.tokenizer(label, add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(np.asarray(setup.init_tokens)[k, : len(label_ids)], table[label_ids])


def test_a_tie_goes_to_the_word_of_higher_mean_probability():
  """Two shots, one vote each for words 0 and 1; the shot of word 1 is far more certain."""
  text = np.eye(3)
  shots = np.array([[[1.0, 0.9, 0.0], [0.0, 1.0, -1.0]]])  # shot 0: barely word 0; shot 1: clearly word 1
  labels, info = token_init.vote(shots, text, 10.0, ["w0", "w1", "w2"])
  assert info["votes"].tolist() == [[1, 1, 0]] and labels == ["w1"]
  labels, _ = token_init.vote(np.array([[[1.0, 0.0, -1.0], [0.9, 1.0, 0.0]]]), text, 10.0, ["w0", "w1", "w2"])
  assert labels == ["w0"]  # now the shot of word 0 is the certain one


def test_one_caption_per_shot_starts_each_class_from_its_first_shots(tmp_path):
  lines = [f"{c} {s}" for c in ("zero", "one") for s in ("a", "b", "c")]  # class-major, 3 shots each
  (tmp_path / "c.txt").write_text("\n".join(lines))
  assert token_init.read_captions(tmp_path / "c.txt", 2, 3) == ["zero a", "one a"]


@pytest.mark.parametrize("captions, overrides, message", [
    (None, {"tokens.caption_file": "/nonexistent/captions.txt"}, r"captions.txt.*does not exist"),
    (None, {}, r"needs tokens.caption_file"),
    ("three\nfour\nfive\n", {}, r"has 3 lines, but needs one caption per class \(2 lines\) or per shot .* = 10 lines"),
    ("three\n \n", {}, r"line 2 is empty"),
    ("three\n" + "digit " * 80 + "\n", {}, r"class 1 \(one\) starts from 'digit digit.* with 80 vectors, but the "
     r"template .* leaves room for \d+ \(77 tokens minus BOS, EOS and its own \d+\): shorten"),
    (None, {"tokens.init": "label", "tokens.label_words": ()}, r"needs tokens.label_words"),
])
def test_bad_token_inits_fail_before_the_models_load(tiny_checkpoint, tmp_path, monkeypatch, captions, overrides,
                                                     message):
  if captions is not None:
    (tmp_path / "captions.txt").write_text(captions)
    overrides = {"tokens.caption_file": str(tmp_path / "captions.txt"), **overrides}
  config = tiny_train_config(tiny_checkpoint, tmp_path / "run", phases=("ti",),
                             **{"data.num_classes": 2, "tokens.init": "caption", **overrides})
  monkeypatch.setattr(pipeline, "load_stable_diffusion", lambda *a, **k: pytest.fail("the models loaded"))
  with pytest.raises(ConfigError, match=message):
    train.train(config, log=lambda _: None)
  assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ labels from a classifier


def _guide_config(**overrides):
  from mcti_jax.configs import mcti
  from mcti_jax.tiny.guide import DIGITS_GUIDE
  c = mcti.get_config("tiny")
  c.tokens.init = "label"
  c.tokens.label_classifier.type, c.tokens.label_classifier.path = "file", str(DIGITS_GUIDE)
  for key, value in overrides.items():
    c.tokens[key] = value
  return c


def test_the_digit_guides_labels_are_the_argmax_of_its_mean_probability_and_start_the_tokens():
  """The committed digit guide on 3 shots of each digit (shot seed 1): the guide run here by hand, each class's
  label the name of its highest mean softmax over the shots; the class then starts at that word's embedding."""
  from mcti_jax import data as D
  from mcti_jax import guides
  config = _guide_config()
  shots = D.sample_few_shot(D.load_labeled(config.data, "train"), 3, 1, resolution=config.data.resolution)
  labels, info = token_init.class_labels(config, 10, shots=shots)

  guide = guides.load(dict(type="file", path=config.tokens.label_classifier.path))
  logits = np.asarray(guide(jnp.asarray(shots.shots.reshape(30, 16, 16, 3))), np.float64).reshape(10, 3, 10)
  mean = np.asarray(jax.nn.softmax(logits, -1)).mean(1)
  want = [guide.class_names[i] for i in mean.argmax(-1)]
  assert labels == want
  np.testing.assert_allclose(info["mean_probs"], mean, atol=1e-5)
  assert sum(w == name for w, name in zip(want, config.data.class_names)) >= 9, want  # 98% on held-out digits

  sd_path = str(tiny.DEFAULT_OUT / "sd")
  sd = pipeline.load_stable_diffusion(sd_path)
  table = np.asarray(tok.token_table(sd.text_encoder))
  start = token_init.initial_tokens(config, sd.tokenizer, table, 10, labels)
  assert start.texts == tuple(want)
  for k, label in enumerate(want):
    ids = sd.tokenizer(label, add_special_tokens=False)["input_ids"]
    assert start.counts[k] == len(ids)
    np.testing.assert_array_equal(start.vectors[k, :len(ids)], table[ids])


def _toy_classifier(names):
  """Logits = the first len(names) pixel values of the image's red channel (row-major)."""
  from mcti_jax import guides
  n = len(names)
  return guides.Classifier(params={}, apply=lambda p, x: x[..., 0].reshape(x.shape[0], -1)[:, :n],
                           transform=guides.Transform(), class_names=tuple(names))


def test_label_words_narrow_a_classifiers_labels_to_those_of_its_classes():
  names = ("zero", "one", "two")
  images = np.zeros((2, 2, 2, 2, 3), np.float32)  # 2 classes x 2 shots of 2x2 px
  images[0, :, 0, 0, 0] = [0.9, 0.8]  # class 0: "zero" on both shots
  images[1, 0, 0, 1, 0], images[1, 0, 1, 0, 0] = 0.5, 0.6  # class 1, shot 0: "two" a bit above "one"
  images[1, 1, 0, 1, 0] = 0.9  # shot 1: clearly "one"
  classifier = _toy_classifier(names)
  labels, info = token_init.classifier_labels(classifier, [(np.arange(2), images)])
  assert labels == ["zero", "one"] and info["words"] == list(names)
  labels, info = token_init.classifier_labels(classifier, [(np.arange(1), images[:1]), (np.array([1]), images[1:])],
                                              words=("two", "zero"))
  assert labels == ["zero", "two"] and info["probs"].shape == (2, 2, 2)  # softmax over "two" and "zero" only
  np.testing.assert_allclose(info["probs"].sum(-1), 1.0)


def test_the_label_source_is_checked_before_any_model_loads():
  from mcti_jax.configs import mcti
  c = mcti.get_config("tiny")
  c.tokens.init, c.tokens.label_words = "label", ()
  with pytest.raises(ConfigError, match="needs tokens.label_words .* or tokens.label_classifier"):
    token_init.check_label_source(c)
  c.tokens.label_classifier.type = "convnet"
  with pytest.raises(ConfigError, match="tokens.label_classifier.type='convnet'; classifier types: file"):
    token_init.check_label_source(c)
  assert token_init.label_classifier_spec(mcti.get_config("tiny")) is None  # the default: CLIP zero-shot
  with pytest.raises(ConfigError, match=r"tokens.label_words holds \['ten'\], which tokens.label_classifier does not"):
    token_init.load_label_classifier(_guide_config(label_words=("one", "ten")))


@pytest.mark.slow
def test_labels_from_the_digit_guide_start_the_tokens_through_the_trainers_setup(tmp_path):
  from mcti_jax import guides
  from mcti_jax.tiny.guide import DIGITS_GUIDE
  config = tiny_train_config(tiny.DEFAULT_OUT, tmp_path / "run", phases=("ti",),
                             **{"tokens.init": "label", "data.n_shots": 3,
                                "tokens.label_classifier.type": "file",
                                "tokens.label_classifier.path": str(DIGITS_GUIDE)})
  setup = setup_lib.prepare(config, log=lambda _: None)
  assert setup.clip is None  # no CLIP for the labels: the guide names the shots
  guide = guides.load(dict(type="file", path=str(DIGITS_GUIDE)))
  shots = setup.shots.shots
  logits = np.asarray(guide(jnp.asarray(shots.reshape(-1, *shots.shape[2:]))), np.float64).reshape(10, 3, 10)
  want = [guide.class_names[i] for i in np.asarray(jax.nn.softmax(logits, -1)).mean(1).argmax(-1)]
  assert list(setup.class_tokens.init_texts) == want
  table = np.asarray(tok.token_table(setup.sd.text_encoder))
  for k, label in enumerate(want):
    ids = setup.sd.tokenizer(label, add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(np.asarray(setup.init_tokens)[k, :len(ids)], table[ids])
