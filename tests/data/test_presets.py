"""The dataset presets against docs/DATA.md and the real tensorflow-datasets catalog; a preset without its data.

No network and no models: configs are built as `mcti train` builds them and their data loaded with the function
training uses (data.load_labeled), on empty or fake folders.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mcti_jax import data as D
from mcti_jax.config_files import load_config
from mcti_jax.configs import mcti
from conftest import ROOT

DATA_MD = ROOT / "docs" / "DATA.md"

# tfds names a preset may use, with their splits: datasets of the tensorflow-datasets catalog
# (https://www.tensorflow.org/datasets/catalog/overview, one page per name, e.g. .../catalog/oxford_iiit_pet) that
# have an `image` and a ClassLabel `label` and whose build still downloads (imagenet2012: from a manual download).
# Not here, on purpose: fgvc_aircraft (no such builder), cars196 and sun397 (their download links are dead),
# celeb_a (attributes, no class label).
TFDS_BUILDABLE = {
    "oxford_iiit_pet": ("train", "test"),
    "oxford_flowers102": ("train", "validation", "test"),
    "food101": ("train", "validation"),
    "dtd": ("train", "validation", "test"),
    "eurosat/rgb": ("train",),
    "caltech101": ("train", "test"),
    "imagenet2012": ("train", "validation", "test"),
    "cifar10": ("train", "test"),
    "stl10": ("train", "test", "unlabelled"),
    "colorectal_histology": ("train",),
}
FILE_SOURCES = ("tfds", "split_file", "folder")  # the sources whose data a user prepares


def _config(preset: str):
  return load_config(f"mcti:{preset}")[1]


def _sources() -> dict[str, str]:
  return {p: _config(p).data.source for p in mcti.PRESET_NAMES}


def _sections() -> dict[str, str]:
  """Preset name -> the text of its `### \\`name\\`...` section of DATA.md (one heading may name several)."""
  text = DATA_MD.read_text()
  parts = re.split(r"^### (.*)$", text, flags=re.M)
  sections = {}
  for heading, body in zip(parts[1::2], parts[2::2]):
    names = re.findall(r"`(\w+)`", heading.split(":")[0])
    assert names, f"DATA.md heading {heading!r} names no preset in backticks"
    for name in names:
      assert name not in sections, f"DATA.md has two sections for {name!r}"
      sections[name] = heading + body.split("\n## ")[0]
  return sections


def _not_buildable(presets: dict[str, dict]) -> dict[str, str]:
  """Preset -> the problem, for tfds presets whose name or splits the catalog list above does not have."""
  problems = {}
  for preset, p in presets.items():
    if p.get("source", "tfds") != "tfds":
      continue
    name = p["name"]
    if name not in TFDS_BUILDABLE:
      problems[preset] = f"{name!r} is not a buildable tfds dataset"
      continue
    for split in (p.get("train_split", "train"), p.get("test_split", "test")):
      if split.split("[")[0] not in TFDS_BUILDABLE[name]:
        problems[preset] = f"{name!r} has no split {split!r}"
  return problems


# ------------------------------------------------------------------ DATA.md and the configs agree


def test_data_md_has_a_section_for_every_preset_and_no_other():
  assert set(_sections()) == set(mcti.PRESET_NAMES)


def test_data_md_table_gives_each_preset_its_source():
  rows = re.findall(r"^\|.*\(`data\.source=(\w+)`\) \| (.*?) \|", DATA_MD.read_text(), flags=re.M)
  table = {name: source for source, names in rows for name in re.findall(r"`(\w+)`", names)}
  assert table == {p: s for p, s in _sources().items() if s in FILE_SOURCES}


def test_each_tfds_section_names_the_dataset_to_build():
  sections = _sections()
  for preset, source in _sources().items():
    if source == "tfds":
      assert f"tfds `{_config(preset).data.name}`" in sections[preset], preset


def test_every_flag_in_data_md_is_a_config_field():
  flags = set(re.findall(r"--config\.([\w.]+)=", DATA_MD.read_text()))
  assert {"data.data_dir", "data.root", "data.split_file", "train.data.data_dir"} <= flags
  fields = {"mcti": _config("pets"), "eval": load_config("eval:pets")[1]}
  for flag in flags:
    config = fields["eval"] if flag.startswith("train.") else fields["mcti"]
    node = config
    for part in flag.split("."):
      assert part in node, f"DATA.md's --config.{flag}: no such field"
      node = node[part]


# ------------------------------------------------------------------ the tfds names are real


def test_every_tfds_preset_names_a_buildable_dataset_and_its_splits():
  assert _not_buildable(mcti.PRESETS) == {}
  # The check itself: the names this issue found in the presets fail it.
  broken = {"aircraft": dict(name="fgvc_aircraft"), "cars": dict(name="cars196"), "celeba": dict(name="celeb_a"),
            "pets": dict(name="oxford_iiit_pet", test_split="validation")}
  assert set(_not_buildable(broken)) == set(broken)


def test_installed_tfds_has_each_tfds_preset_with_an_image_and_a_class_label(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  for preset, p in mcti.PRESETS.items():
    if p.get("source", "tfds") == "tfds":
      features = tfds.builder(p["name"], data_dir=str(tmp_path)).info.features  # no download: info only
      assert "image" in features and isinstance(features["label"], tfds.features.ClassLabel), preset
  assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ a preset without its data


@pytest.mark.parametrize("preset", [p for p in mcti.PRESET_NAMES if p not in ("tiny", "synthetic")])
def test_a_preset_without_its_data_names_it_and_its_section(preset, tmp_path):
  config = _config(preset)
  empty = tmp_path / "empty"
  empty.mkdir()
  source = config.data.source
  if source == "tfds":
    config.data.data_dir = str(empty)
    what = rf"tfds dataset '{re.escape(config.data.name)}' is not prepared in {empty}.*mcti-jax\[tfds-build\]"
  elif source == "split_file":
    config.data.split_file = str(empty / "split.json")
    what = f"split file {empty / 'split.json'} does not exist"
  else:
    config.data.root = str(empty)
    what = f"image folder {empty} has no class subfolders"
  pattern = (rf"^preset '{preset}': {what}.*\. How to get the data: "
             rf"https://github.com/mcti-jax/mcti-jax/blob/main/docs/DATA.md, section `{preset}`$")
  with pytest.raises(D.DataError, match=pattern):
    D.load_labeled(config.data, "train")
  assert os.listdir(empty) == []  # nothing downloaded or created


def test_a_file_preset_without_its_paths_says_which_flag_to_give():
  with pytest.raises(D.DataError, match=r"(?s)preset 'cars': .*needs --config.data.split_file=.*section `cars`"):
    D.load_labeled(load_config("gcpl")[1].data, "train")  # GCPL's default preset
  with pytest.raises(D.DataError, match=r"(?s)preset 'celeba': .*needs --config.data.root=.*section `celeba`"):
    D.load_labeled(_config("celeba").data, "train")


# ------------------------------------------------------------------ DATA.md's recipes, run on fake data


def _snippet(preset: str) -> tuple[list[str], str]:
  """The `python - ARGS <<'EOF' ... EOF` script of a preset's section: its arguments, its code."""
  match = re.search(r"python - (.*?) <<'EOF'\n(.*?)\nEOF\n", _sections()[preset], flags=re.S)
  assert match, f"DATA.md's {preset} section has no python script"
  return match.group(1).split(), match.group(2)


