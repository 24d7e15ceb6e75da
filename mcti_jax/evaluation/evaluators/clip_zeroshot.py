"""CLIP zero-shot: the class names in a template, no shots. What the tokens should beat on unnamed classes."""

from __future__ import annotations

import dataclasses

from mcti_jax.classify import clip_head


@dataclasses.dataclass(frozen=True)
class Evaluator:
  template: str = "a photo of a {}"

  def run(self, cell, name: str):
    del name
    text = clip_head.name_text_features(cell.models.clip, cell.models.sd.tokenizer, list(cell.result.class_names),
                                        (self.template,))
    return cell.scored(clip_head.cosine_scores(cell.test_features, text))
