"""The configs that ship with mcti-jax: one file per job, each with named presets (big_vision's configs as code).

A bare name picks one of these, a path a file of your own:

  mcti train --config mcti:pets                # mcti_jax/configs/mcti.py, preset "pets"
  mcti train --config ./my_config.py:tiny      # your file; it may start from ours:
                                               #   from mcti_jax.configs import mcti
                                               #   def get_config(arg="tiny"):
                                               #     c = mcti.get_config(arg); c.phase.ti.steps = 50; return c

`mcti <command> --help` lists a config's presets and fields. A config file
defines get_config(preset) -> ml_collections.ConfigDict, and PRESET_NAMES.

May import: errors, paths, and any package below demos (a config names what it runs).
"""
