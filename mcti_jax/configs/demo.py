"""The demo: MC-TI vs TI on digits the tiny models know by name (0-4) and never met (5-9).

  make demo                                        # = mcti demo --config demo
  mcti demo --config demo:quick         # a few steps, for tests

CPU, 2 cores: about 9 minutes (docs/RESULTS.md). Writes runs/demo/.
"""

import ml_collections

from mcti_jax.configs import eval as eval_config

PRESET_NAMES = ("full", "quick")


def get_config(arg: str = "full") -> ml_collections.ConfigDict:
  c = eval_config.get_config("tiny")
  c.workdir = "runs/demo"
  c.seeds = (1, 2, 3)  # shot seeds: each takes other shots of the held-out digits
  eval_config.only(c, "ti", "mcti", "clip_feat", "clip_zeroshot", "dic_fewshot")
  c.generation = ml_collections.ConfigDict(dict(num_images=8, guidance=2.0, steps=50, seed=0))
  if arg == "quick":
    c.workdir = "runs/demo_quick"
    c.evals.dic_fewshot.update(preset="tiny", strategy="stages")  # 52 UNet calls per image, not ~330
    c.smoke_test = True
    c.seeds = (1,)
    c.train.phase.ti.steps, c.train.phase.mcti.steps = 4, 4
    c.generation.num_images, c.generation.steps = 2, 3
  elif arg != "full":
    raise ValueError(f"unknown demo variant {arg!r}; use one of {', '.join(PRESET_NAMES)}")
  return c
