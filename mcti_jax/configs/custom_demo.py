"""Custom tokens on the tiny model: composite retrieval, GAIR, what the subspace costs, multi-token initialisation.

  mcti demo --config custom_demo          # composition; docs/RESULTS.md gives its time on 2 CPU cores
  mcti demo --config custom_demo:init     # multi-token initialisation (its paper's Fig. 3), minutes
  mcti demo --config custom_demo:quick    # both, a few steps each, for tests

Per shot seed (5 shots of all ten digits), one training run whose phases are
four methods side by side: TI, MC-TI (after TI), and custom tokens free and
in the span of the tiny CLIP's shape words, each a branch from the same
start. Each is scored on plain classification (the CLIP-token head, known
0-4 / unknown 5-9) and on composite queries "a photo of a S_k <shape words>";
GAIR refines the custom tokens' queries. Then the multi-token initialisation
paper's Fig. 3: TI's noise MSE from four initialisations (the `init` variant). Writes
runs/custom_demo/ (runs/custom_demo_init/).
"""

import ml_collections

from mcti_jax import methods
from mcti_jax.configs import custom_tokens
from mcti_jax.configs import eval as eval_config

PRESET_NAMES = ("composition", "init", "quick")


def get_config(arg: str = "composition") -> ml_collections.ConfigDict:
  if arg not in PRESET_NAMES:
    raise ValueError(f"unknown demo variant {arg!r}; use one of {', '.join(PRESET_NAMES)}")
  c = eval_config.get_config("tiny")
  c.kind = "custom"
  c.parts = ("init",) if arg == "init" else ("composition", "init") if arg == "quick" else ("composition",)
  c.workdir = "runs/custom_demo_init" if arg == "init" else "runs/custom_demo"
  c.seeds = (1, 2, 3)  # shot seeds; settings were tuned on seed 0
  t = c.train
  t.tokens.subspace_words = custom_tokens.SUBSPACE_WORDS["tiny"]
  t.phases = ("ti", "mcti", "custom_free", "custom")
  steps, lr = 400, 5e-3
  t.phase = ml_collections.ConfigDict()
  t.phase.ti = methods.phase("ti", steps=steps, lr=lr)
  t.phase.mcti = methods.phase("mcti", steps=150, lr=lr, beta=0.0075)  # after TI, as in mcti:tiny
  t.phase.custom_free = methods.phase("custom_tokens", steps=steps, lr=lr, beta=0.05, init="initial")
  t.phase.custom = methods.phase("custom_tokens", steps=steps, lr=lr, beta=0.05, init="initial", subspace=True)
  c.evals = ml_collections.ConfigDict()
  labels = {"ti": "TI", "mcti": "MC-TI", "custom_free": "custom tokens, free", "custom": "custom tokens, subspace"}
  for name, label in labels.items():
    c.evals[name] = dict(type="clip_tokens", label=label, phase=name, template="T1", ensemble=False)
  for name, label in labels.items():  # the composite queries' own text features
    c.evals["ret_" + name] = dict(type="retrieval", label=label + ": composite retrieval", phase=name,
                                  query="composite")
  # GAIR on the custom tokens, against their best fixed query (retrieval/gair.py's defaults). docs/RESULTS.md's table
  # has every method's: --config.gair.phases='("ti", "mcti", "custom_free", "custom")' (about a minute each).
  c.gair = ml_collections.ConfigDict(dict(phases=("custom",), lams=(0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0),
                                          settings=ml_collections.ConfigDict()))
  # Fig. 3 (mcti_jax/demos/init_convergence.py): TI from four starts, 1 shot per class.
  c.init = ml_collections.ConfigDict(dict(seeds=(1,), steps=300))
  if arg == "quick":
    c.workdir = "runs/custom_demo_quick"
    c.smoke_test = True
    c.seeds = (1,)
    for name in t.phases:
      t.phase[name].steps = 4
    c.gair.settings.update(rounds=1, num_images=1, steps=2)
    c.init.steps = 4
  return c
