"""The A1111/kohya embedding files against diffusers and A1111's loading logic, and `mcti export` (reexport.py).

One export of K=3 classes with V=2 vectors (class 1 uses only 1) and two phases
serves every test; nothing is trained.
"""

import json
import os
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import max_abs_diff
from mcti_jax import cli
from mcti_jax.tokens import conditioning, export, export_command, reexport
from mcti_jax.tokens import placeholders as tok
from mcti_jax.models import clip
from mcti_jax.models import tokenizer as tokenizer_lib
from mcti_jax.models.frozen import freeze

# Classes 0 and 1 sanitize to the same "golden_retriever"; class 2 needs ASCII folding and loses a path separator.
NAMES = ["Golden Retriever", "golden-retriever!", "Café/au lait"]
COUNTS = [2, 1, 2]


@pytest.fixture(scope="module")
def run(tiny_checkpoint, tmp_path_factory):
  """A workdir whose export/ holds phases ti and mcti as `mcti train` writes them, and the tokens of each."""
  tokenizer = tokenizer_lib.load_tokenizer(tiny_checkpoint / "sd", "tokenizer")
  class_tokens = tok.add_class_tokens(tokenizer, 3, 2, COUNTS, init_texts=("dog", "a dog", "coffee"))
  rng = np.random.default_rng(0)
  tokens = {phase: rng.normal(0, 0.5, (3, 2, 32)).astype(np.float32) for phase in ("ti", "mcti")}
  workdir = tmp_path_factory.mktemp("run")
  export.export_phases(workdir / "export", tokens, class_tokens, NAMES, {"base_model": "tiny"},
                       {p: {"method": p, "templates": ["a photo of a {}"]} for p in tokens})
  return workdir, tokens


def _manifest(folder):
  return json.loads((folder / export.MANIFEST).read_text())


# ------------------------------------------------------------ A1111 / kohya files


def a1111_load(path):
  """(prompt word, embedding [V, D]) as AUTOMATIC1111's webui reads a .safetensors embedding.

  Follows stable-diffusion-webui modules/textual_inversion/textual_inversion.py: `EmbeddingDatabase.load_from_file`
  takes the name from the file name without its extension and loads the file with safetensors.torch.load_file;
  `create_embedding_from_data` (inline in load_from_file in older versions) then, for a dict without
  "string_to_param" or "clip_g"/"clip_l" (the "diffuser concepts" branch), asserts it holds one key ('embedding
  file has multiple terms in it'), takes that tensor, unsqueezes a 1-D one to [1, D] and casts it to float32.
  """
  import safetensors.torch
  name, ext = os.path.splitext(os.path.basename(path))
  assert ext.upper() == ".SAFETENSORS"
  data = safetensors.torch.load_file(str(path), device="cpu")
  assert "string_to_param" not in data and not ("clip_g" in data and "clip_l" in data)
  if len(data) != 1:
    raise AssertionError("embedding file has multiple terms in it")
  emb = next(iter(data.values()))
  if emb.ndim == 1:
    emb = emb.unsqueeze(0)
  return name, emb.float().numpy()


def test_the_reference_loader_follows_a1111(tmp_path):
  from safetensors.numpy import save_file
  save_file({"anything": np.arange(4, dtype=np.float16)}, str(tmp_path / "one-d.safetensors"))
  name, emb = a1111_load(tmp_path / "one-d.safetensors")
  assert name == "one-d" and emb.dtype == np.float32 and emb.tolist() == [[0, 1, 2, 3]]
  save_file({"a": np.zeros((1, 4), np.float32), "b": np.zeros((1, 4), np.float32)}, str(tmp_path / "two.safetensors"))
  with pytest.raises(AssertionError, match="multiple terms"):
    a1111_load(tmp_path / "two.safetensors")


def test_every_a1111_file_is_one_class_word_and_its_own_vectors(run, tiny_checkpoint):
  workdir, tokens = run
  tokenizer = tokenizer_lib.load_tokenizer(tiny_checkpoint / "sd", "tokenizer")  # A1111 adds no tokens
  words = []
  for phase in tokens:
    folder = workdir / "export" / phase
    classes = _manifest(folder)["classes"]
    assert sorted(p.name for p in (folder / "a1111").iterdir()) == sorted(
        os.path.basename(c["a1111_file"]) for c in classes)
    for k, c in enumerate(classes):
      assert c["a1111_file"] == f"a1111/{c['a1111_word']}.safetensors"
      assert list(load_file(str(folder / c["a1111_file"]))) == ["emb_params"]  # kohya's key
      name, emb = a1111_load(folder / c["a1111_file"])
      assert name == c["a1111_word"]
      np.testing.assert_array_equal(emb, tokens[phase][k, : COUNTS[k]])
      # A file name everywhere, and a word A1111 finds in a prompt: its CLIP tokens alone are a run of the prompt's.
      assert re.fullmatch(r"cls\d+-[a-z0-9_]+(-[a-z0-9_]+)?", name), name
      alone = tokenizer(name, add_special_tokens=False).input_ids
      prompt = tokenizer(f"a photo of a {name}, on the left", add_special_tokens=False).input_ids
      assert any(prompt[i: i + len(alone)] == alone for i in range(len(prompt))), name
      words.append(name)
  assert words[:3] == ["cls0-golden_retriever-ti", "cls1-golden_retriever-ti", "cls2-cafe_au_lait-ti"]
  assert len(set(words)) == len(words)  # classes that sanitize alike, and the phases, can share one folder


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
  from diffusers import StableDiffusionPipeline
  return StableDiffusionPipeline.from_pretrained(str(tiny_checkpoint / "sd"), safety_checker=None)


