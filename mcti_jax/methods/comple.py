"""CoMPLe: GCPL's template token, plus a contrastive term that pushes each class's prompt off other classes' noise.

Equation 3 of the CoMPLe paper (GCPL paper, section 3.3), for a batch of B items, item j of class c_j:

    L = 1/B sum_j ||eps_j - eps_theta(x_t^j, t_j, c_j)||^2
        - lambda / (B (B-1)) sum_{i != j} ||eps_i - eps_theta(x_t^j, t_j, c_j)||^2

||.||^2 is the mean over latent elements (as the MSE), and i != j ranges over the ordered pairs of the batch's
items. The noises eps_i carry no gradient, so item j's prediction, and with it class c_j's token, gets the
gradient of its own share of L: (its MSE - lambda * the mean of its B - 1 pairs) / B. Class k's loss here is that
share times B, as a mean over the step's items b of class k, each in a batch of its own:

    L_k = mean_b ||eps_b - eps_theta(x_t^b, c_k)||^2
          - lambda * mean_{b, i in batch(b), i != b} ||eps_i - eps_theta(x_t^b, c_k)||^2

Which items are item b's batch-mates (`batch`, the paper's B):

  batch = B >= 2   the paper's (section 4.2: B = 4). Item b draws B - 1 other classes and one item of each from
                   its own key (Item.keys, from fold_in(key, k)): every valid class other than k gets a score from
                   fold_in(that key, its class id), the lowest B - 1 win. The draw depends on class ids alone, not
                   on where the mesh put the classes, how many padded slots it added, or how the classes were
                   passed (class_chunk). The classes are distinct: the paper's negatives are "different class"
                   pairs (section 3.3). With fewer than B classes, the batch holds them all.
  batch = 0        "all classes" (this module's earlier default, not the paper's): every item of every other
                   valid class of the step is a negative of every item of class k.

How a step relates to the paper's batches: the paper's batch trains only its B classes; this trainer trains every
class every step, with batch_per_class items each (one by default). Each item sits in a batch of B drawn for it
alone, so class k's gradient is the one it gets in a random batch of B distinct classes; the batches of
different classes overlap instead of tiling the classes (what each class's update sees is the same). One step is
then about K / B of the paper's batches, and one epoch (every shot of every class seen once) is
n_shots / (batch_per_class * grad_accum) steps, as for GCPL. The paper's 4000 epochs are 4000 * n_shots steps at
one item per class and step: 64000 at 16 shots (mcti_jax/configs/gcpl.py computes it from the preset's shots).

A cross-class method: the negatives' noises are gathered over the whole mesh (only the noises: they carry no
gradient, so no UNet output crosses devices), and class k's loss holds only its own predictions.

The negative term is bounded below for lambda < 1: per prediction p, the MSE grows as |p|^2 and the negative
mean as lambda |p|^2. For larger lambdas `neg_clip` > 0 caps a pair's distance (4.0: twice what a prediction
that looks like noise scores against an independent noise); 0 (the paper's) does not clip. The metrics report
the unclipped mean and the clipped fraction.

Paper vs this module (GCPL paper = Chattopadhyay et al., arXiv 2409.01835; its public code has no CoMPLe):

  setting           | paper (section)                     | this module                   | why, if different
  ------------------|-------------------------------------|-------------------------------|---------------------------
  loss              | eq. 3 (3.3)                         | eq. 3, each class's share x B | a per-class sum, as always
  lambda            | 1e-3 (4.2)                          | lam=1e-3                      |
  batch B           | 4 (4.2)                             | batch=4                       |
  negatives         | pairs i != j of the batch (3.3)     | B - 1 distinct other classes, | a batch per item, not a
                    |                                     | one item each, drawn per item | tiling: mesh-independent
  all classes       | -                                   | batch=0 (gcpl:<p>,comple_all) | this module's old default
  lr, optimizer     | 1e-3, AdamW(0.9, 0.999, 0.01) (4.2) | lr=1e-3, the trainer's AdamW  |
  items per step    | 4, of 4 classes (4.2)               | 1 per class (grad_accum=1)    | every class trains a step
  training length   | 4000 epochs (4.2)                   | 4000 * n_shots steps          | an epoch = n_shots steps
  prompt, init word | Table 1 (4.2)                       | data.template, init_word      | set by the presets
  clip of a pair    | none                                | neg_clip=0 (off)              | an option for lambda >= 1
  model             | SD v1.4 (4.2)                       | model.sd_path (SD 1.5)        | the project's default
"""

import jax
import jax.numpy as jnp
import ml_collections

from mcti_jax.methods import ti

needs = ()
cross_class = True
metric_titles = {**ti.metric_titles, "neg": "CoMPLe negative term (clipped)",
                 "neg_raw": "CoMPLe negative term (unclipped)", "neg_clipped": "fraction of clipped pairs"}

