"""GCPL and CoMPLe: one class token inside the dataset's template (GCPL Table 1), noise MSE (+ CoMPLe's term).

  mcti train --config gcpl:cars --config.data.split_file=/data/stanford_cars/split_zhou_StanfordCars.json
  mcti train --config gcpl:cars,comple --config.data.split_file=...   # CoMPLe, lambda 1e-3
  mcti train --config gcpl:tissue --config.data.data_dir=~/tensorflow_datasets
  mcti train --config gcpl:tiny,comple --config.phase.comple.lam=1e-2

The argument is "<preset>" (mcti_jax/configs/mcti.py's presets) or "<preset>,comple".
The default preset, cars (Stanford Cars, of GCPL's Table 1), reads CoOp's
split file and the images, which have no working official download any more;
docs/DATA.md says where to get them. GCPL's tissue preset is a tfds dataset
that tfds still downloads and builds.

The token starts from the super-class word (`tokens.init_word`) and sits in
`data.template`; both come with the preset. Evaluate the exported tokens
with `mcti eval --config eval:<preset>` rows of type clip_tokens
and dic (see mcti_jax/configs/eval_gcpl.py for the tiny comparison).
"""

import ml_collections

from mcti_jax import methods
from mcti_jax.configs import mcti

PRESET_NAMES = tuple(f"{p}{v}" for p in mcti.PRESET_NAMES if p != "folder" for v in ("", ",comple"))
STEPS = 1000  # GCPL/CoMPLe train one token per class at lr 1e-3; tiny: see below


def get_config(arg: str = "cars") -> ml_collections.ConfigDict:
  preset, _, variant = arg.partition(",")
  if variant not in ("", "comple"):
    raise ValueError(f"unknown variant {variant!r} in {arg!r}; use '<preset>' or '<preset>,comple'")
  c = mcti.get_config(preset)
  method = variant or "gcpl"
  c.workdir = f"runs/{preset}_{method}"
  c.phases = (method,)
  c.phase = ml_collections.ConfigDict()
  c.phase[method] = methods.phase(method, steps=STEPS)
  if preset == "tiny":
    # The tiny text tower's 32-wide embeddings need larger steps than SD's (see mcti_jax/configs/mcti.py's tiny preset).
    # On shot seed 0 (not reported), GCPL's CLIP-token head: 400 steps at the paper's 1e-3 53.9%, 200 at 2e-3
    # 52.5%; about the same, in half the time.
    c.phase[method].steps, c.phase[method].lr = 200, 2e-3
  return c
