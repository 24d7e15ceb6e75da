"""Retrieval metrics of a score matrix [queries, gallery images]: the first relevant image's rank, MRR and R@k."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

KS = (1, 5)  # R@k reported
TOP = 5  # results per query in results.json


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
