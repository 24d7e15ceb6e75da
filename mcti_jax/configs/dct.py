"""Discriminative Class Tokens: a token per class learned from a frozen classifier, no images of the class.

  mcti train --config dct:tiny                       # the ten digits, judged by the tiny digit guide
  mcti train --config dct:tiny,no_names              # the same, "a photo of a <cls-k>" without the digit's name
  mcti train --config dct:tiny_slant                 # "a photo of the digit three <cls-0>", leaning left
  mcti train --config dct:sd --config.classifier.clip_path=openai/clip-vit-large-patch14 \\
      --config.classifier.class_names='("tabby cat", "goldfish")'

The argument is "<preset>" or "<preset>,no_names". By default the prompts
hold "<cls-k> <name>", the classifier's name of class k (the paper's Sec. 3:
"A photo of a S_c label"); with no_names they hold "<cls-k>" alone, so the
token must carry the class by itself. "<preset>,names" is the default's old
spelling, still accepted. tiny_slant learns an attribute: its prompt names no
class (as the paper's face attributes, "An image of a S_c person's face").
The classifier is `config.classifier` (see mcti_jax/configs/mcti.py and
mcti_jax/guides/); `classifier.targets` picks its classes, one token each.
dct:sd takes the authors' settings (mcti_jax/methods/dct.py's table); the tiny
presets scale them to the tiny model (below).
"""

import os

import ml_collections

from mcti_jax import methods
from mcti_jax.configs import mcti

PRESET_NAMES = ("sd", "tiny", "tiny_slant", "sd,no_names", "tiny,no_names")
# The tiny presets' one prompt: the paper's "A photo of a S_c label" (Sec. 3); "high-resolution realistic image"
# are words the tiny CLIP never saw.
TINY_TEMPLATE = "a photo of a {} {name}"


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  preset, _, variant = arg.partition(",")
  variant = "" if variant == "names" else variant  # the old spelling of the default
  if preset not in ("sd", "tiny", "tiny_slant") or variant not in ("", "no_names") or (
      preset == "tiny_slant" and variant):
    raise ValueError(f"unknown DCT preset {arg!r}; choose one of {', '.join(PRESET_NAMES)}")
  c = mcti.get_config("tiny" if preset.startswith("tiny") else "pets")
  c.workdir = f"runs/dct_{preset}{'_no_names' if variant else ''}"
  c.phases = ("dct",)
  c.data.class_names = None  # no data: each token is named for its classifier class (classifier.targets)
  c.phase = ml_collections.ConfigDict()
  # An upper bound: classes stop early (see methods/dct.py). The authors' num_train_epochs = 50, one update each.
  c.phase.dct = methods.phase("dct", steps=50)
  c.tokens.init_word = "a"  # the authors' initialisation
  c.log_every = 1
  c.checkpoint_every = 10
  if preset == "sd":
    c.classifier.type = "clip_zeroshot"
    c.classifier.clip_path = "openai/clip-vit-large-patch14"
  elif preset == "tiny":
    _tiny_digits(c)
  else:
    _tiny_slant(c)
  if variant == "no_names":
    c.phase.dct.templates = tuple(t.replace(" {name}", "") for t in c.phase.dct.templates)
  return c


def _tiny(c: ml_collections.ConfigDict) -> None:
  """What both tiny presets share: the tiny generator's scale."""
  # The tiny UNet was trained with guidance in mind at 2 (the demo's); the authors' 7 saturates its 16 px images.
  # 6 DDIM steps: the gradient only sees the last one, and more cost time on 2 cores (30: ~4x).
  c.phase.dct.sampling_steps = 6
  c.phase.dct.guidance = 2.0
  # The tiny text tower's 32-wide embeddings need larger steps than SD's (see mcti_jax/configs/mcti.py's tiny preset).
  # Tuned on seed 0 only, without names (the demo reports seeds 1-3); % of digits 0-4 judged right by logistic /
  # k-NN on pixels:
  # lr 1e-2, 30 steps, 10 DDIM steps: 57 / 62; lr 2e-2, 40 steps, 10 DDIM: 52 / 52; lr 1e-2, 50 steps, 8 DDIM:
  # 72 / 72; lr 1e-2, 30 steps, 6 DDIM: 72 / 75 (stop_accuracy 0.9 instead of 0.7: the same).
  c.phase.dct.lr = 1e-2
  c.phase.dct.epoch_size = 10  # 2 updates of 5 generations
  c.phase.dct.steps = 30  # 15 epochs; patience stays the authors' 15 updates


def _tiny_digits(c: ml_collections.ConfigDict) -> None:
  """Known digits 0-4 and unknown 5-9: "a photo of a <cls-k> three" (no_names: "a photo of a <cls-k>"), <cls-k>
  from "digit". The tiny CLIP knows the names of 0-4 only: with them, "a photo of a digit three" already draws a
  three, and the token starts from a prompt that works."""
  _tiny(c)
  c.phase.dct.templates = (TINY_TEMPLATE,)
  c.tokens.init_word = "digit"
  c.classifier.type = "file"
  c.classifier.path = os.path.join(mcti.TINY_ASSETS, "guide_digits")


def _tiny_slant(c: ml_collections.ConfigDict) -> None:
  """An attribute token: "a photo of the digit three <cls-0>", guided to lean left by the slant guide."""
  _tiny(c)
  c.phase.dct.templates = ("a photo of the digit three {}",)
  c.classifier.type = "file"
  c.classifier.path = os.path.join(mcti.TINY_ASSETS, "guide_slant")
  c.classifier.targets = (2,)  # "leaning left"
