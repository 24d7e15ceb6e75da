"""Loading a config file given as `FILE[:preset]` (ml_collections' convention), for every command."""

from __future__ import annotations

import importlib.util
import os
import re
import sys

from mcti_jax import paths
from mcti_jax.errors import ConfigError


def load_config(spec: str):
  """`FILE[:preset]` -> (the config file as a module, its get_config(preset)); a bad file or preset is a ConfigError."""
  file, *preset = spec.split(":", 1)
  paths.input_file(file, "config file", "a relative path starts at the working directory; configs/ is in the "
                   "repository root")
  name = "mcti_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(file))[0])
  module_spec = importlib.util.spec_from_file_location(name, file)
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[name] = module  # dataclasses and pickle look a module up by name
  module_spec.loader.exec_module(module)
  try:
    return module, module.get_config(*preset)
  except ValueError as e:  # an unknown preset
    raise ConfigError(f"{spec}: {e}") from None
