"""Paths a user gives are checked before any work: text files read as UTF-8 (a byte-order mark dropped), every
"does not exist" told apart from "the wrong kind", and output folders refused at once when they can't be written."""

import contextlib
import json
import os
import shutil
import subprocess

import ml_collections
import numpy as np
import pytest
from conftest import random_export, tiny_train_config

from mcti_jax import cli, config_files, paths
from mcti_jax.retrieval import retrieve
from mcti_jax.retrieval import labels as labels_lib
from mcti_jax.training import token_init, train
from mcti_jax.guides import file as file_classifier
from mcti_jax.data import sources
from mcti_jax.errors import MctiError
from mcti_jax.models import hf_io, pipeline
from mcti_jax.models import tokenizer as tokenizer_lib

CAPTIONS = "three\ndigit four\n"


def refuse_model_loads(monkeypatch):
  """Any model load fails the test: every check here must come before them."""
  def loaded(*args, **kwargs):
    pytest.fail("the models loaded")
  monkeypatch.setattr(pipeline, "load_stable_diffusion", loaded)
  monkeypatch.setattr(pipeline, "load_clip", loaded)


@pytest.fixture
def no_models(monkeypatch):
  refuse_model_loads(monkeypatch)


@contextlib.contextmanager
def read_only(folder):
  """`folder`, made unwritable even for root (chattr +i), else skips: a stand-in for a read-only mount."""
  folder.mkdir()
  if os.geteuid() != 0:
    folder.chmod(0o500)
  elif not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
    pytest.skip("running as root on a filesystem without chattr +i: no folder can be made unwritable")
  try:
    try:
      (folder / "probe").touch()
    except OSError:
      pass
    else:
      pytest.skip(f"{folder} stays writable here (chmod/chattr ignored)")
    yield folder
  finally:
    if os.geteuid() == 0:
      subprocess.run(["chattr", "-i", str(folder)], check=False)
    folder.chmod(0o700)


def one_line_error(capsys, argv) -> str:
  """`mcti ...` exits 1 with one stderr line and no traceback; that line."""
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  err = capsys.readouterr().err
  assert e.value.code == 1, err
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
  return err.strip()


# ------------------------------------------------------------------ text inputs


def test_a_caption_file_with_a_byte_order_mark_starts_the_tokens_where_the_plain_file_does(tiny_checkpoint, tmp_path):
  (tmp_path / "plain.txt").write_text(CAPTIONS, encoding="utf-8")
  (tmp_path / "notepad.txt").write_text(CAPTIONS, encoding="utf-8-sig")  # Notepad's "UTF-8 with BOM"
  assert (tmp_path / "notepad.txt").read_bytes().startswith(b"\xef\xbb\xbf")
  tokenizer = tokenizer_lib.load_tokenizer(tiny_checkpoint / "sd", "tokenizer")
  table = np.random.default_rng(0).normal(size=(len(tokenizer), 8)).astype(np.float32)
  config = tiny_train_config(tiny_checkpoint, tmp_path / "run", **{"tokens.init": "caption"})
  starts = {}
  for name in ("plain", "notepad"):
    captions = token_init.read_captions(tmp_path / f"{name}.txt", 2, 1)
    starts[name] = token_init.initial_tokens(config, tokenizer, table, 2, captions)
  assert starts["notepad"].texts == ("three", "digit four")
  expected = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in ("three", "digit four")]
  assert starts["notepad"].counts.tolist() == starts["plain"].counts.tolist() == expected
  np.testing.assert_array_equal(starts["notepad"].vectors, starts["plain"].vectors)


def test_a_labels_file_with_a_byte_order_mark_loads_as_the_plain_one(tmp_path):
  (tmp_path / "img.png").write_bytes(_png())
  content = json.dumps({"queries": [{"prompt": "a photo of a <cls-0> bold", "relevant": ["img.png"]}]})
  (tmp_path / "plain.json").write_text(content, encoding="utf-8")
  (tmp_path / "notepad.json").write_text(content, encoding="utf-8-sig")
  plain, notepad = labels_lib.load_labels(tmp_path / "plain.json"), labels_lib.load_labels(tmp_path / "notepad.json")
  assert notepad.queries == plain.queries and list(notepad.gallery.ids) == list(plain.gallery.ids) == ["img.png"]
  assert notepad.relevant.tolist() == plain.relevant.tolist() == [[True]]


def _png() -> bytes:
  from mcti_jax.generation import generate
  return generate.png(np.zeros((4, 4, 3), np.uint8))


