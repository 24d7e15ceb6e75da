"""Data sources that become `LabeledImages`: an image folder, file lists, a CoOp split file, sklearn digits.

tensorflow-datasets lives in tfds_source.py. Every source checks what it can
cheaply check up front (folders exist, classes are not empty, listed files
exist) so a bad path fails before any model work starts; pixels are only read
when sampled or evaluated. docs/DATA.md says how to get each preset's data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from mcti_jax import paths
from mcti_jax.data import preprocess
from mcti_jax.errors import DataError
from mcti_jax.data.labeled import LabeledImages, threaded_reader
from mcti_jax.data.synthetic import from_synthetic
from mcti_jax.data.tfds_source import from_tfds
from mcti_jax.errors import ConfigError

# Split of sklearn digits into a "pretrain" and a "heldout" half, fixed once for all runs.
DIGITS_SPLIT_SEED = 20240501
DIGITS_PARTS = ("pretrain", "heldout", "all")
# How to get each preset's data, one section per preset; data errors point at it (in a pip install, not on disk).
DATA_DOC = "https://github.com/mcti-jax/mcti-jax/blob/main/docs/DATA.md"


def _read_paths(num_workers: int = 8):
  return threaded_reader(preprocess.read_image, num_workers)


def _check_files_exist(paths: Sequence[str], what: str, fix: str) -> None:
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    folders = [p for p in missing if os.path.isdir(p)]
    shown = "\n  ".join(p + (" (a folder, not a file)" if p in folders else "") for p in missing[:5])
    more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
    kind = "do not exist or are folders" if folders else "do not exist"
    raise DataError(f"{what}: {len(missing)} of {len(paths)} listed image files {kind}:\n  {shown}{more}\n{fix}")


def from_folder(root: str | os.PathLike) -> LabeledImages:
  """One subfolder per class; class name = subfolder name, class index = its sorted position.

  Image files directly inside each class folder count (see
  preprocess.IMAGE_EXTENSIONS); other files and deeper folders are ignored.
  """
  root = os.path.expanduser(os.fspath(root))
  paths.input_folder(root, "image folder", "it should hold one subfolder per class", DataError)
  class_names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
  if not class_names:
    raise DataError(f"image folder {root} has no class subfolders; put each class's images in {root}/<class name>/")
  items, ids, labels = [], [], []
  for label, name in enumerate(class_names):
    entries = os.scandir(os.path.join(root, name))
    files = sorted(e.name for e in entries if e.is_file() and preprocess.is_image_file(e.name))
    if not files:
      raise DataError(f"class folder {os.path.join(root, name)} contains no images "
                      f"(looked for {', '.join(preprocess.IMAGE_EXTENSIONS)}); add images or remove the folder")
    items += [os.path.join(root, name, f) for f in files]
    ids += [f"{name}/{f}" for f in files]
    labels += [label] * len(files)
  return LabeledImages(class_names, items, ids, np.asarray(labels, np.int32), _read_paths(), source=f"folder:{root}")


def from_file_lists(lists: Mapping[str, Sequence[str]] | str | os.PathLike,
                    root: str | os.PathLike | None = None) -> LabeledImages:
  """Explicit files per class: {class name: [path, ...]}, or a JSON file holding that dict.

  Classes are indexed in the dict's order. Relative paths are taken from
  `root`, or, by default, from the JSON file's folder (or the current folder
  for an in-memory dict).
  """
  where = "file lists"
  if not isinstance(lists, Mapping):
    where = os.fspath(lists)
    lists = _read_json(where, "file lists")
    if not isinstance(lists, dict):
      raise DataError(f"{where} should hold a JSON object {{class name: [image paths]}}, got {type(lists).__name__}")
    if root is None:
      root = os.path.dirname(os.path.abspath(where))
  root = os.fspath(root) if root is not None else ""
  if not lists:
    raise DataError(f"{where} lists no classes")
  items, ids, labels = [], [], []
  for label, (name, files) in enumerate(lists.items()):
    if isinstance(files, str) or not files:
      raise DataError(f"{where}: class {name!r} should list at least one image path, got {files!r}")
    items += [os.path.join(root, f) for f in files]
    ids += [str(f) for f in files]
    labels += [label] * len(files)
  _check_files_exist(items, where, f"Fix the paths (relative paths are taken from {root or os.getcwd()}).")
  return LabeledImages(list(lists), items, ids, np.asarray(labels, np.int32), _read_paths(), source=f"lists:{where}")


def _read_json(path: str, what: str):
  try:
    return json.loads(paths.read_text(path, what, error=DataError))
  except json.JSONDecodeError as e:
    raise DataError(f"{path} is not valid JSON: {e}") from e


def from_split_file(split_file: str | os.PathLike, split: str,
                    image_root: str | os.PathLike | None = None) -> LabeledImages:
  """A CoOp-style split file: {"train": [[path, label, classname], ...], "val": [...], "test": [...]}.

  Paths are relative to `image_root` (CoOp's dataset image folder; default:
  the split file's folder). Class names come from all splits of the file
  together, so every split of one file has the same class list; labels must
  be 0..K-1.
  """
  split_file = os.path.expanduser(os.fspath(split_file))
  image_root = os.path.expanduser(os.fspath(image_root)) if image_root else os.path.dirname(split_file)
  data = _read_json(split_file, "split file")
  if not isinstance(data, dict) or split not in data:
    have = sorted(data) if isinstance(data, dict) else type(data).__name__
    raise DataError(f"{split_file} has no split {split!r} (it has {have})")
  names: dict[int, str] = {}
  for part, rows in data.items():
    for row in rows:
      if not (isinstance(row, (list, tuple)) and len(row) == 3 and isinstance(row[1], int)):
        raise DataError(f"{split_file}: split {part!r} has a malformed entry {row!r}; "
                        f"expected [path, label, classname]")
      _, label, name = row
      if names.setdefault(label, name) != name:
        raise DataError(f"{split_file}: label {label} is named both {names[label]!r} and {name!r}")
  if sorted(names) != list(range(len(names))):
    raise DataError(f"{split_file}: labels should be 0..K-1, got {sorted(names)}")
  rows = data[split]
  if not rows:
    raise DataError(f"{split_file}: split {split!r} is empty")
  items = [os.path.join(image_root, row[0]) for row in rows]
  _check_files_exist(items, f"{split_file} split {split!r}",
                     f"Is image_root={image_root} (--config.data.root) the folder the split file's paths are "
                     "relative to?")
  return LabeledImages([names[i] for i in range(len(names))], items, [row[0] for row in rows],
                       np.asarray([row[1] for row in rows], np.int32), _read_paths(),
                       source=f"split:{split_file}:{split}")


def digits_images() -> tuple[np.ndarray, np.ndarray]:
  """sklearn's bundled digits as uint8 RGB [1797, 16, 16, 3] (each 8x8 pixel doubled) and labels [1797]."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  grey = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # 16 grey levels 0..16 -> 0..255
  grey = grey.repeat(2, axis=1).repeat(2, axis=2)
  return np.repeat(grey[..., None], 3, axis=-1), d.target.astype(np.int32)


def digits_split(labels: np.ndarray) -> dict[str, np.ndarray]:
  """Per digit, a fixed random half (rounded up) is "pretrain" and the rest "heldout"."""
  parts = {"pretrain": [], "heldout": []}
  for digit in np.unique(labels):
    members = np.flatnonzero(labels == digit)
    perm = np.random.default_rng([DIGITS_SPLIT_SEED, int(digit)]).permutation(members)
    half = (len(members) + 1) // 2
    parts["pretrain"].append(perm[:half])
    parts["heldout"].append(perm[half:])
  return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def from_digits(part: str = "all", digits: Sequence[int] = tuple(range(10))) -> LabeledImages:
  """sklearn digits as 16x16 RGB; `part` is "pretrain", "heldout" or "all"; class i is digits[i]."""
  if part not in DIGITS_PARTS:
    raise DataError(f"digits part {part!r} is unknown; use one of {DIGITS_PARTS}")
  digits = [int(d) for d in digits]
  if not digits or any(not 0 <= d <= 9 for d in digits) or len(set(digits)) != len(digits):
    raise DataError(f"digits should be distinct values in 0..9, got {digits}")
  images, labels = digits_images()
  positions = np.arange(len(labels)) if part == "all" else digits_split(labels)[part]
  positions = positions[np.isin(labels[positions], digits)]
  remap = {d: i for i, d in enumerate(digits)}
  return LabeledImages(
      class_names=[str(d) for d in digits],
      items=positions.tolist(),
      ids=[f"digits[{i}]" for i in positions],
      labels=np.asarray([remap[int(labels[i])] for i in positions], np.int32),
      read_fn=lambda items: [images[i] for i in items],
      source=f"digits:{part}:{''.join(map(str, digits))}")


def load_labeled(data_cfg, split: str) -> LabeledImages:
  """The labelled images of a split ('train' or 'test') of the configured source (config.data).

  A missing or unprepared dataset is a DataError that names the preset (data.preset) and its section of
  docs/DATA.md.
  """
  source = data_cfg.source
  if source in ("folder", "split_file", "tfds"):
    try:
      return _load_files(data_cfg, split)
    except DataError as e:
      preset = data_cfg.get("preset")
      where = f"{DATA_DOC}, section `{preset}`" if preset else DATA_DOC
      raise DataError((f"preset {preset!r}: " if preset else "") + f"{e}. How to get the data: {where}") from e
  if source == "digits":
    return from_digits("heldout")  # shots and test images both come from the held-out half
  if source == "synthetic":
    k = data_cfg.get("num_classes")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
      raise ConfigError(f"data.source='synthetic' makes data.num_classes classes, but data.num_classes={k!r}; "
                        "set it, e.g. --config.data.num_classes=1024")
    return from_synthetic(k, split)
  raise DataError(f"unknown data.source {source!r}; use folder, split_file, tfds, digits or synthetic")


def _load_files(data_cfg, split: str) -> LabeledImages:
  """The sources whose images are files the user prepares: an image folder, a split file, a tfds dataset."""
  if data_cfg.source == "folder":
    if not data_cfg.root:
      raise DataError("data.source='folder' needs --config.data.root=/path/with/one/subfolder/per/class")
    return from_folder(data_cfg.root)
  if data_cfg.source == "split_file":
    if not data_cfg.split_file:
      raise DataError("data.source='split_file' needs --config.data.split_file=/path/split.json (a CoOp-style "
                      "split file; --config.data.root=/path is the folder its image paths are relative to, by "
                      "default the split file's folder)")
    return from_split_file(data_cfg.split_file, split, data_cfg.root)
  name_of_split = data_cfg.train_split if split == "train" else data_cfg.test_split
  return from_tfds(data_cfg.name, split=name_of_split, data_dir=data_cfg.data_dir)


def num_classes_of(labeled: LabeledImages, data_cfg) -> int:
  """K: all the source's classes, or the first data.num_classes of them."""
  k = len(labeled.class_names)
  if data_cfg.num_classes and data_cfg.num_classes > k:
    raise ConfigError(f"data.num_classes={data_cfg.num_classes}, but {labeled.source} has only {k} classes; "
                    "lower it or leave it unset for all of them")
  return data_cfg.num_classes or k
