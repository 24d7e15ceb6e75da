"""One module per method: everything that is that method, in one file.

A trainable method module defines (the kinds as typing.Protocols, and the rules, in protocol.py):

  defaults() -> ConfigDict   its phase settings: lr and the method's own knobs
  needs: tuple[str, ...]     models to load beyond SD's text encoder, UNet and VAE ("clip", "classifier")
  cross_class: bool          whether its loss compares classes (then: cross_terms)
  metric_titles: dict        its terms' names -> titles in loss.png
  loss(terms, cfg) -> scalar the loss of class k from the means of its terms over its batch

and its items' terms, one of:

  item_terms(item, ctx, cfg) -> dict[str, scalar]
                             the terms of one sampled item of class k (see train_step.Item)
  class_terms(vectors, k, key, ctx, cfg) -> dict, with uses_shots: bool
                             class k's terms from items the method draws itself (DCT: its generations); uses_shots
                             False: no images of the classes are loaded

and optionally:

  cross_terms(batch, k, everyone, cfg) -> dict    with cross_class = True (and item_terms): class k's batch
                             against every class's items
  class_state(vectors, cfg), next_state(state, vectors, terms, step, cfg), final_vectors(state, vectors)
                             all three or none: per-class state kept across steps (a class whose state["training"]
                             is False gets no update) and the vectors a phase ends with (DCT: its lowest-loss ones)
  check(cfg) -> list[str]    problems with its settings, beyond "a finite number >= 0"
  backbone_parts(loaded) -> dict
                             its own frozen parts of the step's Backbone (DCT: VAE, classifier, targets, the ""
                             prompt's context), built from what the trainer loaded (protocol.Loaded)

Every `cfg` is a protocol.Settings: the phase's settings without the trainer's (TRAINER_FIELDS). A module is
checked once when looked up (`get`, `capabilities`): a contradictory one is refused with a TypeError, and the
trainer reads its `Capabilities` instead of probing it.

The trainer runs `config.phases` in order, each with the settings in
`config.phase.<name>` (made by `phase()` below), and names no method.

May import: errors, models, tokens, generation, classify.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import ml_collections

from mcti_jax.errors import ConfigError
from mcti_jax.methods.protocol import Capabilities, capabilities

TRAINABLE = ("ti", "mcti", "gcpl", "comple", "dct", "custom_tokens")
INITS = ("previous", "initial")  # a phase starts from the previous phase's tokens, or from the initial ones
# The trainer's settings of every phase, with their defaults; the method never reads them. lr is the trainer's
# too, but its value is the method's (defaults() gives it), and a method's defaults() may change the others'
# (GCPL's templates).
TRAINER_FIELDS = {"method": None, "steps": 0, "init": "previous", "templates": None, "weight_decay": 1e-2,
                  "subspace": False, "lr": None}

__all__ = ["TRAINABLE", "INITS", "TRAINER_FIELDS", "Capabilities", "capabilities", "get", "own_settings", "phase"]


def get(name: str) -> ModuleType:
  """The module of a trainable method, checked against the protocol (protocol.capabilities)."""
  if name not in TRAINABLE:
    raise ConfigError(f"unknown method {name!r}; trainable methods: {', '.join(TRAINABLE)}")
  module = importlib.import_module(f"mcti_jax.methods.{name}")
  capabilities(module)
  return module


def own_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
  """The settings a method reads (its `cfg`): a phase's, less the trainer's (TRAINER_FIELDS)."""
  return {k: v for k, v in settings.items() if k not in TRAINER_FIELDS}


def phase(method: str, **overrides) -> ml_collections.ConfigDict:
  """The settings of one training phase: the trainer's fields, then the method's defaults, then `overrides`.

  steps: how many steps; init: "previous" (go on from the tokens the previous phase ended with) or "initial"
  (start again from the initial tokens: phases that compare settings side by side in one run); templates:
  None (the config's `templates`) or a template spec (tokens.templates); weight_decay: AdamW's; subspace: train
  the tokens' coordinates in the span of `config.tokens.subspace_words` instead of the vectors (tokens/subspace.py).
  """
  c = ml_collections.ConfigDict({**TRAINER_FIELDS, "method": method})  # lr: None until the method's defaults
  c.update(get(method).defaults())
  unknown = sorted(set(overrides) - set(c.keys()))
  if unknown:
    raise ConfigError(f"method {method!r} has no settings {unknown}; it has: {', '.join(sorted(c.keys()))}")
  c.update(overrides)
  return c
