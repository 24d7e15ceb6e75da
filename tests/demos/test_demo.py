"""`mcti demo` with a short schedule: its files, and where its numbers come from.

The mechanics are tested on the random tiny checkpoint; the committed
pretrained one is checked in test_pretrain_tiny.py.
"""

import importlib
import json
import re

import numpy as np
import pytest

from mcti_jax.configs import demo as demo_config
from mcti_jax.demos import demo
from mcti_jax.evaluation import evaluate
from mcti_jax.tiny import judges


@pytest.fixture(scope="module")
def quick_demo(tiny_checkpoint, tmp_path_factory):
  config = demo_config.get_config("quick")
  workdir = tmp_path_factory.mktemp("demo")
  config.workdir, config.train.data.cache_dir = str(workdir), str(workdir / "cache")
  config.train.model.sd_path = str(tiny_checkpoint / "sd")
  config.train.model.clip_path = str(tiny_checkpoint / "clip")
  config.evals.dic_fewshot.max_images = 10
  return demo.run(config, log=lambda _: None), workdir, config


@pytest.mark.slow
def test_demo_writes_its_report_and_files(quick_demo):
  _, workdir, _ = quick_demo
  for name in ("report.md", "results.json", "generated_mcti.png", "generated_ti.png", "accuracy_vs_shots.png",
               "token_pca.png", "5shot/seed1/export/mcti/tokens.safetensors", "5shot/seed1/loss.png"):
    assert (workdir / name).is_file(), name
  report = (workdir / "report.md").read_text()
  for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
    assert (workdir / image).is_file(), image
  # A :quick preset's reports say that they are a smoke test; the full preset's don't.
  assert report.split("\n")[2] == evaluate.SMOKE_TEST and evaluate.SMOKE_TEST in (workdir / "results.md").read_text()
  assert not demo_config.get_config("full").smoke_test


@pytest.mark.slow
def test_demo_numbers_are_those_of_results_json(quick_demo):
  _, workdir, config = quick_demo
  results = json.loads((workdir / "results.json").read_text())
  report = (workdir / "report.md").read_text()
  table = re.search(r"\| method \| all \(10-way\).*?\n\n", report, re.S).group(0).strip().splitlines()[2:]
  method_of = {v: k for k, v in evaluate.labels_of(config).items()}
  assert len(table) == 5
  for line in table:
    name, *cells = [c.strip() for c in line.strip("|").split("|")]
    for cell, metric in zip(cells, ("top1", "top1_known", "top1_unknown")):
      values = [r[metric] for r in results["rows"] if r["method"] == method_of[name]]
      assert cell == f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"
  gen = results["generation"]
  for phase, name in (("ti", "TI"), ("mcti", "MC-TI")):
    row = re.search(rf"^\| {re.escape(name)} \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", report, re.M)
    assert row.group(1) == f"{100 * gen[phase]['known']:.1f}" and row.group(2) == f"{100 * gen[phase]['unknown']:.1f}"
    assert row.group(3) == f"{np.mean(gen[phase]['clip_image_similarity']):.3f}"


@pytest.mark.slow
def test_the_judge_is_competent_and_independent():
  judge, heldout_accuracy = judges.logistic()
  assert heldout_accuracy > 0.9  # it knows all ten digits from pixels alone
  from mcti_jax import data as D
  images, labels = D.digits_images()
  held = D.digits_split(labels)["heldout"]
  out = demo.judge_generation(judge, images[held][:40].reshape(10, 4, 16, 16, 3), 10)
  predicted = judge.predict(judges.features(images[held][:40]))
  assert out["predicted"] == predicted.reshape(10, 4).tolist()
  np.testing.assert_allclose(out["per_class"], (predicted.reshape(10, 4) == np.arange(10)[:, None]).mean(1))


def test_demo_command_takes_overrides_of_its_default_config():
  import subprocess
  import sys
  from conftest import ROOT
  from mcti_jax import cli
  named = ["mcti demo", "--config", "demo:quick"]
  assert cli.with_default_config(named, "mcti_jax/configs/demo.py") == named
  out = subprocess.run([sys.executable, "-m", "mcti_jax.cli", "demo", "--config.generation.num_images=3", "--help"],
                       cwd=ROOT, capture_output=True, text=True, check=True).stdout
  assert "num_images: 3" in out and "workdir: runs/demo" in out


@pytest.mark.parametrize("file, module", [("demo", "demo"), ("dct_demo", "dct_demo"), ("custom_demo", "custom_demo")])
def test_each_demo_config_names_its_demo_and_an_unknown_kind_is_refused(file, module):
  from mcti_jax import demos
  from mcti_jax.config_files import load_config
  from mcti_jax.errors import ConfigError
  _, config = load_config(file)
  assert demos.KINDS[config.get("kind", "mcti")] == module
  assert callable(importlib.import_module(f"mcti_jax.demos.{module}").run)
  config.unlock()
  config.kind = "mnist"
  with pytest.raises(ConfigError, match=r"config.kind='mnist' names no demo; demos: mcti, dct, custom"):
    demos.run(config)
