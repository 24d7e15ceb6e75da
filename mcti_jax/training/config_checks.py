"""The training config's values, checked before anything loads.

With real Stable Diffusion, loading takes minutes and the first step's compile
more; a negative step count or a zero interval must not cost that, nor leave
half a run behind. Each bad value is one ConfigError naming the field.
"""

from __future__ import annotations

import math

from mcti_jax.training import class_chunks, phases
from mcti_jax.errors import ConfigError
from mcti_jax.training.runs import config_value as _get

CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.pooling": ("eos", "argmax"),
    "tokens.init": ("word", "random", "texts", "label", "caption"),
    "data.source": ("folder", "split_file", "tfds", "digits", "synthetic"),
}
AT_LEAST_1 = ("checkpoint_every", "log_every", "batch_per_class", "grad_accum", "data.n_shots", "data.resolution",
              "tokens.num_vectors", "mesh.data")
AT_LEAST_1_OR_UNSET = ("num_devices", "data.num_classes")
INTEGERS = ("seed", "data.shot_seed")
BOOLS = ("data.flip", "model.remat")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _problems(config):
  for name in INTEGERS:
    if not _is_int(_get(config, name)):
      yield name, "an integer"
  for name in AT_LEAST_1 + AT_LEAST_1_OR_UNSET:
    v = _get(config, name)
    if not (v is None and name in AT_LEAST_1_OR_UNSET) and (not _is_int(v) or v < 1):
      yield name, "an integer >= 1" + (" (or unset)" if name in AT_LEAST_1_OR_UNSET else "")
  for name in BOOLS:
    if not isinstance(_get(config, name), bool):
      yield name, "true or false"
  guidance = _get(config, "model.guidance")
  if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                               or not math.isfinite(guidance) or guidance < 0):
    yield "model.guidance", "a finite number >= 0"
  for name, choices in CHOICES.items():
    if _get(config, name) not in choices:
      yield name, "one of " + ", ".join(choices)
  if (want := class_chunks.problem(_get(config, "class_chunk"))) is not None:
    yield "class_chunk", want
  data, batch = _get(config, "mesh.data"), _get(config, "batch_per_class")
  if _is_int(data) and _is_int(batch) and data > 1 and batch % data:
    yield "mesh.data", f"a divisor of batch_per_class={batch}: each of its devices draws an equal slice of a class's batch"


def check_train_config(config) -> None:
  """Raise one ConfigError listing every field of a training config (mcti_jax/configs/mcti.py) with a bad value."""
  bad = [f"config.{name}={_get(config, name)!r} must be {want}" for name, want in _problems(config)]
  if bad:
    raise ConfigError("bad config values: " + "; ".join(bad) + ". Fix them with --config.<field>=<value>.")
  phases.plan(config)  # the phases' own settings
