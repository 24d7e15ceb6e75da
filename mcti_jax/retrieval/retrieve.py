"""Composite retrieval: rank a gallery for prompts that put a class token among words ("a photo of a <cls-3> bold").

A query is the class token S_k followed by words that qualify it. Its CLIP text
feature (the token spliced into CLIP's text tower, as the CLIP-token head does;
queries.py, which GAIR shares) ranks the gallery's CLIP image features by
cosine. An image is relevant when it is of class k and shows the words: in the
tiny world, when its measured shape attribute (tiny/captions.py) falls in the
tercile the words name, the terciles of the pretraining images the tiny CLIP
learned its words from (tiny_world.py); elsewhere, as a person labelled it
(labels.py).

  queries = tiny_queries(10)                                  # "a photo of a <cls-k> bold", ... 60 queries
  text = prompt_features(clip, tokenizer, [q.prompt for q in queries], learned)
  report = metrics(text @ normalize(gallery_features).T, relevant, [q.type for q in queries])

`queries.fixed_queries` gives the baselines GAIR (retrieval/gair.py) must beat; `run` is
`mcti retrieve` (mcti_jax/configs/retrieve.py) and `evaluate_tiny` the same on the tiny
world for a demo.

The pieces: queries.py (parsing, the fixed queries), metrics.py (MRR, R@k),
tiny_world.py (the tiny world's queries and relevance), labels.py (a person's
labels file and its format), gair.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mcti_jax import data as D
from mcti_jax import paths, plots
from mcti_jax.errors import ConfigError
from mcti_jax.generation import generate
from mcti_jax.models import hf_io
from mcti_jax.models.frozen import Frozen
from mcti_jax.retrieval import gair
from mcti_jax.retrieval.labels import load_labels
from mcti_jax.retrieval.metrics import metrics, top_results
from mcti_jax.retrieval.queries import Query, check_classes, fixed_queries, normalize
from mcti_jax.retrieval.settings import LAMS, from_config
from mcti_jax.retrieval.tiny_world import TINY_ATTRIBUTES, tiny_gallery, tiny_levels, tiny_queries, tiny_relevance
from mcti_jax.tokens import conditioning


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


FRAMES = "frames: green = relevant, red = not relevant"


def strip(rows: Sequence[tuple[Sequence[np.ndarray | None], Sequence[bool | None]]], size: int = 64,
          gap: int = 8, row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
          title: str = "") -> np.ndarray:
  """Rows of images (None = an empty cell) with their marks -> one labelled uint8 image (plots.image_grid), cells
  size x size, `gap` white pixels apart."""
  width = max(len(images) for images, _ in rows)
  cells = np.full((len(rows), width, size, size, 3), 255, np.uint8)
  for r, (images, marks) in enumerate(rows):
    for c, (image, mark) in enumerate(zip(images, marks)):
      if image is not None or mark is not None:
        cells[r, c] = _cell(image, size, mark)
  return plots.image_grid(cells, row_labels, col_labels, title, cell=size, gap=gap)


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
  """Row per query kind: [generated images (GAIR's row)] | its top `count` gallery images, framed by relevance;
  the query's prompt in the title, what each row is at its left, the ranks above."""
  generated = [] if refined is None else list(refined.images[i])
  rows, labels = [], []
  for kind in dict.fromkeys(k for k in shown if k in scores):
    top = np.argsort(-scores[kind][i], kind="stable")[:count]
    images = list(s.gallery.load(top, s.resolution))
    lead = (generated if kind == "gair" else [None] * len(generated)) + [None] * bool(generated)  # | a gap
    rows.append((lead + images, [None] * len(lead) + [bool(s.relevant[i, j]) for j in top]))
    labels.append(_KIND_LABELS.get(kind, f"best fixed query: q(λ={kind.removeprefix('lam=')})"))
  columns = [f"gen {j + 1}" for j in range(len(generated))] + [""] * bool(generated) + [
      f"rank {j + 1}" for j in range(len(top))]
  q = s.queries[i]
  title = (f"query {i}: \"{q.prompt}\" ({int(s.relevant[i].sum())} relevant in the gallery)\n"
           + ("GAIR's row starts with the images it generated for the query. " if generated else "")
           + ("q(λ): the class prompt's CLIP feature moved λ of the way to the prompt's. "
              if any(k.startswith("lam=") for k in shown if k in scores) else "") + FRAMES)
  return strip(rows, row_labels=labels, col_labels=columns, title=title)


_KIND_LABELS = {"gair": "GAIR (lam searched by judging its generated images)",
                "composite": "fixed query: the prompt as written"}


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
  named = export.manifest_models(manifest, tokens)
  sd_path = sd_path or named["base_model"]
  clip_path = clip_path or named["clip_model"]
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
  """`mcti retrieve` (mcti_jax/configs/retrieve.py): results.json and strips in config.out."""
  from mcti_jax.runtime import parallel
  if not config.tokens:
    raise ConfigError("give the tokens to search with: --tokens <export folder of `mcti train`> "
                      "(e.g. runs/demo/5shot/seed1/export/mcti)")
  paths.input_folder(config.tokens, "--tokens", "pass the folder `mcti train` exported (e.g. runs/<name>/export/mcti)")
  if not (Path(config.tokens) / "manifest.json").is_file():
    raise ConfigError(f"--tokens {config.tokens} holds no manifest.json: pass the folder `mcti train` exported "
                      "(e.g. runs/<name>/export/mcti)")
  paths.output_folder(config.out, "config.out")  # before the models load and GAIR draws, not after
  lams = config.lams
  if isinstance(lams, str) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in lams):
    raise ConfigError(f"config.lams={lams!r} must be finite numbers, e.g. --config.lams='(0.0, 0.5, 1.5)'")
  gair_config = from_config(config.gair) if config.gair.enabled else None
  mesh = parallel.make_mesh(config.num_devices)
  common = dict(sd_path=config.sd_path or None, clip_path=config.clip_path or None, need_sd=gair_config is not None,
                mesh=mesh, log=log)
  if config.labels:
    setup = labels_setup(config.tokens, config.labels, resolution=config.resolution, **common)
  else:
    setup = tiny_setup(config.tokens, attributes=tuple(config.attributes), template=config.template, **common)
  results = retrieve(setup, tuple(lams), gair_config, config.out, strip_images=config.strip_images, log=log)
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
