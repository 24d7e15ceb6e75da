"""CLIP-feat: a test image goes to the class whose mean shot feature (prototype) is nearest. No tokens."""

from __future__ import annotations

import dataclasses

from mcti_jax.classify import clip_head


@dataclasses.dataclass(frozen=True)
class Evaluator:

  def run(self, cell, name: str):
    del name
    return cell.scored(clip_head.cosine_scores(cell.test_features, clip_head.prototype_features(cell.shot_features)))
