"""CLIP zero-shot: the class names in a template, no shots. What the tokens should beat on unnamed classes.

The references the papers compare with use the dataset's own prompt (CoOp's and DiC's per-dataset templates, e.g.
"a photo of {}, a type of pet.") or CLIP's prompt ensemble; a bare "a photo of a {}" is weaker than either. So:

  template="dataset"       the preset's `data.template` (mcti_jax/configs/mcti.py; the default)
  template="a photo of a {}"   any one template
  ensemble="imagenet80"    CLIP's 80 ImageNet templates instead (`IMAGENET_TEMPLATES`); a class's text feature is
                           the mean of its normalised per-template features, normalised again (as CLIP's notebook
                           and CoOp's ZeroshotCLIP2 do)
  ensemble=("...{}", ...)  any list of templates, averaged the same way

Class names are written with "_" as spaces, as CoOp's zero-shot CLIP does ("american_bulldog" -> "american bulldog").
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mcti_jax.classify import clip_head

# CLIP's 80 prompts for ImageNet zero-shot: openai/CLIP, notebooks/Prompt_Engineering_for_ImageNet.ipynb (the list
# CoOp copies into trainers/imagenet_templates.py as IMAGENET_TEMPLATES), in that order.
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)
ENSEMBLES = {"imagenet80": IMAGENET_TEMPLATES}
PROMPTS_PER_CALL = 1024  # class x template prompts encoded in one call (the last chunk of classes is padded)


@dataclasses.dataclass(frozen=True)
class Evaluator:
  template: str = "dataset"  # "dataset": the preset's data.template; else one template with "{}"
  ensemble: str | tuple = ""  # "": the one template; "imagenet80": CLIP's 80; or a tuple of templates

  def templates(self, cell) -> tuple[str, ...]:
    if self.ensemble:
      if isinstance(self.ensemble, str):
        if self.ensemble not in ENSEMBLES:
          raise ValueError(f"clip_zeroshot: ensemble={self.ensemble!r}; use '', {', '.join(ENSEMBLES)} or a list")
        return ENSEMBLES[self.ensemble]
      return tuple(self.ensemble)
    return (cell.train_config.data.template if self.template == "dataset" else self.template,)

  def run(self, cell, name: str):
    del name
    templates = self.templates(cell)
    names = [n.replace("_", " ") for n in cell.result.class_names]
    text = name_text_features(cell.models.clip, cell.models.sd.tokenizer, names, templates)
    scores, labels, _ = cell.scored(clip_head.cosine_scores(cell.test_features, text))
    return scores, labels, {"templates": templates[0] if len(templates) == 1 else f"{len(templates)} templates"}


def name_text_features(clip, tokenizer, class_names, templates) -> np.ndarray:
  """`clip_head.name_text_features` a chunk of classes at a time ([K, P]), so K x T prompts stay bounded."""
  chunk = max(1, PROMPTS_PER_CALL // len(templates))
  if len(class_names) <= chunk:
    return np.asarray(clip_head.name_text_features(clip, tokenizer, class_names, templates))
  out = []
  for start in range(0, len(class_names), chunk):
    part = list(class_names[start:start + chunk])
    held = len(part)
    part += part[:1] * (chunk - held)  # one shape for every chunk: one compile
    out.append(np.asarray(clip_head.name_text_features(clip, tokenizer, part, templates))[:held])
  return np.concatenate(out)
