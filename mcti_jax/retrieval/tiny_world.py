"""The tiny world's retrieval queries and their relevance, measured rather than labelled.

A query "a photo of a <cls-k> bold" is relevant to an image of digit k whose
measured shape attribute (tiny/captions.py) falls in the tercile the word names,
by the terciles of the pretraining images the tiny CLIP learned its words from.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mcti_jax import data as D
from mcti_jax.errors import ConfigError
from mcti_jax.retrieval.queries import Query, parse_query
from mcti_jax.retrieval.settings import TINY_ATTRIBUTES
from mcti_jax.tokens import placeholders as tok



def tiny_words() -> dict[str, tuple[int, int, str]]:
  """Attribute words of the tiny CLIP -> (attribute index, level 0 or 2, the opposite words)."""
  out = {}
  for a, (_, low, high) in enumerate(captions().ATTRIBUTES):
    out[low], out[high] = (a, 0, high), (a, 2, low)
  return out


def captions():
  from mcti_jax.tiny import captions as tiny_captions
  return tiny_captions


def tiny_queries(num_classes: int, attributes: Sequence[str] = TINY_ATTRIBUTES,
                 template: str = "a photo of a {}") -> list[Query]:
  """For every class k and both words of each attribute: "<template with <cls-k>> <word>", typed by the word."""
  by_name = {name: (low, high) for name, low, high in captions().ATTRIBUTES}
  unknown = [a for a in attributes if a not in by_name]
  if unknown:
    raise ConfigError(f"tiny attributes {unknown} are unknown; the tiny CLIP knows {', '.join(by_name)}")
  template = tok.templates(template)[0]
  out = []
  for k in range(num_classes):
    for name in attributes:
      low, high = by_name[name]
      for word, other in ((low, high), (high, low)):
        out.append(parse_query(f"{template.format(f'<cls-{k}>')} {word}", type=word, opposite=other))
  return out


def tiny_levels(images: np.ndarray) -> np.ndarray:
  """Attribute levels [M, A] (0 low third, 1 middle, 2 high third) of uint8 images, by the pretraining terciles."""
  from mcti_jax.tiny.data import pretraining_data
  c = captions()
  return c.attribute_levels(c.shape_measures(np.asarray(images)), c.shape_measures(pretraining_data()[0]))


def tiny_relevance(queries: Sequence[Query], labels: np.ndarray, levels: np.ndarray) -> np.ndarray:
  """relevant [Q, M]: the image is of the query's class and its attribute is at the level the words name."""
  words = tiny_words()
  out = np.zeros((len(queries), len(labels)), bool)
  for i, q in enumerate(queries):
    if q.words not in words:
      raise ValueError(f"query {q.prompt!r}: {q.words!r} is not an attribute word of the tiny CLIP "
                       f"({', '.join(words)})")
    attribute, level, _ = words[q.words]
    out[i] = (np.asarray(labels) == q.class_index) & (levels[:, attribute] == level)
  return out


def tiny_gallery(manifest: dict, num_classes: int) -> D.LabeledImages:
  """The held-out digits of the trained classes minus the run's shots (as `evaluate.test_images`).

  Tokens learned from no images (DCT: the manifest's shots are null) get the held-out images of the digits their
  classifier targets (`target_digits`), labelled by token.
  """
  shots = manifest.get("shots", "missing")
  if shots is None:
    return D.from_digits("heldout", target_digits(manifest, num_classes))
  if shots == "missing" or (shots is not None and not str(shots.get("source", "")).startswith("digits")):
    where = "images the manifest does not name" if shots == "missing" else shots.get("source")
    raise ConfigError(f"the tiny world's gallery is the sklearn digits, but these tokens were trained on {where}; "
                      "give your gallery and queries as --config.labels=<labels file> (format in "
                      "mcti_jax/retrieval/labels.py)")
  pool = D.from_digits("heldout")
  shots = {s for c in (shots or {}).get("classes", []) for s in c["shots"]}
  keep = [i for i, (image_id, label) in enumerate(zip(pool.ids, pool.labels)) if label < num_classes
          and image_id not in shots]
  return pool.subset(keep)


def target_digits(manifest: dict, num_classes: int) -> list[int]:
  """The digit each of a classifier-trained export's tokens stands for: its classifier class's name (manifest
  "classifier.target_names"; older exports: the class names), which must be a digit's."""
  names = (manifest.get("classifier") or {}).get("target_names") or [c["name"] for c in manifest["classes"]]
  names = list(names)[:num_classes]
  digit_names = captions().NAMES
  unknown = [n for n in names if n not in digit_names]
  if unknown:
    raise ConfigError(f"the tiny world's gallery is the sklearn digits, but these tokens were learned for the "
                      f"classifier classes {unknown}, not digits; give your gallery and queries as "
                      "--config.labels=<labels file> (format in mcti_jax/retrieval/labels.py)")
  return [digit_names.index(n) for n in names]
