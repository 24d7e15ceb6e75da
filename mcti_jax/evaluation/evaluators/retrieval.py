"""Composite retrieval: rank the cell's test images for "a photo of a S_k <words>" queries with a phase's tokens.

Its row holds MRR, R@1 and R@5 (retrieval_metrics.metrics, overall and per query type)
instead of a classification report. The gallery is the cell's test images;
relevance is the tiny world's measured shape attributes (the digits source), or
a person's labels file (`labels`; its gallery folder then replaces the test
images). `query` picks how a query is turned into a CLIP feature: "composite"
(the prompt's own), "mix" (q(lam), queries.mix) or "gair" (retrieval/gair.py,
settings in `gair`).

  c.evals.gair = dict(type="retrieval", label="GAIR (MC-TI)", phase="mcti", query="gair")
  c.evals.composite = dict(type="retrieval", label="composite prompt (MC-TI)", phase="mcti", query="composite")
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mcti_jax.retrieval import retrieve
from mcti_jax.retrieval import labels as labels_lib
from mcti_jax.retrieval import metrics as retrieval_metrics
from mcti_jax.retrieval import tiny_world
from mcti_jax.retrieval import gair as gair_lib
from mcti_jax.retrieval import settings as gair_settings
from mcti_jax.errors import ConfigError
from mcti_jax.retrieval.queries import check_classes, fixed_queries, normalize, prompt_features

QUERIES = ("composite", "mix", "gair")


@dataclasses.dataclass(frozen=True)
class Evaluator:
  phase: str = "mcti"  # whose tokens: a phase of the training run
  query: str = "gair"  # composite | mix | gair
  lam: float = 0.5  # q(lam) of query="mix"
  attributes: tuple = tiny_world.TINY_ATTRIBUTES  # the tiny world's queries: both words of each
  template: str = "a photo of a {}"  # the class prompt; the words follow it
  gair: Any = None  # GairConfig fields to change, e.g. dict(rounds=4)
  labels: str = ""  # a labels file (retrieval/labels.py): its gallery and queries instead of the tiny world's

  def __post_init__(self):
    if self.query not in QUERIES:
      raise ConfigError(f"retrieval evaluator: query={self.query!r}; use one of {', '.join(QUERIES)}")
    gair_settings.from_config(self.gair or {})  # refuse unknown GAIR settings before any training

  def run(self, cell, name: str) -> dict[str, Any]:
    del name
    setup = self.setup(cell)
    s = setup
    info: dict[str, Any] = {}
    if self.query == "composite":
      features = prompt_features(s.clip, s.tokenizer, [q.prompt for q in s.queries], s.learned, s.pooling)
    elif self.query == "mix":
      features = fixed_queries(s.clip, s.tokenizer, s.queries, s.learned, (self.lam,), s.pooling)
      features = features[f"lam={self.lam:g}"]
    else:
      refined = gair_lib.refine(s.sd, s.clip, s.tokenizer, s.learned, s.queries,
                                gair_settings.from_config(self.gair or {}), pooling=s.pooling)
      features = refined.query_features
      info = {"lam_mean": float(np.mean(refined.lam)), "gair_seconds": refined.seconds}
    scores = features @ normalize(np.asarray(s.gallery_features, np.float32)).T
    report = retrieval_metrics.metrics(scores, s.relevant, [q.type for q in s.queries])
    return {**report["overall"], "by_type": report["by_type"], **info}

  def setup(self, cell) -> retrieve.RetrievalSetup:
    m, r, tc = cell.models, cell.result, cell.train_config
    learned, tokenizer = cell.learned_tokens(self.phase)
    if self.labels:
      labels = labels_lib.load_labels(self.labels)
      check_classes(labels.queries, r.num_classes, self.labels)
      features = retrieve.gallery_features(m.clip, labels.gallery, tc.data.resolution, m.mesh)
      return retrieve.RetrievalSetup(m.clip, tokenizer, learned, labels.gallery, features, labels.queries,
                                     labels.relevant, tc.data.resolution, m.pooling, m.sd)
    if tc.data.source != "digits":
      raise ConfigError(f"the retrieval evaluator knows relevance on the tiny digits only (data.source="
                        f"{tc.data.source!r}); give labels=<labels file> (format in mcti_jax/retrieval/labels.py)")
    queries = tiny_world.tiny_queries(r.num_classes, self.attributes, self.template)
    levels = tiny_world.tiny_levels(cell.test.load(np.arange(len(cell.test)), tc.data.resolution))
    relevant = tiny_world.tiny_relevance(queries, cell.test.labels, levels)
    return retrieve.RetrievalSetup(m.clip, tokenizer, learned, cell.test, cell.test_features, queries, relevant,
                                   tc.data.resolution, m.pooling, m.sd)
