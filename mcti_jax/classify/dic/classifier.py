"""Classify images with the adaptive stages, and evaluate accuracy and speed over a dataset."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from mcti_jax.classify.dic.cache import ImageResult, ResultCache
from mcti_jax.classify.dic.config import DiCConfig
from mcti_jax.classify.dic.scorer import Scorer
from mcti_jax.classify.dic.elimination import run_elimination
from mcti_jax.classify.dic.stages import Ranking, make_plan, run_stages
from mcti_jax.models.frozen import Frozen


def classify(unet: Frozen | None, schedule, contexts, x0_batch, image_indices: Sequence[int], cfg: DiCConfig, mesh,
             cache: ResultCache | None = None, *, image_ids: Sequence[str] | None = None,
             labels: Sequence[int] | None = None, scorer: Scorer | None = None,
             prior: np.ndarray | None = None) -> list[ImageResult]:
  """Classify images x0 [B, h, w, c] (VAE latent mean x scaling factor) with dataset indices [B].

  Images already in `cache` are not scored again (`unet` may then be None);
  new results are appended to it. Pass a `scorer` to reuse placed weights
  across calls (`evaluate` does). With `cfg.shortlist` = m, `prior` [B, K]
  ranks every image's classes (best first, e.g. by the CLIP-token head):
  DiC decides among its first m, and the rest follow in the prior's order.
  """
  image_indices = [int(i) for i in image_indices]
  image_ids = [str(i) for i in image_indices] if image_ids is None else [str(i) for i in image_ids]
  labels = [None] * len(image_indices) if labels is None else [int(y) for y in labels]
  if not len(image_indices) == len(image_ids) == len(labels) == len(x0_batch):
    raise ValueError(f"{len(x0_batch)} latents, {len(image_indices)} indices, {len(image_ids)} ids and "
                     f"{len(labels)} labels")
  num_classes = int(np.shape(contexts)[0])
  cfg.check(schedule.num_train_timesteps, num_classes)
  if cfg.shortlist and (prior is None or np.shape(prior) != (len(x0_batch), num_classes)):
    raise ValueError(f"DiC shortlist={cfg.shortlist} needs prior, each image's ranking of the {num_classes} classes "
                     f"[{len(x0_batch)}, {num_classes}], got {None if prior is None else np.shape(prior)}")
  results: list[ImageResult | None] = [cache.get(i, n) if cache is not None else None
                                           for i, n in zip(image_ids, image_indices)]
  todo = [p for p, r in enumerate(results) if r is None]
  if not todo:
    return results
  if scorer is None:
    if unet is None:
      raise ValueError("the UNet is needed: some images are not in the cache")
    scorer = Scorer(unet, schedule, contexts, cfg, mesh)
  plan = make_plan(cfg, schedule.num_train_timesteps)
  x0_batch = np.asarray(x0_batch, np.float32)
  group = cfg.images_per_call
  for start in range(0, len(todo), group):
    part = todo[start:start + group]
    rows = part + [part[0]] * (group - len(part))  # pad with copies: every call has the same shapes
    scorer.set_images(x0_batch[rows], [image_indices[p] for p in rows], num_real=len(part))
    rankings = _rank(scorer, cfg, plan, num_classes, None if prior is None else np.asarray(prior)[rows])
    for p, ranking in zip(part, rankings):
      results[p] = ImageResult.from_ranking(image_ids[p], image_indices[p], ranking, labels[p])
      if cache is not None:
        cache.put(results[p])
  return results


def _rank(scorer: Scorer, cfg: DiCConfig, plan, num_classes: int, prior: np.ndarray | None) -> list[Ranking]:
  """The rankings of the scorer's images: stages or elimination, among all classes or the prior's shortlist."""
  num_images = scorer.x0.shape[0]
  candidates = prior[:, :cfg.shortlist] if cfg.shortlist else np.tile(np.arange(num_classes), (num_images, 1))
  if cfg.strategy == "eliminate":
    rankings = run_elimination(scorer.flat, candidates, cfg)
  else:
    rankings = run_stages(scorer, num_images, num_classes, plan, candidates)
  if not cfg.shortlist:
    return rankings
  rest = prior[:, cfg.shortlist:]  # not shortlisted: after DiC's, in the prior's order, unscored
  return [Ranking(ranking=np.concatenate([r.ranking, others]),
                  mean_error=np.concatenate([r.mean_error, np.full(len(others), np.nan)]),
                  num_samples=np.concatenate([r.num_samples, np.zeros(len(others), int)]))
          for r, others in zip(rankings, rest)]


def max_calls(cfg: DiCConfig, num_classes: int) -> int:
  """The most UNet calls `classify` makes per image on K classes; with a shortlist of m, independent of K.

  Elimination scores each candidate on at most the budget (samples[-1]); the stages score the classes entering
  each stage (at most the candidates) on the stage's new samples. Exact for the stages, a bound for elimination.
  """
  classes = min(cfg.shortlist or num_classes, num_classes)
  if classes <= 1:  # decided without the UNet
    return 0
  if cfg.strategy == "eliminate":
    return classes * cfg.max_samples
  entering = np.minimum((classes, *cfg.keep[:-1]), classes)
  return int(sum(k * len(new) for k, new in zip(entering, make_plan(cfg, cfg.max_samples).new) if k > 1))


@dataclasses.dataclass
class EvalResult:
  accuracy: float
  num_images: int
  num_correct: int
  results: list[ImageResult]  # in the order of the batches
  num_computed: int  # images scored by this run (the rest came from the cache)
  unet_evals: int
  seconds: float  # wall time of the whole run
  images_per_s: float  # computed images per second of this run
  unet_evals_per_s: float

  def summary(self) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(self).items() if k != "results"}


def evaluate(unet: Frozen | None, schedule, contexts, batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
             cfg: DiCConfig, *, encode: Callable[[np.ndarray], np.ndarray], mesh,
             cache: ResultCache | None = None, image_ids: Sequence[str] | None = None, total: int | None = None,
             progress: bool = True, prior: np.ndarray | None = None) -> EvalResult:
  """Accuracy of the Diffusion Classifier over (uint8 images [B, R, R, 3], labels [B], dataset indices [B]) batches.

  `LabeledImages.batches(resolution, batch_size)` yields exactly these. Labels
  index the rows of `contexts`. `encode` maps uint8 images to x0 (see
  `latent_encoder`); every batch is padded to the first one's size so it
  compiles once. `image_ids[index]` names images in the cache (e.g.
  `labeled.ids`); by default the index itself. `total` (image count) sizes the
  progress bar and its ETA. `prior[index]`: the image's class ranking, for
  `cfg.shortlist` (see `classify`).
  """
  num_classes = int(np.shape(contexts)[0])
  cfg.check(schedule.num_train_timesteps, num_classes)
  scorer = None
  results: list[ImageResult] = []
  computed, compute_s, first_size, start = 0, 0.0, None, time.perf_counter()
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc="diffusion classifier", unit="img", dynamic_ncols=True)
  try:
    for images, labels, indices in batches:
      labels, indices = np.asarray(labels).reshape(-1), np.asarray(indices).reshape(-1)
      if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels {sorted(set(labels.tolist()))} fall outside the {num_classes} classes of contexts")
      ids = [str(image_ids[i]) if image_ids is not None else str(i) for i in indices]
      batch = [cache.get(i, n) if cache is not None else None for i, n in zip(ids, indices)]
      pending = [p for p, r in enumerate(batch) if r is None]
      if pending:
        tick = time.perf_counter()
        if scorer is None:
          if unet is None:
            raise ValueError("the UNet is needed: some images are not in the cache")
          scorer = Scorer(unet, schedule, contexts, cfg, mesh)
        images = np.asarray(images)
        first_size = first_size or len(images)
        padded = np.concatenate([images, np.repeat(images[:1], max(first_size - len(images), 0), 0)])
        x0 = np.asarray(encode(padded))[:len(images)]
        new = classify(unet, schedule, contexts, x0[pending], indices[pending], cfg, mesh, cache,
                       image_ids=[ids[p] for p in pending], labels=labels[pending], scorer=scorer,
                       prior=None if prior is None else np.asarray(prior)[indices[pending]])
        for p, r in zip(pending, new):
          batch[p] = r
        computed += len(pending)
        compute_s += time.perf_counter() - tick
      results += [dataclasses.replace(r, label=int(y)) for r, y in zip(batch, labels)]
      if bar is not None:
        evals = scorer.unet_evals if scorer else 0
        bar.update(len(batch))
        bar.set_postfix(acc=f"{sum(r.correct for r in results) / len(results):.3f}",
                        img_s=f"{computed / max(compute_s, 1e-9):.3g}", evals_s=f"{evals / max(compute_s, 1e-9):.3g}")
  finally:
    if bar is not None:
      bar.close()
  if not results:
    raise ValueError("no images to evaluate: the test split is empty (check the data source, split name and "
                     "class selection)")
  unet_evals = scorer.unet_evals if scorer else 0
  correct = sum(r.correct for r in results)
  return EvalResult(accuracy=correct / len(results), num_images=len(results), num_correct=correct, results=results,
                    num_computed=computed, unet_evals=unet_evals, seconds=time.perf_counter() - start,
                    images_per_s=computed / compute_s if compute_s else 0.0,
                    unet_evals_per_s=unet_evals / compute_s if compute_s else 0.0)
