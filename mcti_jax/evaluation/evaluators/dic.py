"""The Diffusion Classifier: the class whose prompt lets the UNet predict the noise best (adaptive stages).

Few-shot with a phase's tokens in `template`, or zero-shot with the class
names (`tokens=""`). On the whole test split, as the papers score it, unless
`max_images` asks for an evenly spread subset (its row and the report say
which); finished images are cached per cell. Each row records what it ran:
the schedule (`schedule`), UNet calls per image (mean, max, bound) and the
images scored of the split (`num_images` of `test_images`).

Fewer UNet calls (classify/dic/elimination.py, config.py): `strategy=
"eliminate"` replaces the preset's stage schedule by sequential paired
elimination (its budget: the preset's last sample count), and `shortlist=m`
lets a nearly free CLIP head keep each image's top m classes for DiC to
decide among: the token head of the same tokens (eq. 6), or CLIP zero-shot
over the class names in `template` when `tokens=""`.

Large class sets: the stages score every class first (pets: 25 calls per
class; imagenet's 124,500 calls per image at K = 1000), so by default
(`strategy="auto"`, `shortlist="auto"`) K >= `large_k` classes switch to the
head's top LARGE_K_SHORTLIST + elimination: at most LARGE_K_SHORTLIST x the
budget UNet calls per image (pets: 5 x 250 = 1,250), whatever K. Below
`large_k` the preset's stages run over every class, as in the DiC paper.
Explicit settings are kept as given (`shortlist=0` at large K: elimination
over all K classes, K x budget calls at worst, not bounded).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from mcti_jax.training import runs
from mcti_jax.classify import clip_head, dic
from mcti_jax.models.frozen import freeze

# 50: just above pets' 37, the most classes the DiC paper ran its cheap two-stage schedule on; below it the pets
# stages cost at most 25 x 49 + 5 x 225 = 2,350 calls per image (pets itself: 2,050), above it 25 more per class.
LARGE_K = 50
# Head top 5: a large-K row then costs at most 5 x 250 = 1,250 calls per image, under what the DiC paper pays on pets
# (2,050); m trades the head's recall (rising with m) against cost (linear in m). On the digits (K = 10) head top 2, 3,
# 5 + pets stages scored 69.7, 69.0, 67.3% against the stages' 67.7% (benchmarks/RESULTS.md, tuning seed); the
# synthetic world's briefly trained head is too weak to tune m on (K = 100: top-1 4%, top-5 24%, top-10 38%).
LARGE_K_SHORTLIST = 5


@dataclasses.dataclass(frozen=True)
class Evaluator:
  tokens: str = "mcti"  # the phase whose tokens go into the prompt; "" = zero-shot with the class names
  template: str = "a photo of a {}"
  preset: str = "pets"  # the DiC paper's stage settings (classify.dic.PRESETS), or "tiny"
  error: str = ""  # override the preset's error metric
  max_images: int = 0  # 0: every test image (the papers' protocol); m: an evenly spread subset of m
  strategy: str = "auto"  # "stages", "eliminate", or "auto": stages below `large_k` classes, else eliminate
  confidence: float = 0.99  # "eliminate": of each drop
  round_samples: int = 5  # "eliminate": new samples per round (with strategy "auto": at most a quarter of the budget)
  min_samples: int = 10  # "eliminate": samples before the first test (with strategy "auto": at most half the budget)
  shortlist: int | str = "auto"  # 0: every class; m: the head's top m of each image; "auto": 0 below `large_k`,
  #                                else LARGE_K_SHORTLIST
  large_k: int = LARGE_K  # classes from which "auto" means the head's shortlist + elimination

  def __post_init__(self):
    if self.strategy not in ("auto", *dic.STRATEGIES):
      raise ValueError(f"dic strategy={self.strategy!r}: one of 'auto', {', '.join(map(repr, dic.STRATEGIES))}")
    if self.shortlist != "auto" and not (isinstance(self.shortlist, int) and self.shortlist >= 0):
      raise ValueError(f"dic shortlist={self.shortlist!r}: 'auto', 0 (every class) or the number of classes to keep")
    if isinstance(self.max_images, bool) or not isinstance(self.max_images, int) or self.max_images < 0:
      raise ValueError(f"dic max_images={self.max_images!r}: 0 (every test image) or the size of a subset")
    if isinstance(self.large_k, bool) or not isinstance(self.large_k, int) or self.large_k < 1:
      raise ValueError(f"dic large_k={self.large_k!r} must be a whole number of classes, at least 1")

  def config(self, num_classes: int) -> dic.DiCConfig:
    """The DiC settings for K classes: the preset with this row's fields, "auto" ones chosen by K (see above)."""
    large = num_classes >= self.large_k
    strategy = self.strategy if self.strategy != "auto" else ("eliminate" if large else "stages")
    shortlist = self.shortlist if self.shortlist != "auto" else (min(LARGE_K_SHORTLIST, num_classes) if large else 0)
    rounds, first = self.round_samples, self.min_samples
    if self.strategy == "auto":  # a small budget (tiny: 8) tests from half of it, in rounds of a quarter
      budget = dic.preset(self.preset).max_samples
      rounds, first = min(rounds, max(1, budget // 4)), min(first, max(2, budget // 2))
    return dic.preset(self.preset, strategy=strategy, confidence=self.confidence, round_samples=rounds,
                      min_samples=first, shortlist=shortlist, **({"error": self.error} if self.error else {}))

  def run(self, cell, name: str):
    m, r, tc = cell.models, cell.result, cell.train_config
    cfg = self.config(r.num_classes)
    text_encoder = freeze(m.sd.text_encoder)
    if self.tokens:
      learned, tokenizer = cell.learned_tokens(self.tokens)
      contexts = dic.class_contexts(text_encoder, tokenizer, learned=learned, template=self.template)
    else:
      contexts = dic.class_contexts(text_encoder, m.sd.tokenizer, class_names=list(r.class_names),
                                    template=self.template)
    # Evenly spread positions: the same subset for every row and seed whose test split is the same.
    count = min(self.max_images or len(cell.test), len(cell.test))
    positions = np.linspace(0, len(cell.test) - 1, count).round().astype(int)
    subset = cell.test.subset(positions)
    extra = {"sd": runs.fingerprint(tc.model.sd_path), "resolution": tc.data.resolution}
    prior = None
    if cfg.shortlist:
      prior = head_ranking(cell, self.tokens, positions, self.template)
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
    info.update(test_images=len(cell.test), schedule=schedule(cfg))
    return scores, subset.labels, {**info, **calls_info(cfg, r.num_classes, result.results, self.tokens)}


def schedule(cfg: dic.DiCConfig) -> str:
  """What a DiC row ran, in words: its strategy, samples and error metric."""
  if cfg.strategy == "eliminate":
    text = (f"paired elimination, budget {cfg.max_samples} samples, confidence {cfg.confidence}, "
            f"first test after {cfg.min_samples}, rounds of {cfg.round_samples}")
  else:
    text = f"stages keep {cfg.keep}, samples {cfg.samples}"
  return text + f", {cfg.error} error" + (f", head top-{cfg.shortlist} shortlist" if cfg.shortlist else "")


def head_ranking(cell, phase: str, positions: np.ndarray, template: str = "a photo of a {}") -> np.ndarray:
  """Every class of the test images at `positions`, best first: [M, K].

  By the CLIP-token head of a phase (T1), or for `phase=""` by CLIP zero-shot over the class names in `template`.
  """
  if phase:
    text = cell.token_text_features(phase, (clip_head.TEMPLATES["T1"],))
  else:
    text = clip_head.name_text_features(cell.models.clip, cell.models.sd.tokenizer, list(cell.result.class_names),
                                        (template,))
  scores = np.asarray(clip_head.cosine_scores(cell.test_features[positions], text))
  return np.argsort(-scores, axis=1, kind="stable")


def calls_info(cfg: dic.DiCConfig, num_classes: int, results, tokens: str) -> dict:
  """What the row ran and paid: the strategy, the shortlist's source, UNet calls per image (mean, max, bound)."""
  calls = [sum(res.num_samples) for res in results]  # each class is scored once per sample it was ranked on
  source = (f"{tokens} token head" if tokens else "CLIP zero-shot names") if cfg.shortlist else "every class"
  return {"strategy": cfg.strategy, "shortlist": cfg.shortlist, "shortlist_from": source,
          "unet_calls_per_image": float(np.mean(calls)) if calls else 0.0, "unet_calls_max": int(max(calls, default=0)),
          "unet_calls_bound": dic.max_calls(cfg, num_classes)}