def test_a1111_files_load_in_diffusers_and_encode_as_our_splice(run, pipe, tiny_checkpoint):
  import torch
  workdir, tokens = run
  folder = workdir / "export" / "mcti"
  classes = _manifest(folder)["classes"]
  for c in classes:
    pipe.load_textual_inversion(str(folder / c["a1111_file"]), token=c["a1111_word"])
  theirs_prompt = "a photo of a {} next to a {} and the {}".format(*(c["a1111_word"] for c in classes))
  converted = pipe.maybe_convert_prompt(theirs_prompt, pipe.tokenizer)
  assert f"{classes[0]['a1111_word']}_1" in converted and f"{classes[1]['a1111_word']}_1" not in converted
  ids = pipe.tokenizer(converted, padding="max_length", max_length=77, return_tensors="pt").input_ids
  with torch.no_grad():
    want = pipe.text_encoder(ids)[0].numpy()

  tokenizer = tokenizer_lib.load_tokenizer(tiny_checkpoint / "sd", "tokenizer")
  text_encoder = clip.text_from_pretrained(tiny_checkpoint / "sd", "text_encoder", eos_token_id=tokenizer.eos_token_id)
  learned = conditioning.LearnedTokens.from_export(folder, tokenizer, 32)
  got, _ = conditioning.encode_prompts(freeze(text_encoder), tokenizer,
                                       ["a photo of a <cls-0> next to a <cls-1> and the <cls-2>"], learned)
  assert np.isin(np.asarray(conditioning.tokenize(tokenizer, ["<cls-0> <cls-1> <cls-2>"], learned)),
                 learned.placeholder_ids).sum() == sum(COUNTS)
  diff = max_abs_diff(got, want)
  print("max abs diff vs diffusers with the A1111 files:", diff)
  assert diff <= 1e-5
  # The vectors matter: the same prompt with the plain words differs.
  plain, _ = conditioning.encode_prompts(freeze(text_encoder), tokenizer,
                                         ["a photo of a dog next to a dog and the cat"])
  assert max_abs_diff(plain, want) > 1e-2


# ------------------------------------------------------------ mcti export


