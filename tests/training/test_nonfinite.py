"""Non-finite values are an error, never a result: a diverged run, a NaN classifier, strict metrics.jsonl,
and a failed checkpoint save that leaves no debris."""

import contextlib
import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file, save_file

from conftest import ROOT, dct_config, random_classifier, tiny_train_config
from mcti_jax import guides, cli
from mcti_jax.training import train
from mcti_jax.guides import file as cfile
from mcti_jax.errors import MctiError


def _strict_rows(path):
  """metrics.jsonl as a strict JSON parser reads it: a bare NaN or Infinity is an error."""
  def refuse(constant):
    raise ValueError(f"{constant} is not JSON")
  return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _without_progress_bar(err: str) -> str:
  """stderr without tqdm's progress bar (its redrawn lines end in a carriage return)."""
  lines = err.replace("\r", "\n").splitlines()
  return "".join(line + "\n" for line in lines if line.strip() and not line.startswith("train:"))


# ---------------------------------------------------------------- a diverged run


DIVERGING = {"data.num_classes": 2, "num_devices": 1, "phase.ti.steps": 3, "phase.mcti.steps": 0,
             "phase.ti.lr": 1e30, "log_every": 1, "checkpoint_every": 1}


@pytest.mark.slow
def test_a_diverged_run_stops_in_one_line_naming_the_step_and_class_and_keeps_its_last_finite_checkpoint(
    tiny_checkpoint, tmp_path, capfd, monkeypatch):
  """lr=1e30: the first step's tokens are huge but finite; the second step's loss and tokens are NaN."""
  config = tiny_train_config(tiny_checkpoint, tmp_path / "run", **DIVERGING)
  flags = [f"--config.{k}={v}" for k, v in {
      "workdir": config.workdir, "data.cache_dir": config.data.cache_dir, "model.sd_path": config.model.sd_path,
      "model.clip_path": config.model.clip_path, **DIVERGING}.items()]
  monkeypatch.chdir(ROOT)
  monkeypatch.delenv("MCTI_DEBUG", raising=False)
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")  # as conftest has it
  capfd.readouterr()
  with pytest.raises(SystemExit) as e:
    cli.main(["mcti", "train", "--config", "mcti:tiny", *flags])
  err = _without_progress_bar(capfd.readouterr().err)
  assert e.value.code == 1 and len(err.splitlines()) == 1, err
  assert err.startswith("mcti train: error: the ti phase diverged at step 2: class 0 (zero) has a nan loss"), err
  assert "the last finite checkpoint is step 1 in" in err and "--config.phase.ti.lr (now 1e+30)" in err, err
  workdir = tmp_path / "run"
  assert not (workdir / "export").exists()
  manager = ocp.CheckpointManager((workdir / "checkpoints").absolute())
  assert manager.all_steps() == [1]
  saved = manager.restore(1)
  manager.close()
  tokens = np.asarray(saved["state"]["tokens"])
  assert np.isfinite(tokens).all() and np.abs(tokens).max() > 1e20  # the huge step was saved; the NaN one not
  rows = _strict_rows(workdir / "metrics.jsonl")  # the diverged step's row is there, as null
  assert [r["step"] for r in rows] == [1, 2] and np.isfinite(rows[0]["mse"]) and rows[1]["mse"] is None

  # The same command again resumes from step 1 and diverges at the same step, in the same words.
  with pytest.raises(MctiError) as again:
    train.train(config, log=lambda _: None)
  assert str(again.value) == err.removeprefix("mcti train: error: ").strip()
  assert not (workdir / "export").exists()


# ---------------------------------------------------------------- classifiers with NaN or inf weights


def _poisoned_classifier(folder, value):
  """A file classifier in its real format, one weight of conv1 set to `value`."""
  cfile.save(folder, random_classifier())
  tensors = dict(load_file(str(folder / cfile.WEIGHTS_NAME)))
  tensors["conv1.kernel"][0, 0, 0, 1] = value
  save_file(tensors, str(folder / cfile.WEIGHTS_NAME))
  return folder


@pytest.mark.parametrize("value, word", [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "inf")])
def test_a_classifier_with_non_finite_weights_is_refused_at_load_naming_the_file_and_tensor(tmp_path, value, word):
  folder = _poisoned_classifier(tmp_path / "clf", value)
  with pytest.raises(MctiError) as e:
    guides.load({"type": "file", "path": str(folder)})
  message = str(e.value)
  assert str(folder / cfile.WEIGHTS_NAME) in message and "'conv1.kernel'" in message and word in message, message
  assert "\n" not in message


