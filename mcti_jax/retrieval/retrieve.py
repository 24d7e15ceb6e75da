"""Composite retrieval: rank a gallery for prompts that put a class token among words ("a photo of a <cls-3> bold").

A query is the class token S_k followed by words that qualify it. Its CLIP text
feature (the token spliced into CLIP's text tower, as the CLIP-token head does;
queries.py, which GAIR shares) ranks the gallery's CLIP image features by
cosine. An image is relevant when it is of class k and shows the words: in the
tiny world, when its measured shape attribute (tiny/captions.py) falls in the
tercile the words name, the terciles of the pretraining images the tiny CLIP
learned its words from; elsewhere, as a person labelled it (`load_labels`).

  queries = tiny_queries(10)                                  # "a photo of a <cls-k> bold", ... 60 queries
  text = prompt_features(clip, tokenizer, [q.prompt for q in queries], learned)
  report = metrics(text @ normalize(gallery_features).T, relevant, [q.type for q in queries])

`queries.fixed_queries` gives the baselines GAIR (retrieval/gair.py) must beat; `run` is
`mcti retrieve` (configs/retrieve.py) and `evaluate_tiny` the same on the tiny
world for a demo.

A person's labels are a JSON file over a folder of images:

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
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mcti_jax.tokens import conditioning
from mcti_jax.generation import generate
from mcti_jax import paths
from mcti_jax import data as D
from mcti_jax.tokens import placeholders as tok
from mcti_jax.retrieval import gair
from mcti_jax.errors import ConfigError
from mcti_jax.models import hf_io
from mcti_jax.models.frozen import Frozen
from mcti_jax.retrieval.queries import Query, check_classes, fixed_queries, normalize, parse_query

KS = (1, 5)  # R@k reported
TOP = 5  # results per query in results.json
LAMS = (0.0, 0.25, 0.5, 0.75, 1.5, 2.0)  # the fixed queries q(lam); q(1) is the composite prompt, reported as it
TINY_ATTRIBUTES = ("ink", "width", "slant")  # the tiny world's queries: both words of each (tiny/captions.py)


# ------------------------------------------------------------------ metrics


def first_relevant_ranks(scores, relevant) -> np.ndarray:
  """1-based rank of each query's best-placed relevant image [Q]; 0 where the query has none.

  scores [Q, M] (higher first), relevant bool [Q, M]. Equal scores keep gallery
  order (a stable sort), so ranks are reproducible.
  """
  scores, relevant = np.asarray(scores), np.asarray(relevant, bool)
  if scores.shape != relevant.shape or scores.ndim != 2:
    raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} must both be [queries, gallery images]")
  order = np.argsort(-scores, axis=1, kind="stable")
  hits = np.take_along_axis(relevant, order, 1)
  return np.where(hits.any(1), hits.argmax(1) + 1, 0)


def summarize(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, Any]:
  """MRR and R@k (the fraction of queries with a relevant image in the top k) of first-relevant ranks; 0 = skipped."""
  ranks = np.asarray(ranks)
  kept = ranks[ranks > 0]
  out: dict[str, Any] = {"queries": int(kept.size), "skipped": int((ranks == 0).sum())}
  out["mrr"] = float(np.mean(1.0 / kept)) if kept.size else None
  for k in ks:
    out[f"r{k}"] = float(np.mean(kept <= k)) if kept.size else None
  return out


def metrics(scores, relevant, types: Sequence[str] | None = None, ks: Sequence[int] = KS) -> dict[str, Any]:
  """{"overall": {mrr, r1, r5, queries, skipped}, "by_type": {type: the same}} of a score matrix [Q, M].

  A query with no relevant gallery image is skipped (counted in "skipped").
  """
  ranks = first_relevant_ranks(scores, relevant)
  out = {"overall": summarize(ranks, ks)}
  if types is not None:
    types = np.asarray(types, object)
    if len(types) != len(ranks):
      raise ValueError(f"{len(types)} query types for {len(ranks)} queries")
    out["by_type"] = {t: summarize(ranks[types == t], ks) for t in dict.fromkeys(types.tolist())}
  return out


def top_results(scores, relevant, ids: Sequence[str], k: int = TOP) -> list[list[dict[str, Any]]]:
  """Each query's k best images: [{"id", "score", "relevant"}], best first."""
  scores = np.asarray(scores)
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return [[{"id": ids[j], "score": round(float(scores[q, j]), 5), "relevant": bool(relevant[q, j])} for j in row]
          for q, row in enumerate(order)]


