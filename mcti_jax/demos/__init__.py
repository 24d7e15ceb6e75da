"""The experiments on the embedded tiny model that `mcti demo` runs, chosen by the config's `kind`.

  demo       MC-TI against TI, CLIP and the Diffusion Classifier on digits 0-4 (known) and 5-9 (never seen)
  dct_demo   Discriminative Class Tokens from the tiny digit and slant guides
  custom_demo  custom tokens, composite retrieval with GAIR, multi-token initialisation

A new demo is one module here with `run(config, log)`, one entry in KINDS and
a config file that sets `kind`.

May import: everything below cli.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from mcti_jax.errors import ConfigError

KINDS = {"mcti": "demo", "dct": "dct_demo", "custom": "custom_demo"}  # config.kind -> module (mcti_jax/configs/*demo.py)


def run(config, log: Callable[[str], None] = print) -> Any:
  """The demo the config names (`kind`; a config without one is the MC-TI demo)."""
  kind = config.get("kind", "mcti")
  if kind not in KINDS:
    raise ConfigError(f"config.kind={kind!r} names no demo; demos: {', '.join(KINDS)}")
  return importlib.import_module(f"mcti_jax.demos.{KINDS[kind]}").run(config, log=log)
