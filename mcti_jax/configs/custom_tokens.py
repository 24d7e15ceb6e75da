"""Custom tokens (Perera et al.): TI + alignment with the class's CLIP image features, in the span of attribute words.

  mcti train --config custom_tokens:pets --config.data.data_dir=~/tensorflow_datasets
  mcti train --config custom_tokens:tiny              # the embedded tiny model; CPU, a minute or two
  mcti train --config custom_tokens:tiny,free         # the same without the subspace

The argument is "<preset>" or "<preset>,free" (no subspace: the token may go
anywhere in the token space). The presets are mcti_jax/configs/mcti.py's; each has its
`tokens.subspace_words` below: the super-class word and attribute words a
user would compose with the token, every one a single token of CLIP's
vocabulary (tests check them against the real BPE vocabulary).
"""

import ml_collections

from mcti_jax import methods
from mcti_jax.configs import mcti

SUBSPACE_WORDS = {
    "pets": ("pet", "cat", "dog", "black", "white", "brown", "grey", "orange", "cream", "golden", "spotted", "striped",
             "fluffy", "long", "short", "hair", "fur", "small", "large", "puppy", "kitten", "ears", "face"),
    "flowers": ("flower", "red", "yellow", "white", "pink", "purple", "orange", "blue", "violet", "petals", "large",
                "small", "round", "star", "spotted", "striped", "single", "double", "wild", "center"),
    "cars": ("car", "sedan", "coupe", "convertible", "suv", "hatchback", "pickup", "van", "wagon", "truck", "sports",
             "luxury", "black", "white", "red", "blue", "silver", "grey", "old", "new"),
    "food": ("food", "fried", "grilled", "baked", "raw", "sweet", "soup", "salad", "cake", "meat", "fish", "rice",
             "noodles", "sauce", "cheese", "chocolate", "bread", "dessert", "plate", "bowl"),
    "aircraft": ("aircraft", "plane", "jet", "propeller", "military", "cargo", "private", "small", "large", "white",
                 "engines", "wings", "tail"),
    "dtd": ("texture", "striped", "dotted", "woven", "rough", "smooth", "cracked", "knitted", "spiral", "grid",
            "pattern"),
    "eurosat": ("satellite", "green", "brown", "river", "road", "field", "forest", "city", "sea", "lake", "highway",
                "crops", "residential", "industrial", "pasture"),
    "caltech101": ("object", "animal", "vehicle", "plant", "tool", "furniture", "instrument", "small", "large",
                   "black", "white", "red", "metal"),
    "sun397": ("scene", "indoor", "outdoor", "room", "building", "nature", "city", "street", "water", "forest",
               "mountain", "dark", "bright"),
    "imagenet": ("object", "animal", "dog", "bird", "fish", "insect", "vehicle", "tool", "food", "plant", "furniture",
                 "instrument", "clothing", "small", "large"),
    "celeba": ("person", "man", "woman", "young", "old", "smiling", "blonde", "brunette", "hair", "glasses", "beard",
               "bald", "makeup", "hat"),
    "tissue": ("tissue", "pink", "purple", "dense", "fat", "muscle", "debris", "tumor"),
    "skin_lesion": ("skin", "dark", "brown", "red", "pink", "black", "round", "irregular", "large", "small", "flat",
                    "raised", "spotted"),
    "fractal": ("fractal", "spiral", "colorful", "dark", "bright", "swirl"),
    "corn_seed": ("seed", "yellow", "white", "broken", "whole", "pure", "healthy", "damaged"),
    "folder": ("object", "small", "large", "black", "white", "red", "green", "blue"),
    # The tiny CLIP's shape words (tiny/captions.py ATTRIBUTES: "heavy at the top" is heavy + top) and its
    # super-class word: 11 words span 11 of the 32 dimensions.
    "tiny": ("digit", "thin", "bold", "narrow", "wide", "heavy", "top", "bottom", "left", "right", "leaning"),
}
PRESET_NAMES = tuple(SUBSPACE_WORDS)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  preset, _, variant = arg.partition(",")
  if preset not in SUBSPACE_WORDS or variant not in ("", "free"):
    raise ValueError(f"unknown custom-tokens preset {arg!r}: give <preset> or <preset>,free with a preset of "
                     f"{', '.join(PRESET_NAMES)}")
  c = mcti.get_config(preset)
  c.workdir = f"runs/custom_{preset}{'_free' if variant else ''}"
  c.tokens.subspace_words = SUBSPACE_WORDS[preset]
  c.phases = ("custom_tokens",)
  c.phase = ml_collections.ConfigDict()
  c.phase.custom_tokens = methods.phase("custom_tokens", steps=1000, subspace=not variant)
  if preset == "tiny":
    _tiny(c)
  return c


def _tiny(c: ml_collections.ConfigDict) -> None:
  """The tiny text tower's 32-wide embeddings need larger steps than SD's (see mcti:tiny)."""
  c.phase.custom_tokens.steps = 600
  c.phase.custom_tokens.lr = 5e-3
  c.phase.custom_tokens.beta = 0.05
