"""A manifest names its models without the training machine's paths: hub ids as they are, the package's own models
by their place in the package, other folders relative to the export, so an export moved with its models works."""

import json
import shutil
from pathlib import Path

import numpy as np

import mcti_jax
from mcti_jax.tokens import export, reexport
from mcti_jax.tokens import placeholders as tok

TINY_SD = Path(mcti_jax.__file__).resolve().parent / "assets" / "tiny" / "sd"


def _export(folder: Path, base_model: str, clip_model: str) -> Path:
  class_tokens = tok.ClassTokens(tok.token_names(2, 1), np.arange(2, dtype=np.int32).reshape(2, 1),
                                 np.ones(2, np.int32), None)
  tokens = np.random.default_rng(0).normal(size=(2, 1, 8)).astype(np.float32)
  export.export_phases(folder, {"ti": tokens}, class_tokens, ["cat", "dog"],
                       {"base_model": base_model, "clip_model": clip_model})
  return folder / "ti"


def _manifest(folder: Path) -> dict:
  return json.loads((folder / export.MANIFEST).read_text())


def test_hub_ids_package_models_and_local_folders_are_named_so_that_they_resolve(tmp_path):
  (tmp_path / "models" / "clip").mkdir(parents=True)
  folder = _export(tmp_path / "run" / "export", "someone/sd-model", str(tmp_path / "models" / "clip"))
  m = _manifest(folder)
  assert m["base_model"] == "someone/sd-model"
  assert m["clip_model"] == "../../../models/clip"  # from run/export/ti/
  assert str(tmp_path) not in json.dumps(m)
  assert export.manifest_models(m, folder) == {"base_model": "someone/sd-model",
                                               "clip_model": str((tmp_path / "models" / "clip").resolve())}
  packaged = _export(tmp_path / "other", str(TINY_SD), "someone/clip")
  assert _manifest(packaged)["base_model"] == "mcti_jax:assets/tiny/sd"
  assert export.manifest_models(_manifest(packaged), packaged)["base_model"] == str(TINY_SD)


def test_an_export_moved_with_its_models_still_finds_them(tmp_path):
  (tmp_path / "a" / "models" / "sd").mkdir(parents=True)
  _export(tmp_path / "a" / "run" / "export", str(tmp_path / "a" / "models" / "sd"), "someone/clip")
  shutil.move(tmp_path / "a", tmp_path / "b")
  moved = tmp_path / "b" / "run" / "export" / "ti"
  assert export.manifest_models(_manifest(moved), moved)["base_model"] == str((tmp_path / "b" / "models" / "sd"))


def test_an_older_manifests_absolute_paths_are_read_as_they_are(tmp_path):
  m = {"base_model": "/somewhere/sd", "clip_model": "openai/clip-vit-large-patch14"}
  assert export.manifest_models(m, tmp_path) == m
  assert export.manifest_models({}, tmp_path) == {"base_model": None, "clip_model": None}


def test_reexport_into_another_folder_names_the_same_models_from_there(tmp_path):
  (tmp_path / "models" / "sd").mkdir(parents=True)
  _export(tmp_path / "run" / "export", str(tmp_path / "models" / "sd"), str(TINY_SD.parent / "clip"))
  out = reexport.reexport(tmp_path / "run" / "export", tmp_path / "elsewhere" / "deeper" / "export")["ti"]
  m = _manifest(out)
  assert m["base_model"] == "../../../../models/sd" and m["clip_model"] == "mcti_jax:assets/tiny/clip"
  assert export.manifest_models(m, out)["base_model"] == str((tmp_path / "models" / "sd").resolve())
