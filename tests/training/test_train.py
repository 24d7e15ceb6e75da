"""The vectorised trainer on tiny random models and 8 simulated CPU devices."""

import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import ROOT, crash_after, tiny_train_config, train_keeping_setup
from mcti_jax import data as D
from mcti_jax.tokens import export
from mcti_jax.training import phases, train
from mcti_jax.training import setup as setup_lib
from mcti_jax import tiny
from mcti_jax.training import runs as run_record  # `runs` is the fixture below
from mcti_jax.classify import clip_head
from mcti_jax.errors import ConfigError, MctiError
from mcti_jax.methods import mcti
from mcti_jax.models import clip as clip_lib
from mcti_jax.models import pipeline
from mcti_jax.models.frozen import freeze
from mcti_jax.training.step import Context, Settings, ShotData, TrainState, class_objective, make_optimizer, train_step


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
    out[devices], out[f"setup{devices}"] = train_keeping_setup(config)
    out[f"config{devices}"] = config
  return out


def _tokens(result, phase):
  return export.load_tokens(result.exports[phase])[0]


@pytest.mark.slow
def test_eight_devices_equal_one_device_with_padding(runs):
  assert runs["setup8"].num_padded == 8 and runs["setup1"].num_padded == 5
  for phase in ("ti", "mcti"):
    a, b = _tokens(runs[8], phase), _tokens(runs[1], phase)
    assert a.shape == (5, 1, 32)
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=0)
  init = np.asarray(runs["setup1"].init_tokens)
  np.testing.assert_array_equal(runs[1].tokens["mcti"], _tokens(runs[1], "mcti"))  # the result holds the export
  assert np.abs(_tokens(runs[1], "mcti") - init).max() > 1e-4  # it trained at all


