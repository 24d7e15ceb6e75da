"""GCPL and CoMPLe on the tiny model: known digits 0-4 and unknown 5-9.

  mcti eval --config eval_gcpl             # GCPL, CoMPLe lambda 0, 1e-4, 1e-3, 1e-2; 9+ minutes on 2 CPU cores
  mcti eval --config eval_gcpl:negatives   # CoMPLe lambda 1e-2, batches of 4 (the paper's) vs all classes; 10 minutes
  mcti eval --config eval_gcpl:quick       # a smoke test of the first (4 steps)

docs/RESULTS.md: "GCPL and CoMPLe". One training run per shot seed: the first
phase, then each other setting as a branch from the same initial tokens with
the same samples (mcti_jax/training/phases.py), so the rows differ in the
named setting alone. All phases take the tiny preset's steps and lr (GCPL's
there: mcti_jax/configs/gcpl.py), not the paper's, which are SD's: CoMPLe at
lambda 0 is GCPL bit for bit at equal settings (tests/methods/test_methods.py).
CoMPLe's negatives are the paper's batches of 4 unless a row says "all
classes" (batch=0). Each is scored by the CLIP-token head and by the few-shot
Diffusion Classifier, both with GCPL's template. The TI and MC-TI rows beside
them in docs/RESULTS.md come from `make demo` (same shots).
"""

import ml_collections

from mcti_jax import methods
from mcti_jax.configs import eval as eval_config
from mcti_jax.configs import gcpl
from mcti_jax.methods import comple

LAMBDAS = {"comple0": 0.0, "comple1e4": 1e-4, "comple1e3": 1e-3, "comple1e2": 1e-2}
# eval_gcpl:negatives: one lambda (the sweep's largest: the smaller ones moved nothing measurable), two negatives.
NEGATIVES = {"comple1e2": dict(lam=1e-2, batch=4), "comple1e2_all": dict(lam=1e-2, batch=comple.ALL)}
PRESET_NAMES = ("full", "quick", "negatives")


def _label(settings, negatives: bool) -> str:
  """The row's name; with `negatives`, which negatives it took."""
  if settings.method == "gcpl":
    return "GCPL"
  which = "all classes" if settings.batch == comple.ALL else f"batches of {settings.batch}"
  return f"CoMPLe λ={settings.lam:g}" + (f", {which}" if negatives else "")


def get_config(arg: str = "full") -> ml_collections.ConfigDict:
  if arg not in PRESET_NAMES:
    raise ValueError(f"unknown variant {arg!r}; use one of {', '.join(PRESET_NAMES)}")
  c = eval_config.get_config("tiny")
  c.workdir = "runs/eval_gcpl" if arg == "full" else f"runs/eval_gcpl_{arg}"
  c.seeds = (1, 2, 3)  # the demo's; the tiny steps and lr and the DiC subset were chosen on seed 0
  c.train = gcpl.get_config("tiny")
  steps, lr = c.train.phase.gcpl.steps, c.train.phase.gcpl.lr
  if arg == "negatives":  # the first setting takes what a GCPL first phase would draw: the same samples as `full`
    c.train.phases = tuple(NEGATIVES)
    c.train.phase = ml_collections.ConfigDict()
    for name, settings in NEGATIVES.items():
      c.train.phase[name] = methods.phase("comple", steps=steps, lr=lr, init="initial", **settings)
  else:
    c.train.phases = ("gcpl", *LAMBDAS)
    for name, lam in LAMBDAS.items():  # GCPL's steps and lr: the rows differ in lambda alone
      c.train.phase[name] = methods.phase("comple", steps=steps, lr=lr, init="initial", lam=lam)
  template = c.train.data.template
  dic = dict(c.evals.dic_fewshot.to_dict(), template=template, max_images=40)
  c.evals = ml_collections.ConfigDict()
  labels = {name: _label(c.train.phase[name], arg == "negatives") for name in c.train.phases}
  for name in c.train.phases:
    c.evals[name] = dict(type="clip_tokens", label=f"{labels[name]}: CLIP-token head", phase=name, template=template,
                         ensemble=False, save_head=False)
  for name in c.train.phases:  # lambda 0 is GCPL bit for bit (tests/methods/test_methods.py): its CLIP row shows it
    if name != "comple0":
      c.evals[f"{name}_dic"] = dict(dic, label=f"{labels[name]}: DiC few-shot", tokens=name)
  if arg == "quick":
    c.seeds, c.smoke_test = (1,), True
    for name in c.train.phases:
      c.train.phase[name].steps = 4
  return c
