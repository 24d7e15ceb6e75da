"""Evaluators by name, as big_vision's `config.evals`.

  c.evals.mcti = dict(type="clip_tokens", label="MC-TI", phase="mcti")
  c.evals.dic_fewshot = dict(type="dic", label="DiC few-shot (tokens)", tokens="mcti")

Each `type` is a module here holding one class `Evaluator`, made from its
entry's other fields; `Evaluator.run(cell, name)` returns (scores [M, K],
labels [M], info) on the test images of one (N-shot, seed) cell, or a
retrieval evaluator's metrics as a dict (its row: mrr, r1, r5, ...). A new
evaluator is one module plus one config line.

May import: as evaluation: everything below demos and cli.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from mcti_jax.errors import ConfigError
from mcti_jax.evaluation.evaluators.cell import Cell, Models  # noqa: F401  (what every evaluator's run takes)

TYPES = ("clip_tokens", "clip_features", "clip_zeroshot", "coop", "dic", "retrieval", "generation_accuracy",
         "clip_similarity")


def make(name: str, entry) -> Any:
  """The evaluator of config.evals.<name>; a clear error for an unknown type or field."""
  entry = dict(entry)
  kind = entry.pop("type", None)
  entry.pop("label", None)
  if kind not in TYPES:
    raise ConfigError(f"config.evals.{name}.type={kind!r}; evaluator types: {', '.join(TYPES)}")
  cls = importlib.import_module(f"mcti_jax.evaluation.evaluators.{kind}").Evaluator
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(entry) - fields)
  if unknown:
    raise ConfigError(f"config.evals.{name} ({kind}) has no fields {unknown}; it has: type, label, "
                      f"{', '.join(sorted(fields))}")
  try:
    return cls(**entry)
  except ValueError as e:  # a field out of range: its own check says which
    raise ConfigError(f"config.evals.{name}: {e}; fix it with --config.evals.{name}.<field>=<value>") from None


def label(name: str, entry) -> str:
  """How a row is named in tables and plots."""
  return entry.get("label") or name
