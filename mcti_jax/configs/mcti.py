"""MC-TI: TI warm-up then the discriminative regulariser, all classes in one run.

  mcti train --config mcti:pets --config.data.data_dir=~/tensorflow_datasets
  mcti train --config mcti:folder --config.data.root=/data/birds --config.tokens.init_word=bird
  mcti train --config mcti:tiny     # the embedded tiny model (see `mcti pretrain-tiny`); CPU, minutes
  mcti train --config mcti:synthetic --config.data.num_classes=1024   # scale on CPU (no accuracy claim)

The argument after ':' picks a dataset preset; docs/DATA.md says how to get
each preset's data (a tfds build, CoOp's split files, or a folder per class).
Real presets expect Stable Diffusion 1.5 (`model.sd_path`) and CLIP ViT-L/14
(`model.clip_path`): local folders, or hub ids where the network allows. On
one GPU, 3000+100 steps for K=37 pets train in one run.
"""

import os

import ml_collections

import mcti_jax
from mcti_jax import methods

# The embedded tiny checkpoint (`mcti pretrain-tiny` writes it), found wherever the package is installed.
TINY_ASSETS = os.path.join(os.path.dirname(mcti_jax.__file__), "assets", "tiny")

# Dataset presets: tensorflow-datasets name (or another data.source: a CoOp split file, an image folder), split
# names, initializer word, and the dataset's prompt template (`data.template`, GCPL's per-dataset prompt). The
# initializer words follow the MC-TI paper's per-dataset choice of a coarse word. The templates and initializer
# words of cars, tissue, skin_lesion, fractal and corn_seed are GCPL's Table 1; the other templates follow CoOp's.
PRESETS = {
    "pets": dict(name="oxford_iiit_pet", train_split="train", test_split="test", init_word="pet",
                 template="a photo of {}, a type of pet."),
    "flowers": dict(name="oxford_flowers102", train_split="train", test_split="test", init_word="flower",
                    template="a photo of {}, a type of flower."),
    # tfds' cars196 and sun397 download from links that are dead, and tfds has no FGVC-Aircraft: these read CoOp's
    # split files (--config.data.split_file=...) and the images (docs/DATA.md).
    "cars": dict(source="split_file", init_word="car", template="A photo of {}, a type of car."),
    "food": dict(name="food101", train_split="train", test_split="validation", init_word="food",
                 template="a photo of {}, a type of food."),
    "aircraft": dict(source="split_file", init_word="aircraft", template="a photo of {}, a type of aircraft."),
    "dtd": dict(name="dtd", train_split="train", test_split="test", init_word="texture", template="{} texture."),
    "eurosat": dict(name="eurosat/rgb", train_split="train[:80%]", test_split="train[80%:]", init_word="satellite",
                    template="a centered satellite photo of {}."),
    "caltech101": dict(name="caltech101", train_split="train", test_split="test", init_word="object",
                       template="a photo of a {}."),
    "sun397": dict(source="split_file", init_word="scene", template="a photo of a {}."),
    "imagenet": dict(name="imagenet2012", train_split="train", test_split="validation", init_word="object",
                     template="a photo of a {}."),
    # The rest of MC-TI's Table 1: CIFAR10 and STL10 (tfds builds; the first of CLIP's prompts for each, openai/CLIP
    # data/prompts.md) and UCF101 as CoOp reads it, the videos' middle frames (a split file: tfds' `ucf101` holds the
    # videos; CoOp's UCF101 prompt, trainers/zsclip.py). MC-TI names no initializer words: these are ours.
    "cifar10": dict(name="cifar10", train_split="train", test_split="test", init_word="object",
                    template="a photo of a {}."),
    "stl10": dict(name="stl10", train_split="train", test_split="test", init_word="object",
                  template="a photo of a {}."),
    "ucf101": dict(source="split_file", init_word="action", template="a photo of a person doing {}."),
    # tfds' celeb_a has attributes but no class label: one folder per identity (--config.data.root=...).
    "celeba": dict(source="folder", init_word="person", template="a photo of {}, a person."),
    "tissue": dict(name="colorectal_histology", train_split="train[:80%]", test_split="train[80%:]",
                   init_word="tissue", template="{} tissue."),
    # GCPL's other datasets have no tfds build: one folder per class (--config.data.root=...).
    "skin_lesion": dict(source="folder", init_word="skin", template="{} skin lesion."),
    "fractal": dict(source="folder", init_word="fractal", template="{} fractal."),
    "corn_seed": dict(source="folder", init_word="seed", template="A photo of {} corn seed."),
}
PRESET_NAMES = (*PRESETS, "folder", "tiny", "synthetic")  # what may follow ':'; `mcti train --help` lists them


