"""Exports keep to their own: `mcti export --out` replaces only this run's export, a re-export checks
its manifest against the digest the run recorded, files get the umask's mode, and nothing non-finite is written.

Two tiny "runs" are written with export.export_phases, as `mcti train` writes them; nothing is trained.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from mcti_jax import cli
from mcti_jax.tokens import export, export_command
from mcti_jax.tokens import placeholders as tok
from mcti_jax.errors import MctiError
from mcti_jax.models import hf_io

NAMES = ["cat", "dog", "owl"]
COUNTS = [2, 1, 2]


def _class_tokens(num_classes=3, num_vectors=2, counts=COUNTS):
  ids = np.arange(num_classes * num_vectors, dtype=np.int32).reshape(num_classes, num_vectors)
  return tok.ClassTokens(tok.token_names(num_classes, num_vectors), ids, counts)


def _write_run(workdir, phases, seed):
  rng = np.random.default_rng(seed)
  tokens = {p: rng.normal(0, 0.5, (3, 2, 8)).astype(np.float32) for p in phases}
  export.export_phases(workdir / "export", tokens, _class_tokens(), NAMES, {"base_model": "tiny"},
                       {p: {"method": p} for p in phases})
  return workdir


@pytest.fixture
def runs(tmp_path):
  """(run A with phases ti and mcti, run B with phase dct): two finished runs side by side."""
  return _write_run(tmp_path / "a", ("ti", "mcti"), 0), _write_run(tmp_path / "b", ("dct",), 1)


def _hashes(root):
  """{relative path: sha256 and mode} of every file and folder under `root`."""
  return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                     p.stat().st_mode) for p in sorted(root.rglob("*"))}


def _refused(capsys, argv):
  """The stderr line of `mcti export argv`, which must exit 1 with exactly one line."""
  with pytest.raises(SystemExit) as e:
    cli.main(["mcti", "export", *argv])
  err = capsys.readouterr().err
  assert e.value.code == 1 and err.startswith("mcti export: error: ") and err.count("\n") == 1, err
  return err


# ------------------------------------------------------------ --out replaces only this run's export


@pytest.mark.parametrize("source, out", [("a", "b/export"), ("a/export/mcti", "b/export/dct")])
def test_export_out_refuses_another_runs_export_and_leaves_it_untouched(runs, capsys, source, out):
  root = runs[0].parent
  before = _hashes(root / "b")
  err = _refused(capsys, [str(root / source), "--out", str(root / out)])
  assert f"--out {root / out} holds another export" in err and "pass a new or empty folder" in err
  assert _hashes(root / "b") == before


def test_export_out_that_is_a_file_or_below_one_is_refused_before_anything_is_written(runs, capsys):
  a, root = runs[0], runs[0].parent
  (root / "note.txt").write_text("mine")
  before = _hashes(root)
  err = _refused(capsys, [str(a), "--out", str(root / "note.txt")])
  assert f"--out={root / 'note.txt'} is a file, not a folder" in err
  err = _refused(capsys, [str(a), "--out", str(root / "note.txt" / "tokens")])
  assert f"{root / 'note.txt'}, on the way to --out={root / 'note.txt' / 'tokens'}, is a file" in err
  assert _hashes(root) == before


def test_export_out_rewrites_this_runs_own_earlier_export_and_fills_an_empty_folder(runs, tmp_path):
  a = runs[0]
  (tmp_path / "empty").mkdir()
  export_command.main([str(a), "--out", str(tmp_path / "empty")])
  export_command.main([str(a / "export" / "mcti"), "--out", str(tmp_path / "one")])
  before = {p: _hashes(tmp_path / p) for p in ("empty", "one")}
  export_command.main([str(a), "--out", str(tmp_path / "empty")])  # its own export: rewritten, unchanged
  export_command.main([str(a / "export" / "mcti"), "--out", str(tmp_path / "one")])
  assert {p: _hashes(tmp_path / p) for p in ("empty", "one")} == before
  assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["mcti", "ti"]


# ------------------------------------------------------------ a re-export checks the manifest


def _swap_names(folder):
  manifest = json.loads((folder / export.MANIFEST).read_text())
  first, second = manifest["classes"][0], manifest["classes"][1]
  first["name"], second["name"] = second["name"], first["name"]
  (folder / export.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("where", ["", "export/mcti"])
def test_reexport_refuses_a_manifest_whose_class_names_were_swapped(runs, tmp_path, capsys, where):
  a = runs[0]
  _swap_names(a / "export" / "mcti")
  before = _hashes(a)
  err = _refused(capsys, [str(a / where), "--out", str(tmp_path / "out")])
  assert f"{a / 'export' / 'mcti' / export.MANIFEST}" in err and "digest" in err
  assert _hashes(a) == before and not (tmp_path / "out").exists()


def test_reexport_refuses_another_exports_tokens_under_this_manifest(runs, capsys):
  a, b = runs
  shutil.copy(b / "export" / "dct" / export.COMBINED, a / "export" / "mcti" / export.COMBINED)
  err = _refused(capsys, [str(a)])
  assert "digest" in err and str(a / "export" / "mcti") in err


def _old_export(folder, tokens):
  """An export as written before manifests recorded a digest."""
  folder.mkdir()
  save_file({"tokens": tokens, "num_vectors": np.asarray([2, 2], np.int32)}, str(folder / export.COMBINED))
  classes = [{"index": k, "token": f"<cls-{k}>", "name": n} for k, n in enumerate(["cat", "dog"])]
  (folder / export.MANIFEST).write_text(json.dumps({"num_classes": 2, "num_vectors": 2, "width": 8,
                                                    "classes": classes}))
  return folder


def test_reexport_of_an_export_without_a_digest_needs_trust_manifest(tmp_path, capsys):
  old = _old_export(tmp_path / "old", np.ones((2, 2, 8), np.float32))
  before = _hashes(old)
  err = _refused(capsys, [str(old)])
  assert str(old / export.MANIFEST) in err and "--trust-manifest" in err
  assert _hashes(old) == before
  export_command.main([str(old), "--trust-manifest"])
  manifest = json.loads((old / export.MANIFEST).read_text())
  assert [c["a1111_word"] for c in manifest["classes"]] == ["cls0-cat", "cls1-dog"] and "digest" in manifest
  export_command.main([str(old)])  # now it is vouched for


# ------------------------------------------------------------ modes follow the umask


@pytest.fixture(params=[0o022, 0o002])
def umask(request):
  old = os.umask(request.param)
  yield request.param
  os.umask(old)


def test_every_file_and_folder_of_an_export_gets_the_umasks_mode(tmp_path, umask):
  a = _write_run(tmp_path / "a", ("ti", "mcti"), 0)
  export_command.main([str(a / "export" / "mcti"), "--out", str(tmp_path / "out")])
  hf_io.write_folder(tmp_path / "model", {"config.json": {}, "model.safetensors": hf_io.tensors({"w": np.ones(2)})})
  files = [p for root in ("a", "out", "model") for p in (tmp_path / root).rglob("*")]
  assert any(p.suffix == ".safetensors" for p in files)
  modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files}
  want = {str(p.relative_to(tmp_path)): oct((0o777 if p.is_dir() else 0o666) & ~umask) for p in files}
  assert modes == want


def test_save_safetensors_replaces_a_0600_file_with_the_umasks_mode(tmp_path, umask):
  path = tmp_path / "w.safetensors"
  path.write_text("old")
  os.chmod(path, 0o600)
  hf_io.save_safetensors(path, {"w": np.arange(3, dtype=np.float32)})
  assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~umask)
  assert hf_io.read_safetensors(tmp_path, path.name)[0]["w"].tolist() == [0, 1, 2]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # no temporary file left


# ------------------------------------------------------------ nothing non-finite is exported


def test_export_phases_refuses_non_finite_tokens_naming_the_phase_and_classes(tmp_path):
  tokens = np.zeros((3, 2, 8), np.float32)
  bad = tokens.copy()
  bad[1, 0, 3], bad[2, 1, 0] = np.nan, np.inf
  with pytest.raises(MctiError, match=r"^phase mcti: [^\n]*class 1 \(dog\), class 2 \(owl\) are non-finite[^\n]*$"):
    export.export_phases(tmp_path / "export", {"ti": tokens, "mcti": bad}, _class_tokens(), NAMES)
  assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, not even the ti phase


def test_reexport_refuses_non_finite_tokens(tmp_path, capsys):
  vectors = np.ones((2, 2, 8), np.float32)
  vectors[0, 1, 2] = -np.inf
  old = _old_export(tmp_path / "old", vectors)
  before = _hashes(old)
  err = _refused(capsys, [str(old), "--trust-manifest"])
  assert "non-finite" in err and "class 0 (cat)" in err
  assert _hashes(old) == before
