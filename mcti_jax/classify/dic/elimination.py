"""Sequential paired elimination: score the surviving classes round by round, drop the clearly worse ones.

The DiC stage schedule decides how many classes survive in advance. Here
the data decide. Round after round, every surviving class of an image is
scored on the same new (t, noise) samples (a paired design: the noise of
sample j is the same for every class). From `min_samples` on, after each
round, the leader is the class with the lowest mean error, and a class k
drops out when its paired differences d_j = e_k(j) - e_leader(j) are
significantly positive: a one-sided t-test, mean(d) / (std(d) / sqrt(n)) >
t_{n-1}(confidence). An image is done when one class is left or every
class left has been scored on all S samples (the budget); the prediction
is then the lowest mean.

Samples are taken in a stratified order (`sample_order`): any prefix is
spread over the whole timestep range, as the stage grids are.

The ranking lists the survivors by mean error, then the classes dropped in
the last round, then those of the round before, and so on (by mean within a
round); each with the samples it was scored on. Pure numpy around a score
function, so it can be tested on a hand-made error table.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mcti_jax.classify.dic.config import DiCConfig
from mcti_jax.classify.dic.stages import Ranking

# flat_score_fn(image rows [P], classes [P], sample ids [P]) -> errors [P]
FlatScoreFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def sample_order(max_samples: int) -> np.ndarray:
  """The S sample ids in bit-reversed order: every prefix is spread over [0, S), as evenly as halving allows."""
  bits = max(int(np.ceil(np.log2(max_samples))), 1)
  reversed_ids = [int(f"{i:0{bits}b}"[::-1], 2) for i in range(2**bits)]
  return np.asarray([j for j in reversed_ids if j < max_samples], np.int32)


def critical_t(confidence: float, num_samples: int) -> float:
  """The one-sided critical value of a paired t-test on `num_samples` differences."""
  from scipy import stats
  return float(stats.t.ppf(confidence, num_samples - 1))


def significantly_worse(errors: np.ndarray, classes: np.ndarray, confidence: float) -> np.ndarray:
  """Which of the classes [m] with errors [m, n] on shared samples are significantly worse than the leader.

  The leader (lowest mean; on a tie the lower class index) is never worse than itself.
  """
  errors = np.where(np.isnan(errors), np.inf, errors)  # a NaN error loses
  means = errors.mean(1)
  leader = np.lexsort((classes, means))[0]
  with np.errstate(invalid="ignore", divide="ignore"):  # inf - inf, or no spread: settled by `certain` below
    d = errors - errors[leader]
    mean_d, std_d = d.mean(1), d.std(1, ddof=1)
    stat = mean_d / (std_d / np.sqrt(errors.shape[1]))
  certain = (std_d == 0) | ~np.isfinite(mean_d)  # no spread (or an infinite error): the sign decides
  worse = np.where(certain, mean_d > 0, stat > critical_t(confidence, errors.shape[1]))
  worse[leader] = False
  return worse


def run_elimination(score_fn: FlatScoreFn, candidates: np.ndarray, cfg: DiCConfig) -> list[Ranking]:
  """Paired elimination among each image's candidate classes [B, m]; `score_fn` is asked for each item once."""
  candidates = np.asarray(candidates)
  num_images, m = candidates.shape
  order = sample_order(cfg.max_samples)
  errors = np.full((num_images, m, len(order)), np.nan)  # by place in `order`
  alive = np.ones((num_images, m), bool)
  scored = np.zeros(num_images, int)  # samples every surviving class of the image is scored on
  dropped_round = np.full((num_images, m), -1)
  dropped_mean = np.full((num_images, m), np.nan)
  dropped_count = np.zeros((num_images, m), int)
  for round_index in range(-(-len(order) // cfg.round_samples)):
    undecided = alive.sum(1) > 1
    if not undecided.any():
      break
    start = round_index * cfg.round_samples
    new = order[start:start + cfg.round_samples]
    b, slot = np.nonzero(alive & undecided[:, None])
    e = score_fn(np.repeat(b, len(new)), np.repeat(candidates[b, slot], len(new)), np.tile(new, len(b)))
    errors[b, slot, start:start + len(new)] = np.asarray(e, np.float64).reshape(len(b), len(new))
    scored[undecided] += len(new)
    for image in np.flatnonzero(undecided):
      n = scored[image]
      if n < cfg.min_samples:
        continue
      slots = np.flatnonzero(alive[image])
      worse = significantly_worse(errors[image, slots, :n], candidates[image, slots], cfg.confidence)
      gone = slots[worse]
      alive[image, gone] = False
      dropped_round[image, gone] = round_index
      dropped_mean[image, gone] = np.where(np.isnan(errors[image, gone, :n]), np.inf, errors[image, gone, :n]).mean(1)
      dropped_count[image, gone] = n
  out = []
  for image in range(num_images):
    n = scored[image]
    if n:
      means = np.where(np.isnan(errors[image, :, :n]), np.inf, errors[image, :, :n]).mean(1)
    else:  # one candidate: nothing to score
      means = np.full(m, np.nan)
    means = np.where(alive[image], means, dropped_mean[image])
    counts = np.where(alive[image], n, dropped_count[image])
    # survivors first (round = +inf), then later drops before earlier ones; by mean, then class index, within
    rank_round = np.where(alive[image], np.inf, dropped_round[image])
    order_ = np.lexsort((candidates[image], means, -rank_round))
    out.append(Ranking(ranking=candidates[image, order_], mean_error=means[order_], num_samples=counts[order_]))
  return out