@pytest.mark.slow
def test_backbone_is_bit_identical_after_training(runs):
  setup = runs["setup8"]
  fresh = pipeline.load_stable_diffusion(runs["config8"].model.sd_path)
  for trained, loaded in ((setup.sd.unet, fresh.unet), (setup.sd.text_encoder, fresh.text_encoder)):
    for a, b in zip(jax.tree.leaves(freeze(trained).params), jax.tree.leaves(freeze(loaded).params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_tokens(runs, tmp_path):
  config = runs["config8"].copy_and_resolve_references()
  config.workdir = str(tmp_path / "run")

  crash_after(config, 5)
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


@pytest.mark.slow
def test_changed_settings_are_refused_in_an_existing_workdir(runs):
  config = runs["config8"].copy_and_resolve_references()
  old_lr, config.phase.mcti.lr = config.phase.mcti.lr, 1e-3
  with pytest.raises(ConfigError, match=re.escape(f"other settings or data (config.phase.mcti.lr: {old_lr} -> 0.001)")):
    train.train(config, log=lambda _: None)


@pytest.mark.slow
@pytest.mark.parametrize("changes", [
    {"data.resolution": 8}, {"data.flip": True}, {"tokens.init_word": "number"}, {"data.shot_seed": 7},
    {"templates": "a photo of a {}"}, {"model.pooling": "argmax"}, {"data.source": "folder"},
    {"phase.mcti.beta": 0.5}, {"phases": ("ti",)},
])
def test_every_setting_that_changes_the_result_is_checked_before_the_models_load(runs, tmp_path, changes):
  """The resume check fails closed: fields not listed as resumable are refused (some never were before)."""
  config = runs["config8"].copy_and_resolve_references()
  if changes.get("data.source") == "folder":
    changes["data.root"] = str(_image_folder(tmp_path / "images", {"a": 5, "b": 5, "c": 5, "d": 5, "e": 5}))
  for key, value in changes.items():
    *parents, leaf = key.split(".")
    parent = config
    for name in parents:
      parent = parent[name]
    parent[leaf] = value
  logs = []
  with pytest.raises(ConfigError, match="other settings or data") as e:
    train.train(config, log=logs.append)
  assert all(f"config.{k}" in str(e.value) for k in changes if k != "data.root")  # root: by the data's hash
  assert not any("loading" in line for line in logs)


def test_changed_shot_files_are_refused(tiny_checkpoint, tmp_path):
  """Same config, same paths, one shot image edited: the data's fingerprint refuses the old run."""
  root = _image_folder(tmp_path / "images", {"cat": 5, "dog": 5})
  config = tiny_train_config(tiny_checkpoint, tmp_path / "run", **{"data.source": "folder", "data.root": str(root)})

  class Recorded(Exception):
    pass

  def record_and_stop(signature):  # what train() records, without loading the models
    run_record.record(tmp_path / "run", signature)
    raise Recorded

  def check_and_stop(signature):  # the check train() makes, likewise
    run_record.check_resumable(tmp_path / "run", signature)
    raise Recorded

  for check in (record_and_stop, check_and_stop):  # the same config and data resume...
    with pytest.raises(Recorded):
      setup_lib.prepare(config, log=lambda _: None, check_signature=check)
  Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(root / "dog" / "3.png")  # ...an edited shot does not
  with pytest.raises(ConfigError, match=r"fingerprints\.data"):
    train.train(config, log=lambda _: None)


@pytest.mark.slow
def test_resumable_changes_resume_and_extra_steps_extend_the_run(runs, tmp_path):
  work = tmp_path / "moved"
  shutil.copytree(runs["config8"].workdir, work)
  config = runs["config8"].copy_and_resolve_references()
  config.workdir, config.log_every, config.checkpoint_every = str(work), 4, 3
  logs = []
  train.train(config, log=logs.append)
  assert any("already holds a finished run" in line for line in logs)
  config.phase.mcti.steps = 6
  logs.clear()
  steps = []
  train.train(config, log=logs.append, on_step=steps.append)
  assert any("resumed from the checkpoint at step 8/10" in line for line in logs) and steps == [9, 10]
  config.phase.mcti.steps = 5  # fewer steps than the checkpoint holds: not an extension
  with pytest.raises(ConfigError, match="config.phase.mcti.steps: 6 -> 5"):
    train.train(config, log=lambda _: None)


@pytest.mark.parametrize("field, value", [("phase.ti.steps", -5), ("checkpoint_every", 0), ("log_every", 0),
                                          ("phase.mcti.lr", 0.0), ("data.n_shots", 0), ("model.dtype", "float64"),
                                          ("phase.mcti.beta", float("nan"))])
def test_bad_numbers_fail_before_anything_loads_or_is_written(tiny_checkpoint, tmp_path, field, value):
  config = tiny_train_config(tiny_checkpoint, tmp_path / "run", **{field: value})
  logs = []
  with pytest.raises(ConfigError, match=re.escape(f"config.{field}={value!r} must be")):
    train.train(config, log=logs.append)
  assert logs == [] and not (tmp_path / "run").exists()


def test_a_workdir_of_an_older_version_is_refused_clearly(tiny_checkpoint, tmp_path):
  """run.json version 2 (before config.phases): not resumed, and the message says why and what to do."""
  config = tiny_train_config(tiny_checkpoint, tmp_path / "run")
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "run.json").write_text(json.dumps({"version": 2, "config": {"ti_steps": 4, "mcti_steps": 4}}))
  logs = []
  with pytest.raises(ConfigError, match=r"run\.json version 2; this one writes 3.*Use a new --config\.workdir"):
    train.train(config, log=logs.append)
  assert not any("loading" in line for line in logs)


def test_more_classes_than_the_data_has_are_refused(tiny_checkpoint, tmp_path):
  config = tiny_train_config(tiny_checkpoint, tmp_path / "run", **{"data.num_classes": 11})
  with pytest.raises(ConfigError, match="data.num_classes=11.*only 10 classes"):
    train.train(config, log=lambda _: None)


# ------------------------------------------------------------ what a crash leaves


@pytest.mark.slow
def test_a_crash_between_phases_leaves_no_partial_export_and_exports_are_readable(runs, tmp_path, monkeypatch):
  """All phases are exported in one step; an export folder gets the umask's mode, not mkdtemp's 0700."""
  import safetensors.numpy
  work = tmp_path / "run"
  shutil.copytree(runs["config8"].workdir, work)
  shutil.rmtree(work / "export")
  config = runs["config8"].copy_and_resolve_references()
  config.workdir = str(work)
  save_file = safetensors.numpy.save_file

  def full_disk_at_mcti(tensors, path, **kw):
    if "mcti" in Path(path).parts:
      raise OSError(28, "No space left on device")
    return save_file(tensors, path, **kw)

  monkeypatch.setattr(safetensors.numpy, "save_file", full_disk_at_mcti)
  with pytest.raises(OSError, match="No space"):
    train.train(config, log=lambda _: None)
  assert not (work / "export").exists()
  monkeypatch.setattr(safetensors.numpy, "save_file", save_file)
  old_mask = os.umask(0o022)
  try:
    result = train.train(config, log=lambda _: None)
  finally:
    os.umask(old_mask)
  for phase in ("ti", "mcti"):
    np.testing.assert_array_equal(_tokens(result, phase), _tokens(runs[8], phase))
  for folder in (work / "export", work / "export" / "mcti" / "classes" / "0000"):
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


@pytest.mark.slow
def test_a_full_disk_stops_the_run_at_the_failed_save_with_one_message(runs, tmp_path, small_disk, capfd):
  config = runs["config8"].copy_and_resolve_references()
  config.workdir = str(tmp_path / "run")
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "checkpoints").symlink_to(small_disk)
  steps = []

  def fill_the_disk_after_step_1(step):
    steps.append(step)
    if step == 1:
      fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
      with contextlib.suppress(OSError):
        while os.write(fd, bytes(65536)):
          pass
      os.close(fd)

  with pytest.raises(MctiError, match=r"could not save the checkpoint of step 2 in .*checkpoints.*resumes") as e:
    train.train(config, log=lambda _: None, on_step=fill_the_disk_after_step_1)
  assert steps == [1] and "No space left on device" in str(e.value)
  assert "Traceback" not in capfd.readouterr().err  # orbax's threads would print hundreds of lines
  assert not list(small_disk.glob("*.orbax-checkpoint-tmp*"))  # the failed save's temporary folder is gone


