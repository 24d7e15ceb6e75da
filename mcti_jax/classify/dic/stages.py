"""The adaptive stages: which sample ids each stage scores, and which classes survive it.

Sample ids and timesteps follow the DiC code (eval_prob_adaptive): for at most
S samples, sample j has t_j = T//S//2 + j*(T//S). Stage i (keep_i, n_i) scores
the surviving classes on the evenly spaced n_i of the S sample ids
(ids[(S//n_i)//2 :: S//n_i][:n_i]); ids scored in an earlier stage are reused,
not recomputed. Classes are ranked by their mean error over EVERY sample they
have been scored on (when the stage grids do not nest, as imagenet's, that is
more than n_i), and the best keep_i survive. Ties: on equal mean error the
lower class index ranks first. The last stage keeps one class: the prediction.
The full ranking lists the survivor, then the classes dropped at the last
stage in their order, then those dropped at the stage before, and so on.

Pure numpy around a score function, so it can be tested on a hand-made error table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from mcti_jax.classify.dic.config import DiCConfig


def timestep_grid(num_train_timesteps: int, max_samples: int) -> np.ndarray:
  """t of each sample id j < S: T//S//2 + j*(T//S), as the DiC code."""
  step = num_train_timesteps // max_samples
  if step < 1:
    raise ValueError(f"{max_samples} samples need at least as many timesteps, got {num_train_timesteps}")
  return np.arange(step // 2, num_train_timesteps, step)[:max_samples].astype(np.int32)


def stage_sample_ids(max_samples: int, n: int) -> np.ndarray:
  """The n evenly spaced sample ids of a stage among S, as the DiC code."""
  stride = max_samples // n
  return np.arange(max_samples)[stride // 2::stride][:n]


@dataclasses.dataclass(frozen=True)
class Plan:
  """The stages worked out for a schedule: which sample ids each stage computes and ranks on."""
  timesteps: np.ndarray  # [S] int32, t of each sample id
  keep: tuple[int, ...]
  new: tuple[np.ndarray, ...]  # sample ids first scored at stage i
  scored: tuple[np.ndarray, ...]  # every sample id scored by the end of stage i (sorted)


def make_plan(cfg: DiCConfig, num_train_timesteps: int) -> Plan:
  cfg.check(num_train_timesteps)
  done: set[int] = set()
  new, scored = [], []
  for n in cfg.samples:
    ids = [int(j) for j in stage_sample_ids(cfg.max_samples, n) if int(j) not in done]
    done.update(ids)
    new.append(np.asarray(ids, np.int32))
    scored.append(np.asarray(sorted(done), np.int32))
  return Plan(timestep_grid(num_train_timesteps, cfg.max_samples), cfg.keep, tuple(new), tuple(scored))


@dataclasses.dataclass(frozen=True)
class Ranking:
  """One image's outcome: classes best first, with the mean error and sample count each was ranked on."""
  ranking: np.ndarray  # int [K]
  mean_error: np.ndarray  # float64 [K], aligned with ranking
  num_samples: np.ndarray  # int [K], aligned with ranking

  @property
  def prediction(self) -> int:
    return int(self.ranking[0])


# score_fn(classes int [B, Kc], sample_ids int [n]) -> errors [B, Kc, n]
ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def run_stages(score_fn: ScoreFn, num_images: int, num_classes: int, plan: Plan,
               candidates: np.ndarray | None = None) -> list[Ranking]:
  """The adaptive stages for a batch of images; `score_fn` is asked only for samples not scored before.

  `candidates` [B, m]: the classes each image starts from (default: all); a
  stage then keeps at most m. Pure numpy around the scorer, so it can be
  tested on a hand-made error table. Means are taken in float64; NaN errors
  rank last.
  """
  if candidates is None:
    if plan.keep[0] > num_classes:
      raise ValueError(f"keep={plan.keep} keeps {plan.keep[0]} classes of only {num_classes}")
    candidates = np.tile(np.arange(num_classes), (num_images, 1))
  rows = np.arange(num_images)[:, None]
  errors = np.full((num_images, num_classes, len(plan.timesteps)), np.nan)
  dropped = []  # per stage: (classes, means, count), each [B, dropped]
  survivor_means, survivor_count = np.full(candidates.shape, np.nan), 0
  for keep, new, scored in zip(plan.keep, plan.new, plan.scored):
    if candidates.shape[1] == 1:  # decided (a shortlist of one, or kept to one early): nothing left to score
      break
    keep = min(keep, candidates.shape[1])
    if len(new):
      e = np.asarray(score_fn(candidates, new), np.float64)
      if e.shape != (num_images, candidates.shape[1], len(new)):
        raise ValueError(f"score_fn returned {e.shape}, expected {(num_images, candidates.shape[1], len(new))}")
      errors[rows[:, :, None], candidates[:, :, None], new] = e
    means = errors[rows, candidates][:, :, scored].mean(-1)
    means = np.where(np.isnan(means), np.inf, means)
    order = np.stack([np.lexsort((c, m)) for c, m in zip(candidates, means)])  # by mean, then class index
    ranked, ranked_means = np.take_along_axis(candidates, order, 1), np.take_along_axis(means, order, 1)
    dropped.append((ranked[:, keep:], ranked_means[:, keep:], len(scored)))
    candidates, survivor_means, survivor_count = ranked[:, :keep], ranked_means[:, :keep], len(scored)
  out = []
  for b in range(num_images):
    parts = [(candidates[b], survivor_means[b], survivor_count)] + [(c[b], m[b], n) for c, m, n in dropped[::-1]]
    out.append(Ranking(ranking=np.concatenate([c for c, _, _ in parts]),
                       mean_error=np.concatenate([m for _, m, _ in parts]),
                       num_samples=np.concatenate([np.full(len(c), n) for c, _, n in parts])))
  return out


def stage_calls(plan: Plan, num_classes: int) -> int:
  """UNet calls per image of the stage schedule on K classes: each stage's new samples for the classes entering it."""
  entering = (num_classes, *plan.keep[:-1])
  return int(sum(k * len(new) for k, new in zip(entering, plan.new)))
