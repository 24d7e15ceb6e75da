"""A person's retrieval labels: a JSON file of queries and the images relevant to each, over a folder of images.

  {"gallery": "images",                 (optional: a folder relative to this file; default: the file's folder)
   "queries": [{"prompt": "a photo of a <cls-3> with a red collar",
                "relevant": ["img001.png", "beach/img007.jpg"],   (paths in the gallery folder, at least one)
                "type": "collar",                                  (optional: results are grouped by type)
                "opposite": "without a collar"}]}                  (optional: GAIR's attribute judge, see gair.py)

Every image file under the gallery folder is in the gallery, named by its path
relative to the folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mcti_jax import data as D
from mcti_jax import paths
from mcti_jax.retrieval.queries import Query, parse_query


@dataclasses.dataclass(frozen=True)
class Labels:
  gallery: D.LabeledImages  # every image of the gallery folder (one class: "gallery")
  queries: list[Query]
  relevant: np.ndarray  # bool [Q, M]


def gallery_folder(folder: str | os.PathLike) -> D.LabeledImages:
  """Every image file under `folder` (hidden entries skipped), named by its path relative to `folder`."""
  folder = paths.input_folder(folder, "gallery folder", error=D.DataError)
  names = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    rel = Path(root).relative_to(folder)
    names += [(rel / f).as_posix() for f in sorted(files) if not f.startswith(".") and D.preprocess.is_image_file(f)]
  if not names:
    raise D.DataError(f"gallery folder {folder} holds no images (looked for {', '.join(D.IMAGE_EXTENSIONS)})")
  return D.from_file_lists({"gallery": names}, root=folder)


def load_labels(path: str | os.PathLike) -> Labels:
  """A labels file (format in the module docstring) -> the gallery, the queries and relevant [Q, M]."""
  path = Path(path)
  where = str(path)
  try:
    content = json.loads(paths.read_text(path, "labels file", error=D.DataError))
  except json.JSONDecodeError as e:
    raise D.DataError(f"labels file {where} is not valid JSON: {e}") from None
  if not isinstance(content, dict) or not isinstance(content.get("queries"), list) or not content["queries"]:
    raise D.DataError(f"labels file {where} should hold {{\"queries\": [{{\"prompt\": ..., \"relevant\": [...]}}, "
                      "...]}} with at least one query (see mcti_jax/retrieval/labels.py)")
  folder = path.parent / content.get("gallery", ".")
  gallery = gallery_folder(folder)
  position = {name: i for i, name in enumerate(gallery.ids)}
  queries, relevant = [], np.zeros((len(content["queries"]), len(gallery)), bool)
  for i, entry in enumerate(content["queries"]):
    what = f"labels file {where}, query {i}"
    if not isinstance(entry, dict) or "prompt" not in entry:
      raise D.DataError(f"{what} should be {{\"prompt\": ..., \"relevant\": [image paths]}}, got {entry!r}")
    try:
      queries.append(parse_query(entry["prompt"], str(entry.get("type", "query")), entry.get("opposite")))
    except ValueError as e:
      raise D.DataError(f"{what}: {e}") from None
    names = entry.get("relevant")
    if not isinstance(names, list) or not names:
      raise D.DataError(f"{what} ({entry['prompt']!r}) lists no relevant images; give at least one path in the "
                        f"gallery folder {folder}")
    unknown = [n for n in names if n not in position]
    if unknown:
      raise D.DataError(f"{what} ({entry['prompt']!r}) names images that are not in the gallery folder {folder}: "
                        f"{unknown[:5]}; paths are relative to that folder, e.g. {gallery.ids[0]!r}")
    relevant[i, [position[n] for n in names]] = True
  return Labels(gallery, queries, relevant)


def labels_json(queries: Sequence[Query], relevant_ids: Sequence[Sequence[str]], gallery: str = ".") -> dict:
  """The labels file's content (what `load_labels` reads) for queries and their relevant image paths."""
  entries = []
  for q, ids in zip(queries, relevant_ids, strict=True):
    entry = {"prompt": q.prompt, "relevant": list(ids), "type": q.type}
    if q.opposite is not None:
      entry["opposite"] = q.opposite
    entries.append(entry)
  return {"gallery": gallery, "queries": entries}