# ------------------------------------------------------------ the command, as a person runs it


def _mcti_train(*flags, **popen) -> subprocess.Popen:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
         "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,  # the programs the fixtures compiled
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
  env.pop("MCTI_DEBUG", None)
  return subprocess.Popen([sys.executable, "-m", "mcti_jax.cli", "train", "--config", "mcti:tiny", *flags],
                          cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _flags(config) -> list[str]:
  fields = ("workdir", "data.cache_dir", "model.sd_path", "model.clip_path", "data.num_classes", "num_devices",
            "phase.ti.steps", "phase.mcti.steps", "log_every", "checkpoint_every")
  return [f"--config.{f}={run_record.config_value(config, f)}" for f in fields]


@pytest.mark.parametrize("flags, message", [
    (["--config.data.num_classes=11"], "data.num_classes=11, but digits"),
    (["--config.data.source=folder", "--config.data.root=/no/such/folder"], "/no/such/folder"),
    (["--config.checkpoint_every=0"], "config.checkpoint_every=0 must be an integer >= 1"),
    (["--config.model.guidance=-1.0"], "config.model.guidance=-1.0 must be a finite number >= 0"),
])
def test_bad_input_fails_before_the_models_load_in_one_line(tmp_path, flags, message):
  proc = _mcti_train(f"--config.workdir={tmp_path / 'run'}", *flags)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 1 and "loading" not in out, (out, err)
  assert err.startswith("mcti train: error: ") and message in err and len(err.splitlines()) == 1, err
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_next_step_and_the_run_resumes_to_the_same_tokens(runs, tmp_path):
  config = runs["config8"].copy_and_resolve_references()
  config.workdir, config.phase.mcti.steps, config.checkpoint_every = str(tmp_path / "stopped"), 16, 100
  proc = _mcti_train(*_flags(config))
  lines = []
  for line in proc.stdout:  # the step is compiled before the progress bar starts, and says so
    lines.append(line)
    if line.startswith("compiled the mcti step"):
      break
  metrics = tmp_path / "stopped" / "metrics.jsonl"
  deadline = time.time() + 60
  while time.time() < deadline and not (metrics.is_file() and metrics.read_text()):  # it has taken steps
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert any(line.startswith("compiling the ti step (ti) ...") for line in lines), lines
  assert proc.returncode == 128 + signal.SIGTERM, err
  stopped_at = int(re.search(r"stopped at step (\d+)/20; the checkpoint is saved", err.splitlines()[-1])[1])
  assert "Traceback" not in err and "SIGTERM: stopping after this step" in out + err

  steps = []
  resumed = train.train(config, log=lambda _: None, on_step=steps.append)
  assert steps == list(range(stopped_at + 1, 21))
  config.workdir = str(tmp_path / "uninterrupted")
  uninterrupted = train.train(config, log=lambda _: None)
  for phase in ("ti", "mcti"):
    np.testing.assert_array_equal(_tokens(resumed, phase), _tokens(uninterrupted, phase))


# ------------------------------------------------------------ K classes at once = K one-class runs


@pytest.mark.slow
def test_k_classes_in_one_step_equal_k_one_class_runs(tiny_checkpoint, tmp_path):
  config = tiny_train_config(tiny_checkpoint, tmp_path / "run", num_devices=1, batch_per_class=2,
                             **{"data.num_classes": 3})
  setup = setup_lib.prepare(config, log=lambda _: None)
  backbone, template_ids = setup_lib.make_backbone(setup), jnp.asarray(setup.template_ids["mcti"])
  optimizer = make_optimizer(config.phase.mcti.lr)
  mcti_phase = phases.plan(config)[1]
  step = jax.jit(functools.partial(train_step, cfg=train.step_config(setup, mcti_phase), optimizer=optimizer,
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


@pytest.mark.slow
def test_reg_gradient_reaches_the_tokens(tiny_checkpoint, tmp_path):
  config = tiny_train_config(tiny_checkpoint, tmp_path / "run", num_devices=1, **{"data.num_classes": 3})
  setup = setup_lib.prepare(config, log=lambda _: None)
  backbone, d = setup_lib.make_backbone(setup), setup.data
  mcti_phase = phases.plan(config)[1]
  cfg = train.step_config(setup, mcti_phase)
  settings = Settings(cfg.settings)

  ctx = Context(backbone=backbone, image_features=d.image_features, valid=d.valid,
                template_ids=jnp.asarray(setup.template_ids["mcti"]), step=jnp.int32(0),
                run_key=jax.random.PRNGKey(0), pooling=cfg.pooling, first_placeholder_id=cfg.first_placeholder_id,
                latent_shape=cfg.latent_shape)

  def reg_of_class_1(vectors):
    terms, _ = class_objective(vectors, 1, jax.random.PRNGKey(0), d.latent_mean[1], d.latent_logvar[1], ctx,
                               settings, cfg)
    return terms["reg"]

  grad = jax.jit(jax.grad(reg_of_class_1))(setup.init_tokens[1])  # one compiled program, not op by op
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 1e-6

  # The tiny SD's text encoder is its CLIP's text tower, as SD 1.x's is CLIP ViT-L/14's: detected by content, and
  # MC-TI then takes g_k from the text encoder's pass. Both ways must give the same terms and gradients.
  shared = backbone
  assert shared.text_shared
  other = nnx.clone(setup.clip)
  other.text_model.config = dataclasses.replace(other.text_model.config, bos_token_id=0, eos_token_id=2)
  assert clip_lib.same_text_tower(setup.sd.text_encoder, other)  # SD 1.5's legacy ids: the pooling id decides
  other.text_model.final_layer_norm.bias.value += 1e-3
  assert not clip_lib.same_text_tower(setup.sd.text_encoder, other)

  def terms_and_grad(backbone):
    def loss(vectors):
      terms, _ = class_objective(vectors, 1, jax.random.PRNGKey(0), d.latent_mean[1], d.latent_logvar[1],
                                 ctx.replace(backbone=backbone), settings, cfg)
      return mcti.loss(terms, settings), terms
    return jax.jit(jax.grad(loss, has_aux=True))(setup.init_tokens[1])

  grad_shared, terms_shared = terms_and_grad(shared)
  grad_full, terms_full = terms_and_grad(shared.replace(text_shared=False))
  for name in ("mse", "reg"):
    np.testing.assert_allclose(terms_shared[name], terms_full[name], rtol=1e-6)
  np.testing.assert_allclose(grad_shared, grad_full, atol=1e-6 * np.abs(grad_full).max())
  assert np.abs(grad_shared).max() > 1e-6


def test_reg_train_accuracy_equals_a_loop_by_hand():
  rng = np.random.default_rng(1)
  g, f = rng.normal(size=(4, 6)), rng.normal(size=(4, 3, 6))
  hits = [np.argmax([f[j, n] @ g[k] / np.linalg.norm(f[j, n]) for j in range(4)]) == k
          for k in range(4) for n in range(3)]
  assert float(mcti.reg_train_accuracy(jnp.asarray(g), jnp.asarray(f))) == pytest.approx(np.mean(hits))


@pytest.mark.slow
def test_mcti_raises_the_train_accuracy_of_its_classifier(tmp_path):
  """Same warm-up, then 60 steps with beta=1 (MC-TI) or beta=0 (TI only), on a fixed seed.

  On the embedded pretrained checkpoint: a random CLIP's image features of different digits are too alike to learn.
  """
  accuracy = {}
  for beta in (0.0, 1.0):
    config = tiny_train_config(tiny.DEFAULT_OUT, tmp_path / f"beta{beta}", log_every=10, checkpoint_every=100,
                               **{"phase.mcti.beta": beta, "phase.ti.steps": 2, "phase.mcti.steps": 60,
                                  "phase.ti.lr": 5e-3, "phase.mcti.lr": 5e-3})
    result, setup = train_keeping_setup(config)
    tokens = result.tokens["mcti"]
    texts = clip_head.class_text_features(freeze(setup.clip), jnp.asarray(tokens),
                                          jnp.asarray(setup.template_ids["mcti"]),
                                          first_id=int(setup.class_tokens.ids[0, 0]))
    shots = setup.data.image_features[:10, :, 0]  # [K, N, P], no flips in the tiny config
    accuracy[beta] = float(mcti.reg_train_accuracy(texts, shots))
  assert accuracy[1.0] > accuracy[0.0] + 0.3, accuracy


# ------------------------------------------------------------ export


@pytest.mark.slow
def test_exported_tokens_load_in_diffusers_and_encode_equally(tiny_checkpoint, tmp_path):
  import torch
  from diffusers import StableDiffusionPipeline

  config = tiny_train_config(tiny_checkpoint, tmp_path / "run",
                             **{"tokens.num_vectors": 2, "data.num_classes": 4, "phase.ti.steps": 2,
                                "phase.mcti.steps": 0})
  result, setup = train_keeping_setup(config)
  assert sorted(result.exports) == ["ti"]  # a phase of 0 steps is neither trained nor exported
  tokens, manifest = export.load_tokens(result.exports["ti"], expected_width=32)
  assert [c["token"] for c in manifest["classes"]] == [f"<cls-{k}>" for k in range(4)]

  pipe = StableDiffusionPipeline.from_pretrained(str(tiny_checkpoint / "sd"), safety_checker=None)
  for c in manifest["classes"]:
    pipe.load_textual_inversion(str(result.exports["ti"] / c["file"]))
  prompt = "a photo of a <cls-3> next to a <cls-1>"
  converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
  ids = pipe.tokenizer(converted, padding="max_length", max_length=77, return_tensors="pt").input_ids
  with torch.no_grad():
    want = pipe.text_encoder(ids)[0].numpy()

  ct = setup.class_tokens
  ours_ids = jnp.asarray(ids.numpy(), jnp.int32)
  np.testing.assert_array_equal(np.asarray(ours_ids), np.asarray(
      pipeline.tokenizer.encode(setup.sd.tokenizer, [ct.expand(prompt)])))
  from mcti_jax.tokens import placeholders as tok
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
  proc = subprocess.run([sys.executable, "-m", "mcti_jax.cli", "train", "--config", "mcti:tiny",
                         "--config.no_such_field=1"], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode != 0 and "no field" in proc.stderr and "no_such_field" in proc.stderr
