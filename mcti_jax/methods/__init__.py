"""One module per method: everything that is that method, in one file.

A trainable method module defines:

  defaults() -> ConfigDict   its phase settings: lr and the method's own knobs
  needs: tuple[str, ...]     backbone parts beyond SD's text encoder and UNet ("clip")
  cross_class: bool          whether its loss compares classes (then: cross_terms)
  metric_titles: dict        its terms' names -> titles in loss.png
  item_terms(item, ctx, cfg) -> dict[str, scalar]
                             the terms of one sampled item of class k (see train_step.Item)
  cross_terms(batch, k, everyone, cfg) -> dict[str, scalar]
                             cross-class methods only: class k's batch against every class's items
  loss(terms, cfg) -> scalar the loss of class k from the means of its terms over its batch

and optionally (DCT uses them):

  uses_shots: bool           False: it needs no images of the classes (no data is loaded)
  class_terms(vectors, k, key, ctx, cfg) -> dict
                             class k's terms from items the method draws itself, instead of the trainer's
                             noised shots (item_terms is then unused)
  class_state(vectors, cfg) -> dict, next_state(state, vectors, terms, step, cfg) -> dict
                             per-class state kept across steps; a class whose state["training"] is False gets
                             no update (a mask in the same compiled step)
  final_vectors(state, vectors) -> vectors
                             what the phase ends with for a class (DCT: the token of its lowest loss)
  check(cfg) -> list[str]    problems with its settings, beyond "a finite number >= 0"

The trainer runs `config.phases` in order, each with the settings in
`config.phase.<name>` (made by `phase()` below), and names no method.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import ml_collections

from mcti_jax.errors import ConfigError

TRAINABLE = ("ti", "mcti", "gcpl", "comple", "dct", "custom_tokens")
INITS = ("previous", "initial")  # a phase starts from the previous phase's tokens, or from the initial ones


def get(name: str) -> ModuleType:
  """The module of a trainable method."""
  if name not in TRAINABLE:
    raise ConfigError(f"unknown method {name!r}; trainable methods: {', '.join(TRAINABLE)}")
  return importlib.import_module(f"mcti_jax.methods.{name}")


def phase(method: str, **overrides) -> ml_collections.ConfigDict:
  """The settings of one training phase: the trainer's fields, then the method's defaults, then `overrides`.

  steps: how many steps; init: "previous" (go on from the tokens the previous phase ended with) or "initial"
  (start again from the initial tokens: phases that compare settings side by side in one run); templates:
  None (the config's `templates`) or a template spec (tokens.templates); weight_decay: AdamW's; subspace: train
  the tokens' coordinates in the span of `config.tokens.subspace_words` instead of the vectors (subspace.py).
  """
  c = ml_collections.ConfigDict(dict(method=method, steps=0, init="previous", templates=None, weight_decay=1e-2,
                                     subspace=False))
  c.update(get(method).defaults())
  unknown = sorted(set(overrides) - set(c.keys()))
  if unknown:
    raise ConfigError(f"method {method!r} has no settings {unknown}; it has: {', '.join(sorted(c.keys()))}")
  c.update(overrides)
  return c
