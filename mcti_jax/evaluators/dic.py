"""The Diffusion Classifier: the class whose prompt lets the UNet predict the noise best (adaptive stages).

Few-shot with a phase's tokens in `template`, or zero-shot with the class
names (`tokens=""`). On an evenly spread subset of the test images, since it
costs many UNet calls per image; finished images are cached per cell.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from mcti_jax import runs
from mcti_jax.classify import dic
from mcti_jax.models.frozen import freeze


@dataclasses.dataclass(frozen=True)
class Evaluator:
  tokens: str = "mcti"  # the phase whose tokens go into the prompt; "" = zero-shot with the class names
  template: str = "a photo of a {}"
  preset: str = "pets"  # the DiC paper's stage settings (classify.dic.PRESETS), or "tiny"
  error: str = ""  # override the preset's error metric
  max_images: int = 200

  def run(self, cell, name: str):
    m, r, tc = cell.models, cell.result, cell.train_config
    cfg = dic.preset(self.preset, error=self.error) if self.error else dic.preset(self.preset)
    text_encoder = freeze(m.sd.text_encoder)
    if self.tokens:
      learned, tokenizer = cell.learned_tokens(self.tokens)
      contexts = dic.class_contexts(text_encoder, tokenizer, learned=learned, template=self.template)
    else:
      contexts = dic.class_contexts(text_encoder, m.sd.tokenizer, class_names=list(r.class_names),
                                    template=self.template)
    # Evenly spread positions: the same subset for every row and seed whose test split is the same.
    count = min(self.max_images, len(cell.test))
    subset = cell.test.subset(np.linspace(0, len(cell.test) - 1, count).round().astype(int))
    key = dic.settings_key(cfg, m.sd.schedule, contexts, extra={"sd": runs.fingerprint(tc.model.sd_path),
                                                                "resolution": tc.data.resolution})
    cache = dic.ResultCache(Path(r.workdir) / f"{name}.dic.jsonl", key)
    result = dic.evaluate(freeze(m.sd.unet), m.sd.schedule, contexts, subset.batches(tc.data.resolution, 8), cfg,
                          encode=dic.latent_encoder(freeze(m.sd.vae), m.mesh), mesh=m.mesh, cache=cache,
                          image_ids=subset.ids, total=len(subset))
    scores = np.full((len(subset), r.num_classes), -np.inf)
    for i, res in enumerate(result.results):  # higher is better: minus the position in DiC's ranking
      scores[i, res.ranking] = -np.arange(len(res.ranking))
    info = {k: result.summary()[k] for k in ("images_per_s", "unet_evals_per_s", "unet_evals", "num_computed")}
    return scores, subset.labels, info
