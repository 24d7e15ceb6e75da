"""The method contract as types: a Protocol per kind of method, and the Capabilities the trainer reads.

A method module is checked once, when it is looked up (`methods.get`, `methods.capabilities`): what it defines
decides its kinds, a contradictory or half-defined kind is refused with a TypeError (a method module is
developer code, not input), and the trainer reads the resulting `Capabilities` instead of probing the module.

  Method       every method: defaults, needs, cross_class, metric_titles, loss
  ShotMethod   takes the trainer's noised shots: item_terms
  CrossClass   a ShotMethod whose loss compares classes (cross_class = True): cross_terms
  DrawsItems   draws its own items instead of shots: class_terms, and says whether it uses shots (uses_shots)
  Stateful     keeps per-class state across steps: class_state, next_state, final_vectors (all three or none)
  Checks       has rules for its settings beyond "a finite number >= 0": check
  BuildsParts  puts its own frozen parts into the step's Backbone (Backbone.parts): backbone_parts

Every hook that takes `cfg` gets the same `Settings`: the phase's settings that are not the trainer's.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

# The models the trainer loads beyond Stable Diffusion when a method's `needs` names them.
NEEDS = ("clip", "classifier")


class Settings:
  """What a method reads as `cfg`: its phase's settings as attributes (compiled into the step)."""

  def __init__(self, settings: tuple[tuple[str, Any], ...]):
    self.__dict__.update(settings)


def frozen_settings(settings: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
  """A method's settings as StepConfig holds them (hashable)."""
  return tuple(sorted(settings.items()))


@dataclasses.dataclass(frozen=True)
class Loaded:
  """What the trainer loaded, for a method's `backbone_parts` to build its parts from."""
  sd: Any  # models.pipeline.StableDiffusion
  text_encoder: Any  # SD's text encoder, frozen (models.frozen.Frozen)
  classifier: Any  # guides.Classifier where a method needs "classifier", else None
  targets: Any  # [Kp] int32 class k's class in the classifier (padded to the mesh), else None


@runtime_checkable
class Method(Protocol):
  needs: tuple[str, ...]  # of NEEDS
  cross_class: bool
  metric_titles: Mapping[str, str]  # its terms' names -> titles in loss.png

  def defaults(self) -> Any: ...  # ConfigDict: lr and the method's own knobs

  def loss(self, terms: dict, cfg: Settings) -> Any: ...


@runtime_checkable
class ShotMethod(Method, Protocol):
  def item_terms(self, item, ctx, cfg: Settings) -> dict: ...


@runtime_checkable
class CrossClass(ShotMethod, Protocol):
  def cross_terms(self, batch, k, everyone, cfg: Settings) -> dict: ...


@runtime_checkable
class DrawsItems(Method, Protocol):
  uses_shots: bool

  def class_terms(self, vectors, k, key, ctx, cfg: Settings) -> dict: ...


@runtime_checkable
class Stateful(Protocol):
  def class_state(self, vectors, cfg: Settings) -> dict: ...

  def next_state(self, state: dict, vectors, terms: dict, step, cfg: Settings) -> dict: ...

  def final_vectors(self, state: dict, vectors) -> Any: ...


@runtime_checkable
class Checks(Protocol):
  def check(self, cfg: Settings) -> list[str]: ...


@runtime_checkable
class BuildsParts(Protocol):
  def backbone_parts(self, loaded: Loaded) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class Capabilities:
  """What a method module is, read once from what it defines (hashable, like StepConfig)."""
  name: str
  needs: tuple[str, ...]
  cross_class: bool  # CrossClass: the step gathers every class's targets for cross_terms
  draws_items: bool  # DrawsItems: class_terms instead of item_terms
  uses_shots: bool  # False: no images of the classes are loaded
  stateful: bool  # Stateful
  checks: bool  # Checks
  builds_parts: bool  # BuildsParts
  metric_titles: tuple[tuple[str, str], ...]


def members(protocol: type) -> tuple[str, ...]:
  """The names a protocol itself declares (not its bases')."""
  own = vars(protocol)
  return tuple(name for name in (*own.get("__annotations__", {}), *own)
               if not name.startswith("_") and (name in own.get("__annotations__", {}) or callable(own[name])))


@functools.cache
def capabilities(method: ModuleType) -> Capabilities:
  """The capabilities of a method module; TypeError naming the module and what is missing or contradictory."""
  def refuse(problem: str):
    raise TypeError(f"method module {method.__name__}: {problem} (see mcti_jax/methods/protocol.py)")

  has = {name: hasattr(method, name)
         for p in (Method, ShotMethod, CrossClass, DrawsItems, Stateful, Checks, BuildsParts) for name in members(p)}
  if missing := [name for name in members(Method) if not has[name]]:
    refuse(f"every method defines {', '.join(members(Method))}; it lacks {', '.join(missing)}")
  draws, cross = has["class_terms"], method.cross_class
  if not isinstance(cross, bool):
    refuse(f"cross_class={cross!r} must be True or False")
  if draws == has["item_terms"]:
    refuse("it defines both item_terms and class_terms: a method takes the trainer's shots (item_terms) or draws "
           "its own items (class_terms), not both" if draws else "it defines neither item_terms (the trainer's "
           "noised shots) nor class_terms (items it draws itself)")
  if draws and cross:
    refuse("cross_class = True with class_terms: cross_terms compares the trainer's items of every class, which a "
           "method drawing its own items does not have; set cross_class = False or use item_terms")
  if cross != has["cross_terms"]:
    refuse("cross_class = True needs cross_terms(batch, k, everyone, cfg)" if cross else
           "it defines cross_terms but cross_class = False, so cross_terms would never run")
  if draws and not has["uses_shots"]:
    refuse("class_terms needs uses_shots = False (it loads no images of the classes) or True")
  uses_shots = method.uses_shots if has["uses_shots"] else True
  if not isinstance(uses_shots, bool):
    refuse(f"uses_shots={uses_shots!r} must be True or False")
  if not draws and not uses_shots:
    refuse("uses_shots = False, but item_terms learns from the trainer's shots; define class_terms instead")
  state = [name for name in members(Stateful) if has[name]]
  if state and len(state) < len(members(Stateful)):
    lacking = [name for name in members(Stateful) if not has[name]]
    refuse(f"it defines {', '.join(state)} but not {', '.join(lacking)}: per-class state needs all three")
  needs = method.needs
  if isinstance(needs, str) or not all(n in NEEDS for n in needs):
    refuse(f"needs={needs!r} must be a tuple of {', '.join(NEEDS)}")
  titles = method.metric_titles
  if not isinstance(titles, Mapping) or not all(isinstance(v, str) for v in titles.values()):
    refuse(f"metric_titles={titles!r} must map its terms' names to titles")
  if "lr" not in method.defaults():
    refuse("defaults() must give lr: each phase's AdamW learning rate")
  return Capabilities(name=method.__name__.rsplit(".", 1)[-1], needs=tuple(needs), cross_class=cross,
                      draws_items=draws, uses_shots=uses_shots, stateful=bool(state), checks=has["check"],
                      builds_parts=has["backbone_parts"], metric_titles=tuple(titles.items()))
