"""Shared test helpers. Tests run on CPU with 8 simulated devices (see Makefile)."""

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

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
  """configs/mcti.py:tiny on the random checkpoint, with a short schedule."""
  import mcti
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
