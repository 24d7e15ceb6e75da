"""Loading a config given as `NAME[:preset]` (one that ships in mcti_jax/configs/) or `FILE[:preset]` (a file)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path

from mcti_jax import paths
from mcti_jax.errors import ConfigError


SHIPPED = Path(__file__).resolve().parent / "configs"  # imported by name: configs sit above everything they configure


def shipped() -> list[str]:
  """The names of the configs in mcti_jax/configs/."""
  return sorted(f.stem for f in SHIPPED.glob("*.py") if not f.stem.startswith("_"))


def is_file_spec(file: str) -> bool:
  """Whether `file` (the part before ":") names a file rather than a shipped config: it has a folder or .py."""
  return file.endswith(".py") or "/" in file or os.sep in file


def load_config(spec: str):
  """`NAME[:preset]` or `FILE[:preset]` -> (the config as a module, its get_config(preset)).

  A name unknown to mcti_jax/configs/, a missing file or an unknown preset is a ConfigError.
  """
  file, *preset = spec.split(":", 1)
  if is_file_spec(file):
    module = _from_file(file)
  elif file in shipped():
    module = importlib.import_module(f"mcti_jax.configs.{file}")
  else:
    raise ConfigError(f"no config named {file!r}: mcti-jax ships {', '.join(shipped())} (e.g. --config mcti:tiny); "
                      "a file of your own is a path, e.g. --config ./my_config.py")
  try:
    return module, module.get_config(*preset)
  except ValueError as e:  # an unknown preset
    raise ConfigError(f"{spec}: {e}") from None


def _from_file(file: str):
  if not os.path.exists(file) and (name := os.path.splitext(os.path.basename(file))[0]) in shipped():
    raise ConfigError(f"no config file {file}; the configs ship in the package: give its name, "
                      f"--config {name}[:preset], or the path of a file of your own")
  paths.input_file(file, "config file", "a relative path starts at the working directory; the configs that ship "
                   f"with mcti-jax are named without a path: {', '.join(shipped())}")
  name = "mcti_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(file))[0])
  module_spec = importlib.util.spec_from_file_location(name, file)
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[name] = module  # dataclasses and pickle look a module up by name
  module_spec.loader.exec_module(module)
  return module