def test_a_latin1_caption_file_fails_before_the_models_load_with_one_line_naming_the_byte(tiny_checkpoint, tmp_path,
                                                                                            no_models):
  (tmp_path / "captions.txt").write_bytes("three\ncaf\u00e9 four\n".encode("latin-1"))  # é is byte 9: 0xe9
  config = tiny_train_config(tiny_checkpoint, tmp_path / "run", phases=("ti",),
                             **{"data.num_classes": 2, "tokens.init": "caption",
                                "tokens.caption_file": str(tmp_path / "captions.txt")})
  with pytest.raises(MctiError) as e:
    train.train(config, log=lambda _: None)
  assert str(e.value) == (f"tokens.caption_file={tmp_path / 'captions.txt'} is not UTF-8 text (byte 9 is 0xe9); "
                          "save it as UTF-8")
  assert not (tmp_path / "run").exists()


def test_a_latin1_classifier_json_is_one_line_naming_the_byte(tmp_path):
  (tmp_path / "classifier.json").write_bytes(b'{"version": 1, "classes": ["caf\xe9"]}')
  hf_io.write_folder(tmp_path, {"classifier.safetensors": hf_io.tensors({"w": np.zeros(1, np.float32)})})
  with pytest.raises(hf_io.CheckpointError, match=r"classifier.json is not UTF-8 text \(byte 31 is 0xe9\); save it "
                                                  r"as UTF-8$"):
    file_classifier.load(tmp_path)


