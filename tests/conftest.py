"""Shared test helpers. Tests run on CPU with 8 simulated devices (see Makefile)."""

import os
import socket
import subprocess
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from mcti_jax.guides import Transform

ROOT = Path(__file__).resolve().parents[1]

# Identical programs compiled by separate runs (e.g. a resumed training run) come from disk.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "mcti_jax_test_jit_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def perturb_params(model: nnx.Module, seed: int = 0, std: float = 0.05) -> nnx.Module:
  """Add noise to every parameter, so zero biases and unit norm scales can't hide a layout bug."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  leaves = [x + rng.normal(0.0, std, x.shape).astype(x.dtype) for x in leaves]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def max_abs_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(autouse=True)
def _torch_threads():
  """Keep torch from oversubscribing the 2 cores that jax also uses."""
  try:
    import torch
    torch.set_num_threads(2)
  except ImportError:
    pass
  yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
  """Random tiny CLIP + SD checkpoints in the Hugging Face layouts: <root>/clip, <root>/sd."""
  from mcti_jax.tiny import checkpoints as tiny_checkpoints
  root = tmp_path_factory.mktemp("tiny")
  tiny_checkpoints.make_random_checkpoints(root, seed=0)
  return root


def tiny_train_config(checkpoint: Path, workdir: Path, **overrides):
  """mcti:tiny on the random checkpoint, with a short schedule."""
  from mcti_jax.configs import mcti
  c = mcti.get_config("tiny")
  c.model.sd_path, c.model.clip_path = str(checkpoint / "sd"), str(checkpoint / "clip")
  c.workdir, c.data.cache_dir = str(workdir), str(workdir.parent / "cache")
  c.phase.ti.steps, c.phase.mcti.steps, c.log_every, c.checkpoint_every = 4, 4, 2, 2
  return set_fields(c, overrides)


def crash_after(config, step: int) -> None:
  """train.train(config), crashing right after `step` (as a killed process would: its last checkpoint stays)."""
  from mcti_jax.training import train

  class Crashed(Exception):
    pass

  def crash(done):
    if done == step:
      raise Crashed

  with pytest.raises(Crashed):
    train.train(config, on_step=crash, log=lambda _: None)


def set_fields(config, overrides: dict):
  """config with each dotted field of `overrides` ("phase.ti.steps": 2) set; returns it."""
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def train_keeping_setup(config, **kwargs):
  """train.train(config), and the Setup it prepared (models, shot data) for tests to look into."""
  from mcti_jax.training import train
  seen, prepare = [], train.prepare  # the name train.train calls
  train.prepare = lambda *a, **k: seen.append(prepare(*a, **k)) or seen[-1]
  try:
    result = train.train(config, log=lambda _: None, **kwargs)
  finally:
    train.prepare = prepare
  return result, seen[0]


def free_port() -> int:
  """A localhost TCP port nobody listens on (now)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture
def small_disk(tmp_path):
  """A 1 MiB file system of its own (a tmpfs), to be filled up; skipped where mounting isn't allowed."""
  mount = tmp_path / "small_disk"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
    pytest.skip("filling a disk needs a tmpfs mount (root with CAP_SYS_ADMIN)")
  yield mount
  subprocess.run(["umount", str(mount)], check=True)


# ------------------------------------------------------------------ shared by several test folders

# Every layer type and both paddings; the second net pools globally instead of flattening.
FLAT_NET = [
    {"type": "conv", "name": "conv1", "features": 4, "kernel": 3},
    {"type": "relu"},
    {"type": "max_pool", "window": 2},
    {"type": "conv", "name": "conv2", "features": 5, "kernel": [2, 3], "stride": 2, "padding": "VALID"},
    {"type": "relu"},
    {"type": "flatten"},
    {"type": "dense", "name": "fc", "features": 3},
]
POOLED_NET = [
    {"type": "conv", "name": "c", "features": 6, "kernel": 3, "stride": 2},
    {"type": "global_mean_pool"},
    {"type": "dense", "name": "fc", "features": 3},
]
NAMES = ("a", "b", "c")
GREY = Transform(resize=12, crop=(10, 8), grayscale=True, mean=(0.4,), std=(0.3,))


def random_classifier(layers=FLAT_NET, transform=GREY, seed=0):
  from mcti_jax.guides import file as cfile
  c = cfile.init(layers, NAMES, transform, seed)
  rng = np.random.default_rng(seed)  # nonzero biases too
  return c.replace(params={k: np.asarray(v) + 0.1 * rng.normal(size=v.shape).astype(np.float32)
                           for k, v in c.params.items()})


def dct_config(tiny_checkpoint, workdir, classifier_folder, **overrides):
  from mcti_jax.configs import dct as dct_configs
  c = dct_configs.get_config("tiny")
  base = tiny_train_config(tiny_checkpoint, workdir)  # the random checkpoint's paths
  c.model.sd_path, c.model.clip_path = base.model.sd_path, base.model.clip_path
  c.workdir, c.data.cache_dir = str(workdir), base.data.cache_dir
  c.classifier.path, c.classifier.targets = str(classifier_folder), (2, 0, 1)
  c.phase.dct.update(steps=3, sampling_steps=10, images_per_update=2, epoch_size=2, guidance=3.0)
  c.data.class_names = None  # the classifier's names of its targets
  c.log_every = c.checkpoint_every = 1
  return set_fields(c, overrides)


def random_export(checkpoint, folder):
  """Random tokens of 3 classes for the random tiny checkpoint, exported as `mcti train` does."""
  from mcti_jax.tokens import export
  from mcti_jax.tokens import placeholders as tok
  from mcti_jax.models import pipeline
  sd = pipeline.load_stable_diffusion(checkpoint / "sd")
  class_tokens = tok.add_class_tokens(sd.tokenizer, 3, 1)
  vectors = np.random.default_rng(0).normal(0, 0.1, (3, 1, sd.text_width)).astype(np.float32)
  info = {"base_model": str(checkpoint / "sd"), "clip_model": str(checkpoint / "clip"), "pooling": "eos"}
  export.export_tokens(folder, vectors, class_tokens, ["a", "b", "c"], info)
  return folder
