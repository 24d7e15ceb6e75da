"""tensorflow-datasets without tensorflow: random-access reads of prepared array_record data.

tfds 4.9 reads datasets prepared in the array_record (or parquet) file format
through `builder.as_data_source`, decoding features with numpy and PIL, so no
tensorflow is needed. Datasets prepared in the default tfrecord format can only
be read with tensorflow, and preparing (downloading) a dataset needs it too
(`pip install "mcti-jax[tfds-build]"`), so we never download: the data must
already be in data_dir, e.g. made once, here or on another machine, with

  tfds build NAME --data_dir DIR --file_format=array_record

docs/DATA.md gives each preset's steps.
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np

from mcti_jax.data import preprocess
from mcti_jax.errors import DataError
from mcti_jax.data.labeled import LabeledImages

_READABLE_FORMATS = ("array_record", "parquet")
_LABEL_CHUNK = 1024


def _prepare_hint(name: str, data_dir: str) -> str:
  return (f"Prepare it once where tensorflow is installed (pip install \"mcti-jax[tfds-build]\") with `tfds build "
          f"{name} --data_dir {data_dir} --file_format=array_record` (or builder.download_and_prepare("
          f"file_format='array_record')); if you built it on another machine, copy {data_dir}/{name} here.")


def _builder(name: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import registered  # pylint: disable=g-import-not-at-top
  shown_dir = data_dir or "the default data_dir (~/tensorflow_datasets)"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except registered.DatasetNotFoundError as e:
    raise DataError(f"tfds dataset {name!r} is not a dataset known to tensorflow-datasets {tfds.__version__} and "
                    f"no prepared copy of it was found in {shown_dir}. Check the name "
                    f"(tfds.list_builders()) and that data_dir holds {name}/<version>/dataset_info.json.") from e
  if not builder.is_prepared():
    raise DataError(f"tfds dataset {name!r} is not prepared in {shown_dir} (looked for {builder.data_dir}). "
                    + _prepare_hint(name, data_dir or "~/tensorflow_datasets"))
  file_format = getattr(builder.info.file_format, "value", str(builder.info.file_format))
  if file_format not in _READABLE_FORMATS:
    raise DataError(f"tfds dataset {name!r} in {builder.data_dir} is prepared in the {file_format} format, which "
                    f"needs tensorflow to read; it must be array_record. "
                    + _prepare_hint(name, data_dir or "~/tensorflow_datasets"))
  return builder


def from_tfds(name: str, split: str, data_dir: str | os.PathLike | None, image_key: str = "image",
              label_key: str = "label", num_workers: int = 8) -> LabeledImages:
  """A prepared tfds dataset split (e.g. "train", "test[:50%]"); class names from its ClassLabel feature.

  Labels are read once up front (one pass over the records, images left
  encoded); images are decoded only when sampled or evaluated.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir is not None else None  # tfds takes "~" literally
  builder = _builder(name, data_dir)
  features = builder.info.features
  for key in (image_key, label_key):
    if key not in features:
      raise DataError(f"tfds dataset {name!r} has no feature {key!r}; its features are {sorted(features.keys())}. "
                      f"Pass image_key/label_key.")
  if not isinstance(features[label_key], tfds.features.ClassLabel):
    raise DataError(f"feature {label_key!r} of tfds dataset {name!r} is a {type(features[label_key]).__name__}, "
                    f"not a ClassLabel, so it has no class names; pass the right label_key")
  try:
    source = builder.as_data_source(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
  except (KeyError, ValueError) as e:
    raise DataError(f"tfds dataset {name!r} has no split {split!r} (it has {sorted(builder.info.splits)}): {e}") from e
  labels = np.empty(len(source), np.int32)
  for start in range(0, len(source), _LABEL_CHUNK):
    records = source.__getitems__(list(range(start, min(start + _LABEL_CHUNK, len(source)))))
    labels[start:start + len(records)] = [r[label_key] for r in records]

  def decode(args):
    index, value = args
    if isinstance(value, np.ndarray):  # a dataset that stores raw pixels
      return preprocess.to_rgb(value, what=f"the image of {name}/{split}[{index}]")
    return preprocess.decode_image_bytes(value, f"{name}/{split}[{index}]")

  def read(indices):
    records = source.__getitems__([int(i) for i in indices])
    pairs = [(i, r[image_key]) for i, r in zip(indices, records)]
    if len(pairs) <= 1:
      return [decode(p) for p in pairs]
    with concurrent.futures.ThreadPoolExecutor(min(num_workers, len(pairs))) as pool:
      return list(pool.map(decode, pairs))

  return LabeledImages(
      class_names=features[label_key].names,
      items=range(len(source)),
      ids=[f"{name}/{split}[{i}]" for i in range(len(source))],
      labels=labels,
      read_fn=read,
      source=f"tfds:{name}:{split}:{data_dir}")
