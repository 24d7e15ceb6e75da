"""The training schedule: `config.phases` in order, each with its settings in `config.phase.<name>`.

  c.phases = ("ti", "mcti")
  c.phase.ti = methods.phase("ti", steps=3000)
  c.phase.mcti = methods.phase("mcti", steps=100, beta=1.0)

Steps are counted over the whole run: a phase covers [start, end). Each phase
starts a fresh AdamW state at its own lr, from the tokens the previous phase
ended with (init="previous"), or as a branch (init="initial"): from the
initial tokens, drawing the samples the run's first phase drew. Branches
compare settings side by side in one run (one model load, one data cache),
differing in nothing but their settings. Phases with 0 steps are skipped
(not trained, not exported).
"""

from __future__ import annotations

import dataclasses
import math
from types import ModuleType

import ml_collections

from mcti_jax import methods
from mcti_jax.errors import ConfigError
from mcti_jax.methods.protocol import Settings, frozen_settings


@dataclasses.dataclass(frozen=True)
class Phase:
  name: str
  index: int  # its position in config.phases (its row in the checkpoint's per-phase tokens)
  method: ModuleType
  settings: ml_collections.ConfigDict
  start: int
  end: int

  @property
  def caps(self) -> methods.Capabilities:
    """What its method is and needs (read once, when the method was looked up)."""
    return methods.capabilities(self.method)

  @property
  def method_settings(self) -> dict:
    """The settings the method reads (not the trainer's: methods.TRAINER_FIELDS)."""
    return methods.own_settings(self.settings)


def plan(config) -> list[Phase]:
  """The phases that train (steps > 0), in order, with their step ranges. Raises ConfigError on bad settings."""
  problems = list(_problems(config))
  if problems:
    raise ConfigError("bad phase settings: " + "; ".join(problems) + ". Fix them with "
                      "--config.phase.<name>.<field>=<value> (see mcti_jax/configs/mcti.py).")
  out, step = [], 0
  for index, name in enumerate(config.phases):
    settings = config.phase[name]
    if settings.steps:
      out.append(Phase(name, index, methods.get(settings.method), settings, step, step + settings.steps))
      step += settings.steps
  if not out:
    raise ConfigError(f"every phase of config.phases={tuple(config.phases)} has 0 steps: there is nothing to train")
  return out


def _problems(config):
  names = config.phases
  if isinstance(names, str) or not names:
    yield f"config.phases={names!r} must be a non-empty tuple of phase names"
    return
  for name in names:
    if name not in config.phase:
      yield f"config.phases names {name!r}, but config.phase has no settings for it (it has {sorted(config.phase)})"
      continue
    s = config.phase[name]
    where = f"config.phase.{name}"
    if "method" not in s or s.method not in methods.TRAINABLE:
      yield f"{where}.method={s.get('method')!r} must be one of {', '.join(methods.TRAINABLE)}"
      continue
    expected = set(methods.phase(s.method).keys())
    if set(s.keys()) != expected:
      extra, missing = sorted(set(s.keys()) - expected), sorted(expected - set(s.keys()))
      yield (f"{where} does not fit method {s.method!r}" + (f": unknown {extra}" if extra else "")
             + (f": missing {missing}" if missing else "") + " (make it with methods.phase)")
      continue
    if isinstance(s.steps, bool) or not isinstance(s.steps, int) or s.steps < 0:
      yield f"{where}.steps={s.steps!r} must be an integer >= 0"
    if s.init not in methods.INITS:
      yield f"{where}.init={s.init!r} must be one of {', '.join(methods.INITS)}"
    if not isinstance(s.subspace, bool):
      yield f"{where}.subspace={s.subspace!r} must be True or False"
    elif s.subspace and not config.tokens.get("subspace_words"):
      yield (f"{where}.subspace=True, but config.tokens.subspace_words is empty: give the single-token words whose "
             "span holds the tokens (see mcti_jax/configs/custom_tokens.py)")
    own = methods.own_settings(s)
    for field, value in (("lr", s.lr), ("weight_decay", s.weight_decay), *own.items()):  # the numbers
      positive = field == "lr"
      if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
          or (positive and value == 0)):
        yield f"{where}.{field}={value!r} must be a finite number " + ("> 0" if positive else ">= 0")
    method = methods.get(s.method)
    if methods.capabilities(method).checks:  # the method's own rules
      yield from (f"{where}.{problem}" for problem in method.check(Settings(frozen_settings(own))))
