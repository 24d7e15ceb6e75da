"""GCPL and CoMPLe: one class token inside the dataset's template (GCPL Table 1), noise MSE (+ CoMPLe's term).

  mcti train --config gcpl:cars --config.data.split_file=/data/stanford_cars/split_zhou_StanfordCars.json
  mcti train --config gcpl:cars,comple --config.data.split_file=...   # CoMPLe: lambda 1e-3, batches of 4
  mcti train --config gcpl:cars,comple_all --config.data.split_file=...   # CoMPLe, every other class a negative
  mcti train --config gcpl:tissue --config.data.data_dir=~/tensorflow_datasets
  mcti train --config gcpl:tiny,comple --config.phase.comple.lam=1e-2

The argument is "<preset>" (mcti_jax/configs/mcti.py's presets), "<preset>,comple" or "<preset>,comple_all".
The default preset, cars (Stanford Cars, of GCPL's Table 1), reads CoOp's
split file and the images, which have no working official download any more;
docs/DATA.md says where to get them. GCPL's tissue preset is a tfds dataset
that tfds still downloads and builds.

The paper's settings (GCPL paper section 4.2; the tables in mcti_jax/methods/gcpl.py and comple.py):

  GCPL     lr 5e-4, 2000 epochs, 4 items per AdamW step (grad_accum=4: the authors' code; the paper gives no batch)
  CoMPLe   lr 1e-3, 4000 epochs, lambda 1e-3, negatives from batches of 4 items of 4 classes, one item per class
           and step
  ,comple_all  CoMPLe with every other class's items as negatives (batch=0): this project's earlier default

An epoch (each shot of a class seen once) is n_shots / (items per class per step) steps, so the steps follow the
preset's n_shots: at 16 shots GCPL runs 8000 steps and CoMPLe 64000. They are computed here: after
--config.data.n_shots=N, set --config.phase.<gcpl|comple>.steps to epochs * N / items yourself
(`paper_steps`).

The token starts from the super-class word (`tokens.init_word`) and sits in
`data.template`; both come with the preset. Evaluate the exported tokens
with `mcti eval --config eval:<preset>` rows of type clip_tokens
and dic (see mcti_jax/configs/eval_gcpl.py for the tiny comparison).
"""

import ml_collections

from mcti_jax import methods
from mcti_jax.configs import mcti
from mcti_jax.methods import comple, gcpl

VARIANTS = ("", "comple", "comple_all")
PRESET_NAMES = tuple(f"{p}{',' + v if v else ''}" for p in mcti.PRESET_NAMES if p != "folder" for v in VARIANTS)
MODULES = {"gcpl": gcpl, "comple": comple}  # each holds its paper's EPOCHS and ITEMS_PER_UPDATE
# The tiny model's own schedule (presets tiny and synthetic; not the paper's): the tiny text tower's 32-wide
# embeddings need larger steps than SD's (see mcti_jax/configs/mcti.py's tiny preset). On shot seed 0 (not
# reported), GCPL's CLIP-token head: 400 steps at 1e-3 53.9%, 200 at 2e-3 52.5%; about the same, in half the time.
# One item per class and step.
TINY_STEPS, TINY_LR = 200, 2e-3


def paper_steps(method: str, n_shots: int, batch_per_class: int = 1) -> int:
  """The paper's epochs of `method` as steps of this trainer: epochs * n_shots / (items per class per step)."""
  module = MODULES[method]
  return max(1, round(module.EPOCHS * n_shots / (batch_per_class * module.ITEMS_PER_UPDATE)))


def get_config(arg: str = "cars") -> ml_collections.ConfigDict:
  preset, _, variant = arg.partition(",")
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} in {arg!r}; use '<preset>', '<preset>,comple' or "
                     "'<preset>,comple_all'")
  c = mcti.get_config(preset)
  method = "comple" if variant.startswith("comple") else "gcpl"
  c.workdir = f"runs/{preset}_{variant or method}"
  c.phases = (method,)
  c.phase = ml_collections.ConfigDict()
  c.phase[method] = methods.phase(method, steps=paper_steps(method, c.data.n_shots, c.batch_per_class))
  c.grad_accum = MODULES[method].ITEMS_PER_UPDATE
  if variant == "comple_all":
    c.phase[method].batch = comple.ALL
  if preset in ("tiny", "synthetic"):  # the tiny model's
    c.phase[method].steps, c.phase[method].lr, c.grad_accum = TINY_STEPS, TINY_LR, 1
  return c
