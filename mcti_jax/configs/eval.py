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
  c.n_shots = (1, 2, 4, 5, 8, 16)  # MC-TI's Table 1 grid (Sec. 4.1: N = 1, 2, 4, 5, 8, 16)
  c.seeds = (1, 2, 3)
  c.class_groups = ml_collections.ConfigDict()  # name -> class indices, reported separately (e.g. known/unknown)
  small = arg in ("tiny", "synthetic")  # the embedded tiny model
  names = "a photo of the digit {}" if arg == "tiny" else "a photo of a {}"  # zero-shot prompts of the class names
  # The Diffusion Classifier: the DiC paper's stages for the dataset (pets' for others), on the whole test split.
  # The tiny world: paired elimination with pets' budget (250 samples), which matches pets' stages at ~330 instead
  # of 1,375 UNet calls per image (docs/SCALING.md), on an evenly spread 100 of its 846 test images per seed.
  dic = dict(type="dic", preset=arg if arg in DIC_PRESETS else "pets", error="", strategy="auto", max_images=0)
  if small:
    dic.update(strategy="eliminate", max_images=100)
  # One row per evaluator; rows run and are shown in this order. T1 = "a photo of a S" (see classify/clip_head.py).
  c.evals = ml_collections.ConfigDict()
  c.evals.ti = dict(type="clip_tokens", label="TI", phase="ti", template="T1", ensemble=False)
  c.evals.mcti = dict(type="clip_tokens", label="MC-TI", phase="mcti", template="T1", ensemble=False, save_head=True)
  # CoOp's protocol (evaluators/coop.py): SGD 0.002, cosine with a 1-epoch warm-up, batch 32, random resized crop +
  # flip (the preset's data.flip: not on digits), 200 epochs (CoOp's ImageNet: 50). protocol="cached" is the old
  # fast path: 200 full-batch AdamW steps on cached, un-augmented features (set steps=... there).
  c.evals.mcti_coop = dict(type="coop", label="MC-TI + CoOp", phase="mcti", protocol="coop", num_context=16,
                           epochs=50 if arg == "imagenet" else 200, batch_size=32, lr=2e-3, flip=c.train.data.flip,
                           logit_scale=100.0, seed=0, steps=None)
  c.evals.clip_feat = dict(type="clip_features", label="CLIP-feat")
  # The class names in the preset's own prompt (data.template, CoOp's per-dataset one), and in CLIP's 80-prompt
  # ImageNet ensemble: the references MC-TI's Table 1 quotes use one or the other (evaluators/clip_zeroshot.py).
  c.evals.clip_zeroshot = dict(type="clip_zeroshot", label="CLIP zero-shot (names)", template="dataset")
  c.evals.clip_zeroshot_ensemble = dict(type="clip_zeroshot", label="CLIP zero-shot (names, 80 prompts)",
                                        ensemble="imagenet80")
  c.evals.dic_zeroshot = dict(dic, label="DiC zero-shot (names)", tokens="", template=names)
  c.evals.dic_fewshot = dict(dic, label="DiC few-shot (tokens)", tokens="mcti", template="a photo of a {}")
  # The same tokens with far fewer UNet calls: their CLIP-token head keeps 3 classes per image, and sequential paired
  # elimination decides among them (benchmarks/dic_efficiency.py: ~8x fewer calls than pets' stages on the tiny model).
  c.evals.dic_fast = dict(dic, label="DiC few-shot, head top-3 + elimination", tokens="mcti",
                          template="a photo of a {}", shortlist=3, strategy="eliminate")
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
