"""The Diffusion Classifier (Li et al. 2023): the class whose prompt best predicts the noise.

For an image latent x0 and the conditioning c_k of each class k, the error

  e_k(t, eps) = mean over the latent of err(target(x0, eps, t) - unet(x_t, t, c_k)),
  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,

is taken at evenly spaced timesteps (one noise draw per image and timestep,
the same for every class: a paired comparison), and the class with the lowest
mean error wins. err is l2 (squared), l1 or huber (delta 1, as torch's
huber_loss); the target is the noise, or v for v_prediction schedules.

  cfg = preset("pets")
  mesh = parallel.make_mesh()
  contexts = class_contexts(freeze(sd.text_encoder), sd.tokenizer, class_names=labeled.class_names)
  # few-shot: class_contexts(..., learned=conditioning.LearnedTokens.from_export(folder, sd.tokenizer, sd.text_width))
  key = settings_key(cfg, sd.schedule, contexts, {"unet": sd_fingerprint, "resolution": 512})
  result = evaluate(freeze(sd.unet), sd.schedule, contexts, labeled.batches(512, 8), cfg,
                    encode=latent_encoder(freeze(sd.vae), mesh), mesh=mesh, cache=ResultCache("runs/dic.jsonl", key),
                    image_ids=labeled.ids, total=len(labeled))
  print(result.summary())  # accuracy, images/s, UNet evaluations/s, ...

One idea per module: config (the settings and the DiC paper's presets), stages
(which samples each stage scores, which classes survive; pure numpy),
elimination (the sequential paired test instead of a fixed schedule), scorer
(the UNet error grid, sharded over the mesh), cache (per-image results in a
resumable JSONL), classifier (classify and evaluate) and inputs (image
latents, class contexts).
"""

from mcti_jax.classify.dic.cache import ImageResult, ResultCache, settings_key
from mcti_jax.classify.dic.classifier import EvalResult, classify, evaluate, max_calls
from mcti_jax.classify.dic.config import ERRORS, PRESETS, STRATEGIES, DiCConfig, preset
from mcti_jax.classify.dic.elimination import FlatScoreFn, run_elimination, sample_order, significantly_worse
from mcti_jax.classify.dic.inputs import class_contexts, latent_encoder
from mcti_jax.classify.dic.scorer import Scorer, error_grid, prediction_errors, sample_noise
from mcti_jax.classify.dic.stages import (Plan, Ranking, ScoreFn, make_plan, run_stages, stage_calls, stage_sample_ids,
                                          timestep_grid)