def get_config(arg: str = "pets") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = arg
  c.workdir = f"runs/{arg}"
  c.seed = 0  # training randomness; class k uses fold_in(fold_in(key, step), k)

  c.model = ml_collections.ConfigDict()
  c.model.sd_path = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # diffusers folder or hub id
  c.model.clip_path = "openai/clip-vit-large-patch14"  # transformers CLIP folder: MC-TI's g_k and f_j
  # Weights variant of sd_path, e.g. "fp16" (half the download, read into float32); None: full precision.
  c.model.variant = ml_collections.config_dict.placeholder(str)
  c.model.dtype = "float32"  # compute dtype: float32 or bfloat16
  c.model.pooling = "eos"  # "argmax" reproduces the official MC-TI code's pooling (see models/clip.py)
  c.model.remat = False  # gradient checkpointing in the UNet (full-size models on small memory)
  # Classifier-free guidance that drawing with the tokens defaults to (`mcti generate`; the export's manifest
  # records it). Training does not use it. 7.5: Stable Diffusion's usual.
  c.model.guidance = 7.5

  c.data = ml_collections.ConfigDict()
  c.data.source = "tfds"  # tfds | folder | digits | split_file | synthetic
  c.data.name = ""
  c.data.data_dir = ml_collections.config_dict.placeholder(str)
  c.data.train_split = "train"
  c.data.test_split = "test"
  # folder source: one subfolder per class; split_file: the folder its paths are relative to (default: the file's)
  c.data.root = ml_collections.config_dict.placeholder(str)
  c.data.split_file = ml_collections.config_dict.placeholder(str)  # CoOp-style split JSON
  c.data.preset = arg  # data errors name it and its section of docs/DATA.md
  c.data.n_shots = 16
  c.data.shot_seed = 0
  c.data.resolution = 512  # SD 1.5 trains at 512
  c.data.flip = True  # also encode mirrored shots and pick one at random
  c.data.num_classes = ml_collections.config_dict.placeholder(int)  # the first K classes only
  c.data.class_names = ml_collections.config_dict.placeholder(tuple)  # names for reports and zero-shot prompts
  c.data.template = "a photo of a {}"  # the dataset's prompt, for phases with templates="dataset" (GCPL)
  c.data.cache_dir = "runs/cache"

  c.tokens = ml_collections.ConfigDict()
  c.tokens.num_vectors = 1
  # word | random | texts | label | caption (training/token_init.py). label and caption start class k from the V_k
  # tokens of its own label or caption (V_k varies per class; tokens.num_vectors is then unused).
  c.tokens.init = "word"
  c.tokens.init_word = "object"
  c.tokens.init_texts = ml_collections.config_dict.placeholder(tuple)  # per-class text when init="texts"
  c.tokens.vectors_per_class = ml_collections.config_dict.placeholder(tuple)  # per-class V_k (word/random/texts)
  c.tokens.label_words = ()  # init="label": the words CLIP zero-shot picks each class's label from
  c.tokens.label_template = "a photo of a {}"  # ... in this prompt
  # init="label" from a classifier instead, as the multi-token initialisation paper does (an off-the-shelf
  # classifier names the image): a guides spec like config.classifier (mcti_jax/guides/), e.g. type="file",
  # path="mcti_jax/assets/tiny/guide_digits". Class k's label: its class name of highest mean probability over
  # k's shots (among tokens.label_words when set). Unset type: CLIP zero-shot over tokens.label_words.
  c.tokens.label_classifier = ml_collections.ConfigDict({
      "type": ml_collections.config_dict.placeholder(str), "path": ml_collections.config_dict.placeholder(str),
      "clip_path": ml_collections.config_dict.placeholder(str), "export": ml_collections.config_dict.placeholder(str),
      "class_names": ml_collections.config_dict.placeholder(tuple),
      "template": ml_collections.config_dict.placeholder(str)})
  # init="caption": one caption per class (K lines) or per shot (K*N lines, class-major; class k uses its first's)
  c.tokens.caption_file = ml_collections.config_dict.placeholder(str)
  # Single-token words whose span holds the tokens of phases with subspace=True (custom tokens; tokens/subspace.py).
  c.tokens.subspace_words = ()
  c.templates = "ti"  # "ti" = the TI template list, or one template like "a photo of a {}"

  # The phases, in order (mcti_jax/training/phases.py); each phase's settings: the trainer's, then its method's
  # (mcti_jax/methods/<method>.py). Override one with --config.phase.mcti.beta=0.5.
  c.phases = ("ti", "mcti")
  c.phase = ml_collections.ConfigDict()
  c.phase.ti = methods.phase("ti", steps=3000, lr=5e-4)  # the TI warm-up
  c.phase.mcti = methods.phase("mcti", steps=100, lr=5e-4, alpha=1.0, beta=1.0, scale=10.0)
  c.batch_per_class = 1
  c.grad_accum = 1
  # Classes per pass of the step on each device (mcti_jax/training/class_chunks.py): 0 runs all of a device's classes at
  # once; c > 0 runs them in passes of c inside the one compiled step, so memory stays flat in K (hundreds to
  # thousands of classes); "auto" picks the largest c that fits the accelerator's memory. Results don't depend on it.
  c.class_chunk = ml_collections.FieldReference(0, field_type=object)

  # The frozen classifier of methods that learn from one (DCT; mcti_jax/guides/): type file (a folder of
  # classifier.json + classifier.safetensors), clip_zeroshot (clip_path, class_names, template) or clip_tokens
  # (clip_path, export, template). targets: class k's class index in the classifier (default: all its classes).
  c.classifier = ml_collections.ConfigDict(dict(
      type="", path=ml_collections.config_dict.placeholder(str), clip_path=ml_collections.config_dict.placeholder(str),
      export=ml_collections.config_dict.placeholder(str), class_names=ml_collections.config_dict.placeholder(tuple),
      template="a photo of a {}", targets=ml_collections.config_dict.placeholder(tuple)))

  c.num_devices = ml_collections.config_dict.placeholder(int)  # default: all
  # mesh.data > 1: a (classes, data) mesh whose `data` devices per class shard split each class's per-class batch
  # (batch_per_class must be a multiple). For fewer classes than devices, or large per-class batches (mcti_jax/
  # mcti_jax/runtime/parallel.py); the tokens equal the 1-D mesh's up to float summation order.
  c.mesh = ml_collections.ConfigDict(dict(data=1))
  c.checkpoint_every = 500
  c.log_every = 10

  if arg in PRESETS:
    p = PRESETS[arg]
    c.data.source = p.get("source", "tfds")
    c.data.name = p.get("name", "")
    c.data.train_split, c.data.test_split = p.get("train_split", "train"), p.get("test_split", "test")
    c.tokens.init_word, c.data.template = p["init_word"], p["template"]
  elif arg == "folder":
    c.data.source = "folder"
  elif arg == "tiny":
    _tiny(c)
  elif arg == "synthetic":
    _synthetic(c)
  else:
    raise ValueError(f"unknown preset {arg!r}; choose one of {', '.join(PRESET_NAMES)}")
  return c