# ------------------------------------------------------------------ the tiny world


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
                      "mcti_jax/retrieval/retrieve.py)")
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
                      "--config.labels=<labels file> (format in mcti_jax/retrieval/retrieve.py)")
  return [digit_names.index(n) for n in names]


# ------------------------------------------------------------------ a person's labels


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
                      "...]}} with at least one query (see mcti_jax/retrieval/retrieve.py)")
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


# ------------------------------------------------------------------ image strips


def _cell(image: np.ndarray | None, size: int, mark: bool | None) -> np.ndarray:
  """One image at size x size (nearest upscale), framed green (relevant), red (not) or not at all."""
  out = np.full((size, size, 3), 255, np.uint8)
  if image is not None:
    image = np.asarray(image, np.uint8)
    h, w = image.shape[:2]
    ys, xs = (np.arange(size) * h // size), (np.arange(size) * w // size)
    out = image[ys][:, xs].copy()
  if mark is not None:
    b = max(1, size // 24)
    color = (40, 200, 60) if mark else (220, 40, 40)
    out[:b], out[-b:], out[:, :b], out[:, -b:] = color, color, color, color
  return out


def strip(rows: Sequence[tuple[Sequence[np.ndarray | None], Sequence[bool | None]]], size: int = 64,
          gap: int = 8) -> np.ndarray:
  """Rows of images (None = an empty cell) with their marks -> one uint8 image, `gap` white pixels between cells."""
  width = max(len(images) for images, _ in rows)
  out = np.full((len(rows) * (size + gap) - gap, width * (size + gap) - gap, 3), 255, np.uint8)
  for r, (images, marks) in enumerate(rows):
    for c, (image, mark) in enumerate(zip(images, marks)):
      if image is not None or mark is not None:
        out[r * (size + gap):r * (size + gap) + size, c * (size + gap):c * (size + gap) + size] = _cell(image, size,
                                                                                                      mark)
  return out


# ------------------------------------------------------------------ a whole retrieval


@dataclasses.dataclass
class RetrievalSetup:
  """What one retrieval needs: models, learned tokens, the gallery and its features, the queries and relevance."""
  clip: Frozen
  tokenizer: Any
  learned: Any  # conditioning.LearnedTokens
  gallery: D.LabeledImages
  gallery_features: np.ndarray  # [M, P] CLIP image features
  queries: list[Query]
  relevant: np.ndarray  # bool [Q, M]
  resolution: int  # the gallery's images are read at this size for the strips
  pooling: str = "eos"
  sd: Any = None  # pipeline.StableDiffusion; GAIR needs it


def retrieve(setup: RetrievalSetup, lams: Sequence[float], gair_config=None, out_dir: str | os.PathLike | None = None,
             strip_images: int = 8, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Rank the gallery with every fixed query and, given `gair_config`, with GAIR; write results.json and strips.

  Returns results.json's content: "metrics" per query kind (composite, lam=<l>, gair), "best_fixed", "per_query".
  """
  s = setup
  types = [q.type for q in s.queries]
  gallery = normalize(np.asarray(s.gallery_features, np.float32))
  kinds = fixed_queries(s.clip, s.tokenizer, s.queries, s.learned, lams, s.pooling)
  refined = None
  if gair_config is not None:
    if s.sd is None:
      raise ValueError("GAIR generates images: the setup needs Stable Diffusion (sd)")
    start = time.time()
    refined = gair.refine(s.sd, s.clip, s.tokenizer, s.learned, s.queries, gair_config, pooling=s.pooling, log=log)
    kinds["gair"] = refined.query_features
    log(f"GAIR: {len(s.queries)} queries, {gair_config.rounds} rounds in {time.time() - start:.1f}s")
  scores = {kind: features @ gallery.T for kind, features in kinds.items()}
  report = {kind: metrics(sc, s.relevant, types) for kind, sc in scores.items()}
  fixed = [k for k in report if k != "gair" and report[k]["overall"]["mrr"] is not None]
  best = max(fixed, key=lambda k: report[k]["overall"]["mrr"]) if fixed else None
  results: dict[str, Any] = {"gallery": {"source": s.gallery.source, "images": len(s.gallery)},
                             "queries": len(s.queries), "metrics": report, "best_fixed": best, "lams": list(lams)}
  tops = {kind: top_results(scores[kind], s.relevant, s.gallery.ids) for kind in ("composite", "gair", best)
          if kind in scores}
  per_query = []
  for i, q in enumerate(s.queries):
    row = {"prompt": q.prompt, "type": q.type, "relevant": int(s.relevant[i].sum()),
           "top": {kind: t[i] for kind, t in tops.items()}}
    if refined is not None:
      row["gair"] = refined.summary(i)
    per_query.append(row)
  results["per_query"] = per_query
  if refined is not None:
    results["gair"] = {"config": dataclasses.asdict(gair_config), "seconds": refined.seconds}
  if out_dir is not None:
    files = {"results.json": results}
    shown = ("gair", "composite") if refined is not None else ("composite", best)
    for i, q in enumerate(s.queries):
      files[f"strips/q{i:03d}.png"] = generate.png(_query_strip(s, scores, shown, i, refined, strip_images))
      per_query[i]["strip"] = f"strips/q{i:03d}.png"
    hf_io.write_folder(out_dir, files)
    results["out_dir"] = str(out_dir)
  return results


def _query_strip(s: RetrievalSetup, scores: dict, shown: tuple[str, ...], i: int, refined, count: int) -> np.ndarray:
  """Row per query kind: [generated images (GAIR's row)] | its top `count` gallery images, framed by relevance."""
  generated = [] if refined is None else list(refined.images[i])
  rows = []
  for kind in dict.fromkeys(k for k in shown if k in scores):
    top = np.argsort(-scores[kind][i], kind="stable")[:count]
    images = list(s.gallery.load(top, s.resolution))
    lead = generated if kind == "gair" else [None] * len(generated)
    rows.append((lead + [None] + images, [None] * (len(lead) + 1) + [bool(s.relevant[i, j]) for j in top]))
  return strip(rows)


# ------------------------------------------------------------------ entry points


def evaluate_tiny(tokens: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, gair_config=None,
                  attributes: Sequence[str] = TINY_ATTRIBUTES, lams: Sequence[float] = LAMS,
                  template: str = "a photo of a {}", sd_path: str | None = None, clip_path: str | None = None,
                  use_gair: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Composite retrieval on the tiny world with one export: the fixed queries and GAIR, MRR / R@1 / R@5.

  The gallery is the held-out digits minus the export's shots; the queries are
  "a photo of a <cls-k> <word>" for both words of each attribute. Returns
  results.json's content plus "seconds" (and "out_dir" where it was written).
  """
  start = time.time()
  setup = tiny_setup(tokens, attributes=attributes, template=template, sd_path=sd_path, clip_path=clip_path,
                     log=log)
  config = (gair_config or gair.GairConfig()) if use_gair else None
  results = retrieve(setup, lams, config, out_dir, log=log)
  results["seconds"] = time.time() - start
  return results


def load_models(tokens: str | os.PathLike, sd_path: str | None, clip_path: str | None, need_sd: bool):
  """(sd or None, frozen CLIP, tokenizer, learned tokens, pooling, manifest): the models default to the export's."""
  from mcti_jax.tokens import export
  from mcti_jax.models import pipeline
  from mcti_jax.models.frozen import freeze
  _, manifest = export.load_tokens(tokens)
  sd_path = sd_path or manifest.get("base_model")
  clip_path = clip_path or manifest.get("clip_model")
  if not clip_path or (need_sd and not sd_path):
    raise ConfigError(f"{tokens}/manifest.json does not name its models; give --config.sd_path and "
                      "--config.clip_path")
  clip_model, clip_tokenizer = pipeline.load_clip(clip_path)
  sd = pipeline.load_stable_diffusion(sd_path) if need_sd else None
  tokenizer = sd.tokenizer if sd is not None else clip_tokenizer  # SD 1.x and its CLIP share one vocabulary
  width = clip_model.text_model.config.hidden_size
  learned = conditioning.LearnedTokens.from_export(tokens, tokenizer, width)
  return sd, freeze(clip_model), tokenizer, learned, manifest.get("pooling", "eos"), manifest


def gallery_features(clip: Frozen, gallery: D.LabeledImages, resolution: int, mesh=None) -> np.ndarray:
  from mcti_jax.runtime import parallel
  from mcti_jax.classify import clip_head
  return clip_head.image_features(clip, gallery, resolution, mesh or parallel.make_mesh(1), progress=False)


def tiny_setup(tokens, *, attributes=TINY_ATTRIBUTES, template="a photo of a {}", sd_path=None,
               clip_path=None, need_sd: bool = True, mesh=None, log=print) -> RetrievalSetup:
  """The tiny world's retrieval for one export: its gallery, the shape-word queries and their relevance."""
  sd, clip, tokenizer, learned, pooling, manifest = load_models(tokens, sd_path, clip_path, need_sd)
  num_classes = learned.class_tokens.num_classes
  gallery = tiny_gallery(manifest, num_classes)
  queries = tiny_queries(num_classes, attributes, template)
  resolution = 16
  images = gallery.load(np.arange(len(gallery)), resolution)
  relevant = tiny_relevance(queries, gallery.labels, tiny_levels(images))
  log(f"tiny gallery: {len(gallery)} held-out digits; {len(queries)} queries, "
      f"{int((~relevant.any(1)).sum())} without a relevant image (skipped)")
  return RetrievalSetup(clip, tokenizer, learned, gallery, gallery_features(clip, gallery, resolution, mesh), queries,
                        relevant, resolution, pooling, sd)


def labels_setup(tokens, labels_path, *, sd_path=None, clip_path=None, need_sd: bool = True, resolution: int = 0,
                 mesh=None, log=print) -> RetrievalSetup:
  """A person's gallery and labels (`load_labels`) with one export."""
  labels = load_labels(labels_path)
  sd, clip, tokenizer, learned, pooling, _ = load_models(tokens, sd_path, clip_path, need_sd)
  check_classes(labels.queries, learned.class_tokens.num_classes, str(labels_path))
  resolution = resolution or clip.module.config.vision_config.image_size
  log(f"gallery: {len(labels.gallery)} images in {labels.gallery.source}; {len(labels.queries)} queries")
  return RetrievalSetup(clip, tokenizer, learned, labels.gallery,
                        gallery_features(clip, labels.gallery, resolution, mesh), labels.queries, labels.relevant,
                        resolution, pooling, sd)


def run(config, log: Callable[[str], None] = print) -> dict[str, Any]:
  """`mcti retrieve` (configs/retrieve.py): results.json and strips in config.out."""
  from mcti_jax.runtime import parallel
  if not config.tokens:
    raise ConfigError("give the tokens to search with: --tokens <export folder of `mcti train`> "
                      "(e.g. runs/demo/5shot/seed1/export/mcti)")
  paths.input_folder(config.tokens, "--tokens", "pass the folder `mcti train` exported (e.g. runs/<name>/export/mcti)")
  if not (Path(config.tokens) / "manifest.json").is_file():
    raise ConfigError(f"--tokens {config.tokens} holds no manifest.json: pass the folder `mcti train` exported "
                      "(e.g. runs/<name>/export/mcti)")
  paths.output_folder(config.out, "config.out")  # before the models load and GAIR draws, not after
  gair_config = gair.from_config(config.gair) if config.gair.enabled else None
  mesh = parallel.make_mesh(config.num_devices)
  common = dict(sd_path=config.sd_path or None, clip_path=config.clip_path or None, need_sd=gair_config is not None,
                mesh=mesh, log=log)
  if config.labels:
    setup = labels_setup(config.tokens, config.labels, resolution=config.resolution, **common)
  else:
    setup = tiny_setup(config.tokens, attributes=tuple(config.attributes), template=config.template, **common)
  results = retrieve(setup, tuple(config.lams), gair_config, config.out, strip_images=config.strip_images, log=log)
  log(table(results))
  log(f"wrote {Path(config.out) / 'results.json'} and {len(setup.queries)} strips in {Path(config.out) / 'strips'}")
  return results


def table(results: dict) -> str:
  """The overall metrics of every query kind as a markdown table (%, MRR x 100)."""
  lines = ["| query | MRR | R@1 | R@5 |", "|---|---|---|---|"]
  for kind, m in results["metrics"].items():
    o = m["overall"]
    if o["mrr"] is None:
      continue
    label = f"{kind} (best fixed)" if kind == results.get("best_fixed") else kind
    lines.append(f"| {label} | {100 * o['mrr']:.1f} | {100 * o['r1']:.1f} | {100 * o['r5']:.1f} |")
  first = next(iter(results["metrics"].values()))["overall"]
  return "\n".join(lines) + f"\n\n{first['queries']} queries, {first['skipped']} skipped (no relevant image)"