def test_read_text_names_the_file_the_offset_and_the_fix(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"ok\n\xff")
  with pytest.raises(MctiError, match=r"^labels file .*a.txt is not UTF-8 text \(byte 3 is 0xff\); save it as UTF-8$"):
    paths.read_text(tmp_path / "a.txt", "labels file")
  (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfone\xef\xbb\xbf")  # only the leading mark goes
  assert paths.read_text(tmp_path / "b.txt", "x.file") == "one\ufeff"


# ------------------------------------------------------------------ missing vs the wrong kind


def _caption_file(path):
  token_init.read_captions(path, 2, 1)


def _config_file(path):
  config_files.load_config(f"{path}:tiny")


def _retrieve_tokens(path):
  retrieve.run(ml_collections.ConfigDict({"tokens": str(path)}))


@pytest.mark.parametrize("reader, kind", [
    (_caption_file, "file"),
    (file_classifier.load, "folder"),
    (labels_lib.gallery_folder, "folder"),
    (labels_lib.load_labels, "file"),
    (sources.from_folder, "folder"),
    (sources.from_file_lists, "file"),
    (_config_file, "file"),
    (_retrieve_tokens, "folder"),
])
def test_a_path_of_the_wrong_kind_is_named_so_and_a_missing_one_as_missing(tmp_path, reader, kind):
  wrong = tmp_path / "wrong"
  if kind == "file":
    wrong.mkdir()
    expected = "is a folder, not a file"
  else:
    wrong.write_text("{}")
    expected = "is a file, not a folder"
  with pytest.raises(MctiError) as e:
    reader(wrong)
  assert expected in str(e.value) and "does not exist" not in str(e.value) and str(wrong) in str(e.value)
  with pytest.raises(MctiError, match=f"{tmp_path / 'missing'} does not exist"):
    reader(tmp_path / "missing")


def test_input_checks_name_the_field(tmp_path):
  (tmp_path / "f").write_text("")
  (tmp_path / "d").mkdir()
  assert paths.input_file(tmp_path / "f", "tokens.caption_file") == tmp_path / "f"
  assert paths.input_folder(tmp_path / "d", "data.root") == tmp_path / "d"
  with pytest.raises(MctiError, match=r"^tokens.caption_file=.*/d is a folder, not a file; write one caption a line$"):
    paths.input_file(tmp_path / "d", "tokens.caption_file", "write one caption a line")
  with pytest.raises(MctiError, match=r"^data.root=.*/f is a file, not a folder$"):
    paths.input_folder(tmp_path / "f", "data.root")


# ------------------------------------------------------------------ output folders


def test_an_output_folder_may_be_missing_but_not_a_file_nor_below_one(tmp_path):
  assert paths.output_folder(tmp_path / "a" / "b", "config.workdir") == tmp_path / "a" / "b"
  assert not (tmp_path / "a").exists()  # checked, not created
  (tmp_path / "file").write_text("")
  with pytest.raises(MctiError, match=r"^config.workdir=.*/file is a file, not a folder; give a folder"):
    paths.output_folder(tmp_path / "file", "config.workdir")
  with pytest.raises(MctiError, match=r"^.*/file, on the way to config.out=.*/file/x/y, is a file, not a folder"):
    paths.output_folder(tmp_path / "file" / "x" / "y", "config.out")


def test_an_output_folder_that_cannot_be_written_is_refused(tmp_path):
  with read_only(tmp_path / "ro") as ro:
    with pytest.raises(MctiError, match=r"^config.workdir=.*/ro/run is not writable \(.*/ro cannot be written\) "
                                        r"\(read-only mount or permissions\)"):
      paths.output_folder(ro / "run", "config.workdir")
    with pytest.raises(MctiError, match=r"^data.cache_dir=.*/ro is not writable \(read-only"):
      paths.output_folder(ro, "data.cache_dir")


def test_mcti_train_refuses_a_workdir_that_is_a_file_before_the_models_load(tmp_path, capsys, no_models):
  (tmp_path / "run").write_text("not a folder")
  err = one_line_error(capsys, ["mcti", "train", "--config", "mcti:tiny",
                                f"--config.workdir={tmp_path / 'run'}", f"--config.data.cache_dir={tmp_path / 'c'}"])
  assert err == (f"mcti train: error: config.workdir={tmp_path / 'run'} is a file, not a folder; give a folder (it "
                 "is created if missing)")
  assert (tmp_path / "run").read_text() == "not a folder" and not (tmp_path / "c").exists()


def test_mcti_train_refuses_a_read_only_workdir_before_the_models_load(tmp_path, capsys, no_models):
  with read_only(tmp_path / "ro") as ro:
    err = one_line_error(capsys, ["mcti", "train", "--config", "mcti:tiny", f"--config.workdir={ro / 'run'}",
                                  f"--config.data.cache_dir={tmp_path / 'c'}"])
  assert err.startswith(f"mcti train: error: config.workdir={ro / 'run'} is not writable") and "read-only" in err


def test_mcti_train_refuses_a_cache_dir_below_a_file_before_the_models_load(tmp_path, capsys, no_models):
  (tmp_path / "c").write_text("")
  err = one_line_error(capsys, ["mcti", "train", "--config", "mcti:tiny",
                                f"--config.workdir={tmp_path / 'run'}", f"--config.data.cache_dir={tmp_path / 'c/x'}"])
  assert f"{tmp_path / 'c'}, on the way to data.cache_dir={tmp_path / 'c/x'}, is a file, not a folder" in err
  assert not (tmp_path / "run").exists()


def test_mcti_retrieve_refuses_an_out_that_is_a_file_before_the_models_load(tiny_checkpoint, tmp_path, capsys,
                                                                           monkeypatch):
  tokens = random_export(tiny_checkpoint, tmp_path / "tokens")  # names its models: without the check, they would load
  refuse_model_loads(monkeypatch)
  (tmp_path / "out").write_text("")
  err = one_line_error(capsys, ["mcti", "retrieve", "--tokens", str(tokens), f"--config.out={tmp_path / 'out'}",
                                "--config.gair.enabled=True"])
  assert err.startswith(f"mcti retrieve: error: config.out={tmp_path / 'out'} is a file, not a folder")


def test_mcti_generate_refuses_an_out_that_is_a_file_before_the_models_load(tmp_path, no_models):
  (tmp_path / "out").write_text("")
  with pytest.raises(SystemExit) as e:
    cli.main(["mcti", "generate", "--sd", str(tmp_path), "--prompt", "a photo", "--out", str(tmp_path / "out")])
  assert e.value.code == f"mcti generate: --out={tmp_path / 'out'} is a file, not a folder; give a folder (it is " \
                         "created if missing)"


def test_mcti_eval_refuses_a_workdir_that_is_a_file_before_any_cell_trains(tmp_path, capsys, no_models):
  (tmp_path / "eval").write_text("")
  err = one_line_error(capsys, ["mcti", "eval", "--config", "eval:tiny",
                                f"--config.workdir={tmp_path / 'eval'}"])
  assert err.startswith(f"mcti eval: error: config.workdir={tmp_path / 'eval'} is a file, not a folder")


@pytest.mark.parametrize("config", ["demo:quick", "dct_demo:quick",
                                    "custom_demo:quick"])
def test_mcti_demo_refuses_a_workdir_that_is_a_file_before_any_work(tmp_path, capsys, no_models, config):
  (tmp_path / "demo").write_text("")
  err = one_line_error(capsys, ["mcti", "demo", "--config", config, f"--config.workdir={tmp_path / 'demo'}"])
  assert err.startswith(f"mcti demo: error: config.workdir={tmp_path / 'demo'} is a file, not a folder")


def test_mcti_pretrain_tiny_refuses_an_out_that_is_a_file_before_pretraining(tmp_path, capsys, monkeypatch):
  from mcti_jax.tiny import pretrain
  monkeypatch.setattr(pretrain, "pretrain", lambda *a, **k: pytest.fail("pretraining started"))
  (tmp_path / "ckpt").write_text("")
  with pytest.raises(SystemExit) as e:
    cli.main(["mcti", "pretrain-tiny", "--quick", "--out", str(tmp_path / "ckpt")])
  assert e.value.code == f"mcti pretrain-tiny: --out={tmp_path / 'ckpt'} is a file, not a folder; give a folder (it " \
                         "is created if missing)"


def test_a_file_list_naming_a_folder_says_so(tmp_path):
  (tmp_path / "cat").mkdir()
  with pytest.raises(MctiError, match=r"1 of 1 listed image files do not exist or are folders:\n  .*/cat \(a folder, "
                                      r"not a file\)"):
    sources.from_file_lists({"cat": ["cat"]}, root=tmp_path)