def _run(code: str, *args) -> None:
  subprocess.run([sys.executable, "-", *map(str, args)], input=code, text=True, check=True)


def _jpeg(path, value: int) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_the_aircraft_recipe_writes_a_split_file_the_preset_reads(tmp_path):
  root = tmp_path / "fgvc_aircraft"
  names = ["707-320", "Cessna 172", "F/A-18"]  # the real lists have spaces and slashes in names
  root.mkdir()
  (root / "variants.txt").write_text("".join(n + "\n" for n in names))
  parts = {"train": [("1025794", 0), ("1340192", 1), ("0056978", 2)], "val": [("0062781", 1)],
           "test": [("1102000", 2), ("0077777", 0)]}
  for part, rows in parts.items():
    (root / f"images_variant_{part}.txt").write_text("".join(f"{i} {names[c]}\n" for i, c in rows))
    for i, c in rows:
      _jpeg(root / "images" / f"{i}.jpg", 40 * c)
  args, code = _snippet("aircraft")
  assert args == ["$DATA/fgvc_aircraft"]
  _run(code, root)
  config = _config("aircraft")
  config.data.split_file = str(root / "split_FGVCAircraft.json")  # data.root: the split file's folder
  for split in ("train", "test"):
    labeled = D.load_labeled(config.data, split)
    assert labeled.class_names == tuple(names)
    assert sorted(labeled.ids) == sorted(f"images/{i}.jpg" for i, _ in parts[split])
    assert sorted(labeled.labels.tolist()) == sorted(c for _, c in parts[split])


def test_the_celeba_recipe_makes_a_folder_per_identity(tmp_path):
  root = tmp_path / "celeba"
  identities = {"000001.jpg": 7, "000002.jpg": 3, "000003.jpg": 7, "000004.jpg": 12, "000005.jpg": 3,
                "000006.jpg": 7}
  root.mkdir()
  (root / "identity_CelebA.txt").write_text("".join(f"{f} {p}\n" for f, p in identities.items()))
  for i, f in enumerate(identities):
    _jpeg(root / "img_align_celeba" / f, 20 * i)
  args, code = _snippet("celeba")
  assert args[0] == "$DATA/celeba"
  _run(code, root, 2)  # the 2 people with the most images: 7 (3 images) and 3 (2)
  config = _config("celeba")
  config.data.root = str(root / "identities")
  labeled = D.load_labeled(config.data, "train")
  assert labeled.class_names == ("3", "7")
  assert np.bincount(labeled.labels).tolist() == [2, 3]


def test_data_paths_may_start_with_a_tilde(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  _jpeg(tmp_path / "birds" / "jay" / "1.jpg", 10)
  config = _config("folder")
  config.data.root = "~/birds"
  assert D.load_labeled(config.data, "train").class_names == ("jay",)
  config = _config("pets")
  config.data.data_dir = "~/tfds"
  with pytest.raises(D.DataError, match=f"not prepared in {tmp_path / 'tfds'}"):
    D.load_labeled(config.data, "train")
