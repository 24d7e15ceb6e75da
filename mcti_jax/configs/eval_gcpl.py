"""GCPL and CoMPLe (lambda 0, 1e-4, 1e-3, 1e-2) on the tiny model: known digits 0-4 and unknown 5-9.

  mcti eval --config eval_gcpl   # 9 minutes on 2 CPU cores, compile cache empty; docs/RESULTS.md: "GCPL and CoMPLe"

One training run per shot seed: GCPL first, then each CoMPLe setting as a
branch from the same initial tokens with the same samples (mcti_jax/training/phases.py), so
the rows differ in lambda alone. Each is scored by the CLIP-token head and
by the few-shot Diffusion Classifier, both with GCPL's template. The TI and
MC-TI rows beside them in docs/RESULTS.md come from `make demo` (same shots).
"""

import ml_collections

from mcti_jax import methods
from mcti_jax.configs import eval as eval_config
from mcti_jax.configs import gcpl

LAMBDAS = {"comple0": 0.0, "comple1e4": 1e-4, "comple1e3": 1e-3, "comple1e2": 1e-2}
PRESET_NAMES = ("full", "quick")


def get_config(arg: str = "full") -> ml_collections.ConfigDict:
  c = eval_config.get_config("tiny")
  c.workdir = "runs/eval_gcpl"
  c.seeds = (1, 2, 3)  # the demo's; steps and DiC subset were chosen on seed 0
  c.train = gcpl.get_config("tiny")
  gcpl_phase = c.train.phase.gcpl
  c.train.phases = ("gcpl", *LAMBDAS)
  for name, lam in LAMBDAS.items():  # GCPL's steps and lr: the rows differ in lambda alone
    c.train.phase[name] = methods.phase("comple", steps=gcpl_phase.steps, lr=gcpl_phase.lr, init="initial", lam=lam)
  template = c.train.data.template
  dic = dict(c.evals.dic_fewshot.to_dict(), template=template, max_images=40)
  c.evals = ml_collections.ConfigDict()
  for name in c.train.phases:
    label = "GCPL" if name == "gcpl" else f"CoMPLe λ={LAMBDAS[name]:g}"
    c.evals[name] = dict(type="clip_tokens", label=f"{label}: CLIP-token head", phase=name, template=template,
                         ensemble=False, save_head=False)
  for name in c.train.phases:  # lambda 0 is GCPL bit for bit (tests/methods/test_methods.py): its CLIP row shows it
    if name != "comple0":
      label = "GCPL" if name == "gcpl" else f"CoMPLe λ={LAMBDAS[name]:g}"
      c.evals[f"{name}_dic"] = dict(dic, label=f"{label}: DiC few-shot", tokens=name)
  if arg == "quick":
    c.workdir, c.seeds = "runs/eval_gcpl_quick", (1,)
    c.smoke_test = True
    for name in c.train.phases:
      c.train.phase[name].steps = 4
  elif arg != "full":
    raise ValueError(f"unknown variant {arg!r}; use one of {', '.join(PRESET_NAMES)}")
  return c
