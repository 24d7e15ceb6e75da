"""Evaluation: N-shot settings x methods x seeds, as in MC-TI Table 1 and Fig. 4-5.

  mcti eval --config configs/eval.py:pets --config.train.data.data_dir=~/tensorflow_datasets
  mcti eval --config configs/eval.py:tiny      # the embedded tiny model; CPU, minutes

`train` is the training config of configs/mcti.py with the same preset; each
(N, seed) trains into <workdir>/<N>shot/seed<seed> (resumable) and is scored.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mcti  # noqa: E402  (configs/mcti.py, the training config)

PRESET_NAMES = mcti.PRESET_NAMES


def get_config(arg: str = "pets") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.train = mcti.get_config(arg)
  c.workdir = f"runs/eval_{arg}"
  c.n_shots = (1, 2, 4, 8, 16)
  c.seeds = (1, 2, 3)
  c.methods = ("ti", "mcti", "mcti_coop", "clip_feat", "clip_zeroshot", "dic_zeroshot", "dic_fewshot")
  c.template = "T1"  # T1 "a photo of a S", T2 "a photo of the nice S", T3 "a cropped photo of the S", or a '{}' string
  c.ensemble = False  # average the text features of T1, T2 and T3
  c.zeroshot_template = "a photo of a {}"
  c.class_groups = ml_collections.ConfigDict()  # name -> class indices, reported separately (e.g. known/unknown)
  c.coop = ml_collections.ConfigDict(dict(num_context=16, steps=200, lr=2e-3, logit_scale=100.0, seed=0))
  # The Diffusion Classifier (methods dic_zeroshot / dic_fewshot): stages of the DiC paper's preset, on a subset.
  c.dic = ml_collections.ConfigDict(dict(preset=arg if arg in ("pets", "flowers", "food", "aircraft", "imagenet")
                                         else "pets", error="", max_images=200, tokens="mcti",
                                         template="a photo of a {}"))
  if arg == "tiny":
    c.n_shots = (5,)
    c.zeroshot_template = "a photo of the digit {}"
    c.class_groups.known = (0, 1, 2, 3, 4)
    c.class_groups.unknown = (5, 6, 7, 8, 9)
    c.dic.preset, c.dic.max_images = "tiny", 100
  return c
