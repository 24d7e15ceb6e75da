"""The CLIP-token head (MC-TI eq. 6): a test image goes to the class whose tokens' text feature is nearest.

The tokens of one training phase are spliced into CLIP's text tower under a
template (or averaged over T1-T3); scores are cosines with the test images'
CLIP features. `save_head` also writes the head as a linear classifier.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mcti_jax.runtime import distributed
from mcti_jax.classify import clip_head


@dataclasses.dataclass(frozen=True)
class Evaluator:
  phase: str = "mcti"  # whose tokens: a phase of the training run
  template: str = "T1"  # T1 "a photo of a S", T2 "a photo of the nice S", T3 "a cropped photo of the S", or '{}'
  ensemble: bool = False  # average the text features of T1, T2 and T3
  save_head: bool = False  # write heads/<name>/<N>shot_seed<s>/ (a linear classifier over CLIP image features)

  def templates(self) -> tuple[str, ...]:
    return tuple(clip_head.TEMPLATES.values()) if self.ensemble else (clip_head.TEMPLATES.get(self.template,
                                                                                               self.template),)

  def run(self, cell, name: str):
    text = cell.token_text_features(self.phase, self.templates())
    if self.save_head and distributed.is_main():
      clip_head.save_linear_head(cell.out_dir / "heads" / name / cell.name, text, cell.result.class_names,
                                 {"template": self.template, "ensemble": self.ensemble, "phase": self.phase})
    return cell.scored(np.asarray(clip_head.cosine_scores(cell.test_features, text)))
