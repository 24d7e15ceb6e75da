"""The vectorised trainer on tiny random models and 8 simulated CPU devices."""

import functools
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, tiny_train_config
from mcti_jax import data as D
from mcti_jax import export, pretrain_tiny, train
from mcti_jax.classify import clip_head
from mcti_jax.methods import mcti
from mcti_jax.models import pipeline
from mcti_jax.models.frozen import freeze
from mcti_jax.train_step import ShotData, TrainState, class_objective, make_optimizer, train_step


# ------------------------------------------------------------ the regulariser


def test_reg_loss_equals_the_formula_by_hand():
  rng = np.random.default_rng(0)
  g, f = rng.normal(size=8), rng.normal(size=(5, 8))
  valid = np.array([True, True, True, True, False])
  ce, correct = mcti.reg_loss(jnp.asarray(g), jnp.asarray(f), 2, jnp.asarray(valid), 10.0)
  cos = f @ g / np.linalg.norm(f, axis=1) / np.linalg.norm(g)
  logits = 10.0 * cos[:4]  # the padded class takes no part
  want = -(logits[2] - np.log(np.exp(logits).sum()))
  np.testing.assert_allclose(float(ce), want, rtol=1e-5)
  assert float(correct) == float(np.argmax(logits) == 2)


# ------------------------------------------------------------ shared runs


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):
  """The same K=5 run on 8 devices and on 1 device, and the 8-device setup."""
  base = tmp_path_factory.mktemp("runs")
  out = {}
  for devices in (8, 1):
    config = tiny_train_config(tiny_checkpoint, base / f"d{devices}", num_devices=devices,
                               **{"data.num_classes": 5})
    out[devices] = train.train(config, log=lambda _: None)
    out[f"config{devices}"] = config
  return out


def _tokens(result, phase):
  return export.load_tokens(result["exports"][phase])[0]


def test_eight_devices_equal_one_device_with_padding(runs):
  assert runs[8]["setup"].num_padded == 8 and runs[1]["setup"].num_padded == 5
  for phase in ("ti", "mcti"):
    a, b = _tokens(runs[8], phase), _tokens(runs[1], phase)
    assert a.shape == (5, 1, 32)
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=0)
  init = np.asarray(runs[1]["setup"].init_tokens)
  assert np.abs(_tokens(runs[1], "mcti") - init).max() > 1e-4  # it trained at all


