"""Classification metrics from a score matrix: top-k, per-class accuracy, confusion."""

from __future__ import annotations

import numpy as np


def classification_report(scores: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> dict:
  """scores [M, K] (higher = more likely), labels [M] -> top-1, top-5, per-class accuracy, confusion [K, K]."""
  scores, labels = np.asarray(scores), np.asarray(labels)
  k = num_classes or scores.shape[1]
  if len(labels) == 0:
    raise ValueError("no test images: cannot compute accuracy on an empty split")
  predictions = scores.argmax(1)
  top5 = np.argsort(-scores, axis=1)[:, :5]
  confusion = np.zeros((k, k), np.int64)
  np.add.at(confusion, (labels, predictions), 1)
  counts = confusion.sum(1)
  per_class = np.where(counts > 0, np.diag(confusion) / np.maximum(counts, 1), np.nan)
  return {"top1": float(np.mean(predictions == labels)), "top5": float(np.mean((top5 == labels[:, None]).any(1))),
          "per_class": per_class.tolist(), "confusion": confusion.tolist(), "num_images": int(len(labels))}


def accuracy_on(report: dict, classes) -> float:
  """Accuracy on the images of a subset of classes (e.g. the known digits), from the confusion matrix."""
  confusion = np.asarray(report["confusion"])[list(classes)]
  return float(confusion[np.arange(len(classes)), list(classes)].sum() / max(confusion.sum(), 1))
