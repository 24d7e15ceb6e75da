"""CoMPLe: GCPL's template token, plus a contrastive term that pushes each class's prompt off other classes' noise.

For the items i of one step, each from its own class c_i:

    L = mean_i ||eps_i - eps_theta(x_t^i, t_i, c_i)||^2  -  lambda * mean_{i != j} ||eps_i - eps_theta(x_t^j, t_j, c_j)||^2

where i != j ranges over pairs of items of different classes, and ||.||^2 is
the mean over latent elements (as the MSE). This follows equation 3 of the
CoMPLe paper; the released GCPL code does not contain this loss.

A cross-class method: the negatives are the other classes' items of the same
step over the whole mesh. Only the noises eps_i are gathered (they carry no
gradient), so the term is regrouped by prediction: class k's loss holds its
own predictions against every other class's noise. Summed over classes this
is the equation's double sum; each class's tokens still get only the
gradient of terms holding their own predictions.

The negative term is unbounded: moving a prediction far from everything makes
it arbitrarily large. Each pair's distance is clipped at `neg_clip` (twice
what a prediction that looks like noise scores against an independent noise),
and the metrics report the unclipped mean and the clipped fraction.
"""

import jax
import jax.numpy as jnp
import ml_collections

from mcti_jax.methods import ti

needs = ()
cross_class = True
metric_titles = {**ti.metric_titles, "neg": "CoMPLe negative term (clipped)",
                 "neg_raw": "CoMPLe negative term (unclipped)", "neg_clipped": "fraction of clipped pairs"}


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=1e-3,  # the paper's
      templates="dataset",  # GCPL's: config.data.template
      lam=1e-3,  # lambda, the weight of the negative term (the paper's)
      neg_clip=4.0,  # a pair's distance counts at most this much
  ))


item_terms = ti.item_terms


def pair_distances(predictions, noises):
  """mean((noise_i - prediction_b)^2) over latent elements, for every b and i: [B, M].

  predictions [B, ...], noises [M, ...]. Expanded as |n|^2 - 2 n.p + |p|^2 so that no [B, M, latent] array is made.
  """
  p = predictions.reshape(predictions.shape[0], -1).astype(jnp.float32)
  n = noises.reshape(noises.shape[0], -1).astype(jnp.float32)
  sq = jnp.sum(n * n, -1)[None, :] - 2.0 * p @ n.T + jnp.sum(p * p, -1)[:, None]
  return sq / p.shape[1]


def cross_terms(batch, k, everyone, cfg) -> dict:
  """Class k's predictions [B, ...] against the noises of every other valid class's items.

  everyone.target [K', B, ...], everyone.class_ids [K'], everyone.valid [K'] cover the whole mesh.
  """
  others = everyone.valid & (everyone.class_ids != k)  # [K']
  per_item = everyone.target.shape[1]
  # Padded classes hold copies of a real class's data: zero them so that nothing non-finite reaches a gradient.
  noises = jnp.where(others.reshape(-1, *([1] * (everyone.target.ndim - 1))), everyone.target, 0.0)
  d = pair_distances(batch.prediction, noises.reshape(-1, *noises.shape[2:]))  # [B, K' * B]
  mask = jnp.broadcast_to(jnp.repeat(others, per_item)[None, :], d.shape)
  count = jnp.maximum(jnp.sum(mask), 1)
  clipped = jnp.minimum(d, cfg.neg_clip)
  return {"neg": jnp.sum(jnp.where(mask, clipped, 0.0)) / count,
          "neg_raw": jax.lax.stop_gradient(jnp.sum(jnp.where(mask, d, 0.0)) / count),
          "neg_clipped": jnp.sum(mask & (d > cfg.neg_clip)) / count}


def loss(terms, cfg):
  return terms["mse"] - cfg.lam * terms["neg"]