def test_backbone_is_bit_identical_after_training(runs):
  setup = runs[8]["setup"]
  fresh = pipeline.load_stable_diffusion(runs["config8"].model.sd_path)
  for trained, loaded in ((setup.sd.unet, fresh.unet), (setup.sd.text_encoder, fresh.text_encoder)):
    for a, b in zip(jax.tree.leaves(freeze(trained).params), jax.tree.leaves(freeze(loaded).params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_interrupted_run_resumes_to_the_same_tokens(runs, tmp_path):
  config = runs["config8"].copy_and_resolve_references()
  config.workdir = str(tmp_path / "run")

  class Killed(Exception):
    pass

  def kill_at_5(step):
    if step == 5:
      raise Killed

  with pytest.raises(Killed):
    train.train(config, on_step=kill_at_5, log=lambda _: None)
  steps_done = []
  logs = []
  result = train.train(config, on_step=steps_done.append, log=logs.append)
  assert steps_done == [5, 6, 7, 8]  # resumed from the checkpoint at step 4
  assert any("resumed from the checkpoint at step 4" in line for line in logs)
  for phase in ("ti", "mcti"):
    np.testing.assert_array_equal(_tokens(result, phase), _tokens(runs[8], phase))
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [2, 4, 6, 8]  # no duplicated rows after the resume

  logs.clear()
  steps_done.clear()
  train.train(config, on_step=steps_done.append, log=logs.append)
  assert steps_done == [] and any("already holds a finished run" in line for line in logs)


def test_changed_settings_are_refused_in_an_existing_workdir(runs):
  config = runs["config8"].copy_and_resolve_references()
  old_lr, config.lr = config.lr, 1e-3
  with pytest.raises(ValueError, match=re.escape(f"other settings (lr: {old_lr} -> 0.001)")):
    train.train(config, log=lambda _: None)


# ------------------------------------------------------------ K classes at once = K one-class runs


def test_k_classes_in_one_step_equal_k_one_class_runs(tiny_checkpoint, tmp_path):
  config = tiny_train_config(tiny_checkpoint, tmp_path / "run", num_devices=1, batch_per_class=2,
                             **{"data.num_classes": 3})
  setup = train.prepare(config, log=lambda _: None)
  backbone, template_ids = train.make_backbone(setup), jnp.asarray(setup.template_ids)
  optimizer = make_optimizer(config.lr)
  step = jax.jit(functools.partial(train_step, cfg=train.step_config(setup, "mcti"), optimizer=optimizer,
                                   mesh=setup.mesh))

  def run(tokens, data):
    state = TrainState(step=jnp.zeros((), jnp.int32), tokens=tokens, opt_state=optimizer.init(tokens),
                       key=jax.random.PRNGKey(0))
    for _ in range(3):
      state, _ = step(state, data, backbone, template_ids)
    return np.asarray(state.tokens)

  together = run(setup.init_tokens, setup.data)
  d = setup.data
  for k in range(3):
    one = ShotData(class_ids=d.class_ids[k:k + 1], latent_mean=d.latent_mean[k:k + 1],
                   latent_logvar=d.latent_logvar[k:k + 1], image_features=d.image_features, valid=d.valid)
    alone = run(setup.init_tokens[k:k + 1], one)
    np.testing.assert_allclose(alone[0], together[k], atol=1e-6, rtol=0)
  assert np.abs(together - np.asarray(setup.init_tokens)).max() > 1e-4


def test_reg_gradient_reaches_the_tokens(tiny_checkpoint, tmp_path):
  config = tiny_train_config(tiny_checkpoint, tmp_path / "run", num_devices=1, **{"data.num_classes": 3})
  setup = train.prepare(config, log=lambda _: None)
  backbone, d = train.make_backbone(setup), setup.data
  cfg = train.step_config(setup, "mcti")

  def reg_of_class_1(vectors):
    _, reg, _ = class_objective(vectors, 1, jax.random.PRNGKey(0), backbone, d.latent_mean[1], d.latent_logvar[1],
                                d.image_features, d.valid, jnp.asarray(setup.template_ids), cfg)
    return reg

  grad = jax.grad(reg_of_class_1)(setup.init_tokens[1])
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 1e-6


def test_reg_train_accuracy_equals_a_loop_by_hand():
  rng = np.random.default_rng(1)
  g, f = rng.normal(size=(4, 6)), rng.normal(size=(4, 3, 6))
  hits = [np.argmax([f[j, n] @ g[k] / np.linalg.norm(f[j, n]) for j in range(4)]) == k
          for k in range(4) for n in range(3)]
  assert float(mcti.reg_train_accuracy(jnp.asarray(g), jnp.asarray(f))) == pytest.approx(np.mean(hits))


def test_mcti_raises_the_train_accuracy_of_its_classifier(tmp_path):
  """Same warm-up, then 60 steps with beta=1 (MC-TI) or beta=0 (TI only), on a fixed seed.

  On the embedded pretrained checkpoint: a random CLIP's image features of different digits are too alike to learn.
  """
  accuracy = {}
  for beta in (0.0, 1.0):
    config = tiny_train_config(pretrain_tiny.DEFAULT_OUT, tmp_path / f"beta{beta}", beta=beta, ti_steps=2,
                               mcti_steps=60, lr=5e-3, log_every=10, checkpoint_every=100)
    result = train.train(config, log=lambda _: None)
    setup = result["setup"]
    tokens, _ = export.load_tokens(result["exports"]["mcti"])
    texts = clip_head.class_text_features(freeze(setup.clip), jnp.asarray(tokens), jnp.asarray(setup.template_ids),
                                          first_id=int(setup.class_tokens.ids[0, 0]))
    shots = setup.data.image_features[:10, :, 0]  # [K, N, P], no flips in the tiny config
    accuracy[beta] = float(mcti.reg_train_accuracy(texts, shots))
  assert accuracy[1.0] > accuracy[0.0] + 0.3, accuracy


# ------------------------------------------------------------ export


def test_exported_tokens_load_in_diffusers_and_encode_equally(tiny_checkpoint, tmp_path):
  import torch
  from diffusers import StableDiffusionPipeline

  config = tiny_train_config(tiny_checkpoint, tmp_path / "run", ti_steps=2, mcti_steps=0,
                             **{"tokens.num_vectors": 2, "data.num_classes": 4})
  result = train.train(config, log=lambda _: None)
  setup = result["setup"]
  tokens, manifest = export.load_tokens(result["exports"]["ti"], expected_width=32)
  assert [c["token"] for c in manifest["classes"]] == [f"<cls-{k}>" for k in range(4)]

  pipe = StableDiffusionPipeline.from_pretrained(str(tiny_checkpoint / "sd"), safety_checker=None)
  for c in manifest["classes"]:
    pipe.load_textual_inversion(str(result["exports"]["ti"] / c["file"]))
  prompt = "a photo of a <cls-3> next to a <cls-1>"
  converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
  ids = pipe.tokenizer(converted, padding="max_length", max_length=77, return_tensors="pt").input_ids
  with torch.no_grad():
    want = pipe.text_encoder(ids)[0].numpy()

  ct = setup.class_tokens
  ours_ids = jnp.asarray(ids.numpy(), jnp.int32)
  np.testing.assert_array_equal(np.asarray(ours_ids), np.asarray(
      pipeline.tokenizer.encode(setup.sd.tokenizer, [ct.expand(prompt)])))
  from mcti_jax import tokens as tok
  table = setup.sd.text_encoder.text_model.embeddings.token_embedding.embedding[...]
  embeds = tok.splice(table, ours_ids, jnp.asarray(ct.ids.ravel()), jnp.asarray(tokens.reshape(-1, 32)))
  got, _ = setup.sd.text_encoder(ours_ids, inputs_embeds=embeds)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


# ------------------------------------------------------------ bad input


def _image_folder(root, counts, corrupt=None):
  rng = np.random.default_rng(0)
  for name, n in counts.items():
    (root / name).mkdir(parents=True)
    for i in range(n):
      Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
  if corrupt:
    (root / corrupt).write_bytes(b"not a png")
  return root


@pytest.mark.parametrize("counts, corrupt, message", [
    ({"cat": 5, "dog": 0}, None, r"dog contains no images"),
    ({"cat": 5, "dog": 3}, None, r"dog.*3.*5|dog.*has 3"),
    ({"cat": 5, "dog": 5}, "dog/3.png", r"dog/3\.png"),
])
def test_bad_image_folders_fail_clearly_and_leave_nothing(tiny_checkpoint, tmp_path, counts, corrupt, message):
  root = _image_folder(tmp_path / "images", counts, corrupt)
  config = tiny_train_config(tiny_checkpoint, tmp_path / "run", **{"data.source": "folder", "data.root": str(root)})
  with pytest.raises(D.DataError, match=message):
    train.train(config, log=lambda _: None)
  assert not (tmp_path / "run").exists()
  assert not list((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else True


def test_unknown_tfds_dataset_fails_clearly(tiny_checkpoint, tmp_path):
  config = tiny_train_config(tiny_checkpoint, tmp_path / "run", **{"data.source": "tfds", "data.name": "no_such_ds",
                                                                  "data.data_dir": str(tmp_path)})
  with pytest.raises(D.DataError, match="no_such_ds"):
    train.train(config, log=lambda _: None)
  assert not (tmp_path / "run").exists()


def test_cli_refuses_an_unknown_config_field():
  proc = subprocess.run([sys.executable, "-m", "mcti_jax.cli", "train", "--config", "configs/mcti.py:tiny",
                         "--config.no_such_field=1"], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode != 0 and "no field" in proc.stderr and "no_such_field" in proc.stderr
