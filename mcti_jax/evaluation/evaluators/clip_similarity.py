"""CLIP image similarity (MC-TI's Table 2): how close are the images a class token draws to the class's shots?

For every class k, G images from "a photo of a <cls-k>" (`template`) with a phase's tokens; the row's
`clip_similarity` is the mean over classes of the mean CLIP image-image cosine over all G x N pairs of class k's
generations and its N shots (generation/clip_similarity.py's metric, on the cell's CLIP and the shots' features the
trainer computed), and `clip_similarity_per_class` [K] the per-class means. Image g of every class starts from
fold_in(key(seed), g) (generated.py).

  c.evals.sim_mcti = dict(type="clip_similarity", tokens="mcti", num_images=8)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mcti_jax.errors import ConfigError
from mcti_jax.evaluation.evaluators import generated
from mcti_jax.generation import clip_similarity as similarity_lib


@dataclasses.dataclass(frozen=True)
class Evaluator(generated.Settings):

  def run(self, cell, name: str) -> dict[str, Any]:
    learned, tokenizer = self.learned_tokens(cell, name)
    if cell.result.shot_features is None and cell.result.shots is None:
      raise ConfigError(f"config.evals.{name} (clip_similarity) compares generations with the class's shots, but "
                        "this run trained without shots (e.g. DCT); use generation_accuracy for its tokens")
    shots = np.asarray(cell.shot_features)  # [K, N, P]
    guidance, per_class = self.guidance_of(cell.train_config), []
    for k, class_name in enumerate(learned.class_names):  # one class's images at a time
      images = generated.draw(cell.models.sd, tokenizer, learned, generated.prompt(self.template, k, class_name),
                              self, guidance, cell.models.mesh)
      features = similarity_lib.unit_image_features(cell.models.clip, images, self.batch_size)
      per_class.append(float(similarity_lib.mean_pair_cosines(features[None], shots[k:k + 1])[0]))
    return {"clip_similarity": float(np.mean(per_class)), "clip_similarity_per_class": per_class,
            "prompt": generated.prompt(self.template, 0, learned.class_names[0]), **self.drawn(guidance)}
