"""Evaluation: N-shot settings x evaluators x seeds, as in MC-TI Table 1 and Fig. 4-5.

  mcti eval --config eval:pets --config.train.data.data_dir=~/tensorflow_datasets
  mcti eval --config eval:tiny      # the embedded tiny model; CPU, minutes
  mcti eval --config eval:synthetic --config.train.data.num_classes=1024   # scale, no accuracy claim

`train` is the training config of mcti_jax/configs/mcti.py with the same preset; each
(N, seed) trains into <workdir>/<N>shot/seed<seed> (resumable) and is scored
by every evaluator in `evals` (mcti_jax/evaluation/evaluators/<type>.py), one row each.
"""

import ml_collections

from mcti_jax.configs import mcti

PRESET_NAMES = mcti.PRESET_NAMES
DIC_PRESETS = ("pets", "flowers", "food", "aircraft", "imagenet")  # the DiC paper's; others use pets'


def get_config(arg: str = "pets") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.train = mcti.get_config(arg)
  c.workdir = f"runs/eval_{arg}"
  c.smoke_test = False  # True in the :quick presets: their reports say that their numbers mean nothing
  c.n_shots = (1, 2, 4, 8, 16)
  c.seeds = (1, 2, 3)
  c.class_groups = ml_collections.ConfigDict()  # name -> class indices, reported separately (e.g. known/unknown)
  small = arg in ("tiny", "synthetic")  # the embedded tiny model
  names = "a photo of the digit {}" if arg == "tiny" else "a photo of a {}"  # zero-shot prompts of the class names
  dic = dict(type="dic", preset="tiny" if small else arg if arg in DIC_PRESETS else "pets", error="",
             max_images=100 if small else 200)
  # One row per evaluator; rows run and are shown in this order. T1 = "a photo of a S" (see classify/clip_head.py).
  c.evals = ml_collections.ConfigDict()
  c.evals.ti = dict(type="clip_tokens", label="TI", phase="ti", template="T1", ensemble=False)
  c.evals.mcti = dict(type="clip_tokens", label="MC-TI", phase="mcti", template="T1", ensemble=False, save_head=True)
  c.evals.mcti_coop = dict(type="coop", label="MC-TI + CoOp", phase="mcti", num_context=16, steps=200, lr=2e-3,
                           logit_scale=100.0, seed=0)
  c.evals.clip_feat = dict(type="clip_features", label="CLIP-feat")
  c.evals.clip_zeroshot = dict(type="clip_zeroshot", label="CLIP zero-shot (names)", template=names)
  c.evals.dic_zeroshot = dict(dic, label="DiC zero-shot (names)", tokens="", template=names)
  c.evals.dic_fewshot = dict(dic, label="DiC few-shot (tokens)", tokens="mcti", template="a photo of a {}")
  # The same tokens with far fewer UNet calls: their CLIP-token head keeps 3 classes per image, and sequential paired
  # elimination decides among them (benchmarks/dic_efficiency.py: ~8x fewer calls than pets' stages on the tiny model).
  c.evals.dic_fast = dict(dic, label="DiC few-shot, head top-3 + elimination", tokens="mcti",
                          template="a photo of a {}", shortlist=3, strategy="eliminate",
                          **(dict(round_samples=2, min_samples=4) if small else {}))
  if small:
    c.n_shots = (5,)
  if arg == "tiny":
    c.class_groups.known = (0, 1, 2, 3, 4)
    c.class_groups.unknown = (5, 6, 7, 8, 9)
  return c


def only(c: ml_collections.ConfigDict, *names: str) -> None:
  """Keep just these evaluators, in this order."""
  kept = {name: c.evals[name].to_dict() for name in names}
  c.evals = ml_collections.ConfigDict()
  for name, entry in kept.items():
    c.evals[name] = entry