EPOCHS = 4000  # section 4.2
ITEMS_PER_UPDATE = 1  # a class's items per step: each in a batch of B items of B classes
ALL = 0  # `batch` = ALL: every other class's items are negatives (the "all classes" variant)


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=1e-3,  # section 4.2
      templates="dataset",  # GCPL's: config.data.template (Table 1)
      lam=1e-3,  # lambda, the weight of the negative term (section 4.2)
      batch=4,  # B of eq. 3: an item and B - 1 items of other classes (section 4.2); ALL (0): every other class
      neg_clip=0.0,  # a pair's distance counts at most this much; 0: no clip (the paper's)
  ))


def check(cfg) -> list[str]:
  """Problems with a phase's CoMPLe settings (phases.plan turns them into one ConfigError)."""
  b = cfg.batch
  if isinstance(b, bool) or not isinstance(b, int) or b == 1:
    return [f"batch={b!r} must be an integer >= 2 (eq. 3's B: an item and B - 1 items of other classes) or 0 "
            "(every other class's items)"]
  return []


item_terms = ti.item_terms


def pair_distances(predictions, noises):
  """mean((noise_i - prediction_b)^2) over latent elements, for every b and i: [B, M].

  predictions [B, ...], noises [M, ...]. Expanded as |n|^2 - 2 n.p + |p|^2 so that no [B, M, latent] array is made.
  """
  p = predictions.reshape(predictions.shape[0], -1).astype(jnp.float32)
  n = noises.reshape(noises.shape[0], -1).astype(jnp.float32)
  sq = jnp.sum(n * n, -1)[None, :] - 2.0 * p @ n.T + jnp.sum(p * p, -1)[:, None]
  return sq / p.shape[1]


def batch_mates(key, k, everyone, batch: int):
  """Who joins one item of class k in its batch of `batch` items: rows [m] of everyone's class axis, an item [m]
  of each, and ok [m] (False where there are fewer than batch - 1 other valid classes); m = min(batch - 1, K').

  Drawn from the item's key and the class ids only (see the module docstring), so any mesh and padding agree.
  """
  class_key, item_key = jax.random.split(key)
  ids = everyone.class_ids
  eligible = everyone.valid & (ids != k)
  score = jax.vmap(lambda c: jax.random.bits(jax.random.fold_in(class_key, c), (), jnp.uint32))(ids)
  rows = jnp.arange(ids.shape[0])
  # Eligible first, then the lowest scores, ties to the lower class id: a total order on the classes.
  _, _, _, order = jax.lax.sort(((~eligible).astype(jnp.int32), score, ids, rows), num_keys=3)
  picked = order[:min(batch - 1, ids.shape[0])]
  per_class = everyone.target.shape[1]
  items = jax.vmap(lambda c: jax.random.randint(jax.random.fold_in(item_key, c), (), 0, per_class))(ids[picked])
  return picked, items, eligible[picked]


def cross_terms(batch, k, everyone, cfg) -> dict:
  """Class k's predictions [B, ...] against the noises of their batch-mates (or of every other class's items).

  everyone.target [K', B, ...], everyone.class_ids [K'], everyone.valid [K'] cover the whole mesh.
  """
  if cfg.batch == ALL:
    others = everyone.valid & (everyone.class_ids != k)  # [K']
    per_item = everyone.target.shape[1]
    # Padded classes hold copies of a real class's data: zero them so that nothing non-finite reaches a gradient.
    noises = jnp.where(others.reshape(-1, *([1] * (everyone.target.ndim - 1))), everyone.target, 0.0)
    d = pair_distances(batch.prediction, noises.reshape(-1, *noises.shape[2:]))  # [B, K' * B]
    mask = jnp.broadcast_to(jnp.repeat(others, per_item)[None, :], d.shape)
    return _summary(d, mask, cfg)

  def one_item(prediction, keys):
    rows, items, ok = batch_mates(keys[0], k, everyone, int(cfg.batch))
    noises = everyone.target[rows, items]  # [m, ...]
    noises = jnp.where(ok.reshape(-1, *([1] * (noises.ndim - 1))), noises, 0.0)
    return pair_distances(prediction[None], noises)[0], ok

  d, mask = jax.vmap(one_item)(batch.prediction, batch.keys)  # [B, m]
  return _summary(d, mask, cfg)


def _summary(d, mask, cfg) -> dict:
  """The mean of the pairs' distances d under mask (clipped at neg_clip > 0), unclipped, and the clipped share."""
  count = jnp.maximum(jnp.sum(mask), 1)
  clips = cfg.neg_clip > 0
  clipped = jnp.minimum(d, cfg.neg_clip) if clips else d
  return {"neg": jnp.sum(jnp.where(mask, clipped, 0.0)) / count,
          "neg_raw": jax.lax.stop_gradient(jnp.sum(jnp.where(mask, d, 0.0)) / count),
          "neg_clipped": jnp.sum(mask & (d > cfg.neg_clip)) / count if clips else jnp.zeros((), jnp.float32)}


def loss(terms, cfg):
  return terms["mse"] - cfg.lam * terms["neg"]