def _tiny(c: ml_collections.ConfigDict) -> None:
  """The embedded tiny model on the sklearn digits: the demo and the tests. Minutes on 2 CPU cores."""
  c.model.sd_path = os.path.join(TINY_ASSETS, "sd")
  c.model.clip_path = os.path.join(TINY_ASSETS, "clip")
  c.model.guidance = 2.0  # the tiny model's 16 px digits saturate at SD's 7.5 (the demo draws at 2)
  c.data.source = "digits"
  c.data.n_shots = 5
  c.data.resolution = 16
  c.data.flip = False  # digits are not mirror-symmetric
  c.data.class_names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
  c.data.cache_dir = "runs/cache"
  c.tokens.init_word = "digit"
  c.tokens.label_words = c.data.class_names
  c.data.template = "a photo of the digit {}"  # a phrasing of the tiny models' captions
  c.phase.ti.steps, c.phase.mcti.steps = 2000, 600
  # Measured on the demo's shots and seeds (1, 2, 3); lr and mcti_steps on the previous checkpoint (4x4 CLIP
  # patches), beta on the current one (2x2):
  # - lr: the tiny text tower's 32-wide embeddings sit ~0.1 apart per dimension (SD's 768-wide ones ~0.015),
  #   so tokens need a larger step than SD's 5e-4 (TI then finds the names of only 52-73% of digits 0-4).
  #   But the noise MSE's gradient is noisy and Adam turns noise into a random walk of ~lr * sqrt(steps):
  #   at 5e-3 x 600 steps TI's tokens ended 0.5-0.8 from their names (as far as the names are apart) and
  #   tokens of 5-9 took the test images of 0-4 (TI 76% on 0-4). 2e-3 x 2000 travels farther, walks less: 96%.
  # - mcti_steps: at this lr, 400 leave MC-TI 3 points under CLIP-feat on 5-9; 600 bring it within 1.
  # - beta: the regulariser's CE (~1) dwarfs the noise MSE (~0.05). It trades the known digits for the
  #   unknown ones: moving the tokens of 5-9 onto their shots, it also hands them test 3s that this CLIP sees
  #   as 5s. MC-TI % on 0-4 / 5-9: beta 0.005 94.6 / 39.3, 0.0075 92.5 / 43.8, 0.01 89.5 / 46.1,
  #   0.015 86.5 / 52.0, 0.03 84.1 / 53.2 (CLIP-feat 93.0 / 46.3).
  # On fresh shot seeds 4, 5, 6 this preset gives TI 97 / 7, MC-TI 91 +- 3 / 46 +- 8, CLIP-feat 95 / 45.
  c.phase.ti.lr = c.phase.mcti.lr = 2e-3
  c.phase.mcti.beta = 0.0075  # this preset's choice (the sweep above); the paper's beta = 1 (Sec. 4.1) is the default
  c.checkpoint_every = 100


def _synthetic(c: ml_collections.ConfigDict) -> None:
  """The tiny model on K procedurally distinct classes (mcti_jax/data/synthetic.py): memory, throughput and DiC calls
  against K, on CPU, in minutes. It makes no accuracy claim: the tiny models never saw such images."""
  _tiny(c)
  c.data.source = "synthetic"
  c.data.num_classes = 64  # K; e.g. --config.data.num_classes=1024
  c.data.class_names = None  # "class0000", ... from the source
  c.tokens.label_words = ()
  c.phase.ti.steps, c.phase.mcti.steps = 20, 10
  c.checkpoint_every = 10
