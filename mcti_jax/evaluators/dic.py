"""The Diffusion Classifier: the class whose prompt lets the UNet predict the noise best (adaptive stages).

Few-shot with a phase's tokens in `template`, or zero-shot with the class
names (`tokens=""`). On an evenly spread subset of the test images, since it
costs many UNet calls per image; finished images are cached per cell.

Fewer UNet calls (classify/dic/elimination.py, config.py): `strategy=
"eliminate"` replaces the preset's stage schedule by sequential paired
elimination (its budget: the preset's last sample count), and `shortlist=m`
lets the CLIP-token head of the same tokens (eq. 6, nearly free) keep each
image's top m classes for DiC to decide among.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from mcti_jax import runs
from mcti_jax.classify import clip_head, dic
from mcti_jax.models.frozen import freeze


@dataclasses.dataclass(frozen=True)
class Evaluator:
  tokens: str = "mcti"  # the phase whose tokens go into the prompt; "" = zero-shot with the class names
  template: str = "a photo of a {}"
  preset: str = "pets"  # the DiC paper's stage settings (classify.dic.PRESETS), or "tiny"
  error: str = ""  # override the preset's error metric
  max_images: int = 200
  strategy: str = "stages"  # or "eliminate"
  confidence: float = 0.99  # "eliminate": of each drop
  round_samples: int = 5  # "eliminate": new samples per round
  min_samples: int = 10  # "eliminate": samples before the first test
  shortlist: int = 0  # 0: every class; m: the token head's top m of each image

  def run(self, cell, name: str):
    m, r, tc = cell.models, cell.result, cell.train_config
    overrides = dict(strategy=self.strategy, confidence=self.confidence, round_samples=self.round_samples,
                     min_samples=self.min_samples, shortlist=self.shortlist)
    cfg = dic.preset(self.preset, **overrides, **({"error": self.error} if self.error else {}))
    if self.shortlist and not self.tokens:
      raise ValueError(f"evaluator {name}: shortlist={self.shortlist} ranks the classes with the token head of "
                       "`tokens`; set tokens to a trained phase (or shortlist=0 for zero-shot)")
    text_encoder = freeze(m.sd.text_encoder)
    if self.tokens:
      learned, tokenizer = cell.learned_tokens(self.tokens)
      contexts = dic.class_contexts(text_encoder, tokenizer, learned=learned, template=self.template)
    else:
      contexts = dic.class_contexts(text_encoder, m.sd.tokenizer, class_names=list(r.class_names),
                                    template=self.template)
    # Evenly spread positions: the same subset for every row and seed whose test split is the same.
    count = min(self.max_images, len(cell.test))
    positions = np.linspace(0, len(cell.test) - 1, count).round().astype(int)
    subset = cell.test.subset(positions)
    extra = {"sd": runs.fingerprint(tc.model.sd_path), "resolution": tc.data.resolution}
    prior = None
    if self.shortlist:
      prior = head_ranking(cell, self.tokens, positions)
      extra.update(clip=runs.fingerprint(tc.model.clip_path), shortlist_prior=prior.tolist())
    key = dic.settings_key(cfg, m.sd.schedule, contexts, extra=extra)
    cache = dic.ResultCache(Path(r.workdir) / f"{name}.dic.jsonl", key)
    result = dic.evaluate(freeze(m.sd.unet), m.sd.schedule, contexts, subset.batches(tc.data.resolution, 8), cfg,
                          encode=dic.latent_encoder(freeze(m.sd.vae), m.mesh), mesh=m.mesh, cache=cache,
                          image_ids=subset.ids, total=len(subset), prior=prior)
    scores = np.full((len(subset), r.num_classes), -np.inf)
    for i, res in enumerate(result.results):  # higher is better: minus the position in DiC's ranking
      scores[i, res.ranking] = -np.arange(len(res.ranking))
    info = {k: result.summary()[k] for k in ("images_per_s", "unet_evals_per_s", "unet_evals", "num_computed")}
    return scores, subset.labels, info


def head_ranking(cell, phase: str, positions: np.ndarray) -> np.ndarray:
  """Every class of the test images at `positions`, best first by the CLIP-token head of a phase (T1): [M, K]."""
  text = cell.token_text_features(phase, (clip_head.TEMPLATES["T1"],))
  scores = np.asarray(clip_head.cosine_scores(cell.test_features[positions], text))
  return np.argsort(-scores, axis=1, kind="stable")