def _contents(root):
  """{relative path: tensors as numpy (safetensors) | bytes} of every file under `root`."""
  return {str(p.relative_to(root)): load_file(str(p)) if p.suffix == ".safetensors" else p.read_bytes()
          for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same(got, want):
  assert sorted(got) == sorted(want)
  for rel, value in want.items():
    if isinstance(value, dict) and rel.endswith(".safetensors"):
      assert sorted(got[rel]) == sorted(value), rel
      for key, array in value.items():
        assert got[rel][key].dtype == array.dtype and got[rel][key].tobytes() == array.tobytes(), (rel, key)
    else:  # manifests are written with sorted keys: equal content is equal bytes
      assert got[rel] == value, (rel, got[rel][:2000], value[:2000])


def _make_old(workdir, to):
  """A copy of `workdir` as exports looked before the A1111 files: no a1111/, no "a1111_*" manifest keys."""
  shutil.copytree(workdir, to)
  for manifest_path in to.glob("export/*/" + export.MANIFEST):
    shutil.rmtree(manifest_path.parent / "a1111")
    manifest = json.loads(manifest_path.read_text())
    for c in manifest["classes"]:
      del c["a1111_file"], c["a1111_word"]
    manifest_path.write_text(json.dumps(manifest))
  return to


def test_reexport_restores_every_format_of_an_old_export_in_place_and_elsewhere(run, tmp_path):
  workdir, _ = run
  want = _contents(workdir / "export")
  old = _make_old(workdir, tmp_path / "old")
  tokens, manifest = export.load_tokens(old / "export" / "mcti")  # old exports still load
  assert "a1111_word" not in manifest["classes"][0] and export.vector_counts(manifest, tokens).tolist() == COUNTS
  before = _contents(old)

  export_command.main([str(old / "export" / "ti"), "--out", str(tmp_path / "ti_only")])  # one export folder, elsewhere
  _assert_same(_contents(tmp_path / "ti_only"), {k[3:]: v for k, v in want.items() if k.startswith("ti/")})
  export_command.main([str(old), "--out", str(tmp_path / "elsewhere")])  # a workdir: one folder per phase
  _assert_same(_contents(tmp_path / "elsewhere"), want)
  _assert_same(_contents(old), before)  # --out leaves the input untouched

  export_command.main([str(old)])
  _assert_same(_contents(old / "export"), want)
  export_command.main([str(old / "export" / "mcti")])  # again, on one phase in place: nothing changes
  _assert_same(_contents(old / "export"), want)
  assert sorted(p.name for p in old.iterdir()) == ["export"]  # no staging folders left


def test_reexport_of_an_export_from_before_per_class_counts(tmp_path):
  """No num_vectors anywhere (manifest nor combined file): every class uses all V, as load_tokens reads it."""
  from safetensors.numpy import save_file
  vectors = np.random.default_rng(1).normal(size=(2, 2, 32)).astype(np.float32)
  folder = tmp_path / "old"
  folder.mkdir()
  save_file({"tokens": vectors}, str(folder / export.COMBINED))
  classes = [{"index": k, "token": f"<cls-{k}>", "name": n, "file": f"classes/{k:04d}/learned_embeds.safetensors"}
             for k, n in enumerate(["cat", "dog"])]
  (folder / export.MANIFEST).write_text(json.dumps({"num_classes": 2, "num_vectors": 2, "width": 32,
                                                    "classes": classes, "base_model": "tiny"}))
  export_command.main([str(folder), "--trust-manifest"])  # no digest either: its names are taken on trust
  manifest = _manifest(folder)
  assert [c["a1111_word"] for c in manifest["classes"]] == ["cls0-cat", "cls1-dog"] and manifest["base_model"] == "tiny"
  assert load_file(str(folder / export.COMBINED))["num_vectors"].tolist() == [2, 2]
  for k, c in enumerate(manifest["classes"]):
    np.testing.assert_array_equal(a1111_load(folder / c["a1111_file"])[1], vectors[k])
    np.testing.assert_array_equal(load_file(str(folder / c["file"]))[f"<cls-{k}>"], vectors[k])


def _corrupt_manifest(folder):
  (folder / export.MANIFEST).write_text("{not json")


def _drop_a_class(folder):
  manifest = _manifest(folder)
  manifest["classes"].pop()
  (folder / export.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, where, message", [
    (None, "missing", r"is not a folder: pass a run's workdir"),
    (lambda f: shutil.rmtree(f.parent), "", r"not a finished run.*run the same `mcti train` command to finish it"),
    (_corrupt_manifest, "export/mcti", r"manifest\.json is not valid JSON.*mcti train"),
    (_drop_a_class, "export", r"lists 2 classes but tokens\.safetensors holds 3"),
    (lambda f: (f.parent / "notes.txt").write_text("mine"), "", r"holds notes\.txt besides its phase folders"),
    (lambda f: (f / "README").write_text("mine"), "export/mcti", r"holds README besides its export files"),
])
def test_reexport_refuses_bad_input_clearly_and_changes_nothing(run, tmp_path, damage, where, message):
  workdir = tmp_path / "run"
  shutil.copytree(run[0], workdir)
  if damage is not None:
    damage(workdir / "export" / "mcti")
  before = _contents(tmp_path)
  with pytest.raises(reexport.ExportError, match=message) as e:
    export_command.main([str(workdir / where)])
  assert str(workdir) in str(e.value)
  _assert_same(_contents(tmp_path), before)


def test_reexport_refuses_to_replace_an_unrelated_out_folder(run, tmp_path):
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "thesis.tex").write_text("keep me")
  with pytest.raises(reexport.ExportError, match=r"--out .*mine exists and holds other files"):
    export_command.main([str(run[0]), "--out", str(mine)])
  with pytest.raises(reexport.ExportError, match=r"lies inside"):
    export_command.main([str(run[0]), "--out", str(run[0] / "export" / "copy")])
  assert (mine / "thesis.tex").read_text() == "keep me"


def test_mcti_export_command(run, tmp_path, capsys):
  old = _make_old(run[0], tmp_path / "old")
  cli.main(["mcti", "export", str(old)])
  out = capsys.readouterr().out
  assert "export/mcti: 3 classes (mcti); A1111/kohya words: cls0-golden_retriever-mcti," in out
  _assert_same(_contents(old / "export"), _contents(run[0] / "export"))
  with pytest.raises(SystemExit) as e:
    cli.main(["mcti", "export", str(tmp_path / "nothing")])
  assert e.value.code == 1 and "mcti export: error:" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    cli.main(["mcti", "export", "--help"])
  assert e.value.code == 0 and "a1111/<word>.safetensors" in capsys.readouterr().out