def test_dct_refuses_a_nan_classifier_before_the_models_load(tiny_checkpoint, tmp_path):
  """It trained every token to NaN and exported them, reporting acc=0.3333 (argmax of NaN is class 0)."""
  folder = _poisoned_classifier(tmp_path / "clf", np.nan)
  loading = []
  with pytest.raises(MctiError, match=rf"{folder / cfile.WEIGHTS_NAME}: tensor 'conv1.kernel' holds nan"):
    train.train(dct_config(tiny_checkpoint, tmp_path / "run", folder), log=loading.append)
  assert not any(line.startswith("loading") for line in loading) and not (tmp_path / "run" / "export").exists()


def test_a_clip_classifier_with_non_finite_weights_is_refused_at_load(tiny_checkpoint, tmp_path):
  import shutil
  clip = tmp_path / "clip"
  shutil.copytree(tiny_checkpoint / "clip", clip)
  weights = next(clip.glob("*.safetensors"))
  tensors = dict(load_file(str(weights)))
  name = next(k for k in sorted(tensors) if "visual_projection" in k)
  tensors[name][0, 0] = np.nan
  save_file(tensors, str(weights), metadata={"format": "pt"})
  with pytest.raises(MctiError, match=rf"{clip}.*visual_projection.*nan"):
    guides.load({"type": "clip_zeroshot", "clip_path": str(clip), "class_names": ("zero", "one")})


# ---------------------------------------------------------------- a failed checkpoint save leaves no debris


@pytest.mark.slow
def test_a_full_disk_leaves_no_temporary_checkpoint_and_no_traceback_and_the_rerun_resumes(
    tiny_checkpoint, tmp_path, small_disk, capfd):
  config = tiny_train_config(tiny_checkpoint, tmp_path / "run", **{"data.num_classes": 2, "num_devices": 1,
                                                                    "phase.ti.steps": 3, "phase.mcti.steps": 0,
                                                                    "checkpoint_every": 1})
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "checkpoints").symlink_to(small_disk)
  filler = small_disk / "filler"

  def fill_the_disk_after_step_1(step):
    if step == 1:
      fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
      with contextlib.suppress(OSError):
        while os.write(fd, bytes(65536)):
          pass
      os.close(fd)

  capfd.readouterr()
  with pytest.raises(MctiError, match=r"could not save the checkpoint of step 2 .*\(step 1\)"):
    train.train(config, log=lambda _: None, on_step=fill_the_disk_after_step_1)
  err = capfd.readouterr().err
  assert "Traceback" not in err and "Event loop is closed" not in err, err
  assert sorted(p.name for p in small_disk.iterdir()) == ["1", "filler"]  # no 2.orbax-checkpoint-tmp-*
  filler.unlink()
  (small_disk / "2.orbax-checkpoint-tmp-1234" / "default").mkdir(parents=True)  # as a kill -9 during a save leaves
  result = train.train(config, log=lambda _: None)
  assert sorted(p.name for p in small_disk.iterdir()) == ["2", "3"]  # max_to_keep=2
  assert np.isfinite(result.tokens["ti"]).all()
  assert "Traceback" not in capfd.readouterr().err


@pytest.mark.slow
def test_a_second_ctrl_c_during_a_save_leaves_no_temporary_checkpoint(tiny_checkpoint, tmp_path, monkeypatch, capfd):
  """The second signal raises KeyboardInterrupt wherever the main thread is: here, waiting for the save's writers."""
  config = tiny_train_config(tiny_checkpoint, tmp_path / "run", **{"data.num_classes": 2, "num_devices": 1,
                                                                    "phase.ti.steps": 2, "phase.mcti.steps": 0,
                                                                    "checkpoint_every": 1})
  wait = ocp.CheckpointManager.wait_until_finished
  saving = []

  def interrupted_at_step_2(manager):
    saving.append(sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()))
    if len(saving) == 2:
      raise KeyboardInterrupt
    return wait(manager)

  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", interrupted_at_step_2)
  capfd.readouterr()
  with pytest.raises(KeyboardInterrupt):
    train.train(config, log=lambda _: None)
  assert any(".orbax-checkpoint-tmp" in name for name in saving[1])  # the save of step 2 was under way
  assert not any(".orbax-checkpoint-tmp" in p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
  assert "Traceback" not in capfd.readouterr().err
