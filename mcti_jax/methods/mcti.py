"""MC-TI: TI plus a discriminative regulariser over all classes (run after a TI warm-up phase).

The CLIP text feature g_k of the item's prompt (holding token k) is scored
against CLIP image features f_j of one shot of every class j by s*cos(g_k, f_j);
the regulariser is the cross-entropy of those logits with target k. The loss
of class k is alpha * MSE + beta * CE (eq. 5). (The paper prints s*exp(cos); a
softmax over s*cos is what is meant and what is used here.)

Defaults are the paper's (Sec. 4.1, "Implementation Details"): alpha = 1,
beta = 1, s = 10, AdamW at lr 5e-4, 100 steps after a 3000-step TI warm-up.
Table 3 varies s (3-30) and beta (0.1-10) on Pets. A preset may choose other
values: the tiny one uses beta = 0.0075 and lr 2e-3, tuned on the demo's seeds
(configs/mcti.py says why).

The shots of every class are looked at, but only class k's tokens are in its
loss: classes still train independently (a per-class method).

Paper vs this module (Wang et al., arXiv 2410.22317; tests/test_defaults.py holds the values):

  setting        | paper (section)                          | this module (mcti:pets)     | why, if different
  ---------------|------------------------------------------|-----------------------------|------------------------
  loss           | alpha MSE + beta CE(s exp(cos)) (eq. 4-5)| alpha MSE + beta CE(s cos)  | exp is a misprint
  alpha, beta, s | 1, 1, 10 (4.1)                           | 1, 1, 10                    | tiny preset: its own
  schedule       | TI 3000 steps, then 100 steps (4.1)      | phases ti (3000), mcti (100)|
  optimizer      | AdamW, lr 5e-4 (4.1)                     | AdamW, lr 5e-4              |
  f_j            | CLIP image features, extracted beforehand| cached CLIP features        |
  classifier     | eq. 6, template T1 (4.1)                 | clip_tokens, template T1    |
  text pooling   | the official code: argmax of token ids   | EOS (model.pooling="eos")   | argmax points at the
                 |                                          |                             | new token (models/clip.py)
  CoOp context   | M = 16 (4.1)                             | evals.mcti_coop.num_context |
  N-shot grid    | 1, 2, 4, 5, 8, 16 (3)                    | eval config n_shots         |
"""

import jax
import jax.numpy as jnp
import ml_collections

from mcti_jax.tokens import placeholders as tok
from mcti_jax.methods import ti

needs = ("clip",)
cross_class = False
metric_titles = {**ti.metric_titles, "reg": "MC-TI regulariser (CE)", "reg_acc": "train accuracy of the regulariser"}


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=5e-4,
      alpha=1.0,  # weight of the noise MSE (MC-TI Sec. 4.1: 1.0)
      beta=1.0,  # weight of the regulariser (Sec. 4.1: 1.0; Table 3 tries 0.1-10)
      scale=10.0,  # s in softmax(s * cos) (Sec. 4.1: 10.0)
  ))


def cosine_logits(text_feature, image_features, scale):
  """s * cos(g, f_j) for every row f_j of `image_features` [K, P]."""
  g = text_feature / jnp.linalg.norm(text_feature, axis=-1, keepdims=True)
  f = image_features / jnp.linalg.norm(image_features, axis=-1, keepdims=True)
  return scale * (f @ g)


def reg_loss(text_feature, image_features, target, valid, scale):
  """(cross-entropy, 1.0 if the target class wins) over the valid (unpadded) classes.

  text_feature [P] float, image_features [K, P], target int, valid [K] bool.
  """
  logits = cosine_logits(text_feature.astype(jnp.float32), image_features.astype(jnp.float32), scale)
  logits = jnp.where(valid, logits, -1e9)  # finite: -inf would make NaN gradients through `where`
  ce = -jax.nn.log_softmax(logits)[target]
  correct = (jnp.argmax(logits) == target).astype(jnp.float32)
  return ce, correct


def text_feature(item, ctx):
  """g_k: the CLIP text feature [P] of the item's prompt, with class k's vectors spliced into CLIP's text tower.

  When that tower is SD's text encoder (`Backbone.text_shared`), the item's pooled output already is its pooled
  output: only the projection is left to apply.
  """
  clip = ctx.backbone.clip.module
  if ctx.backbone.text_shared:
    return clip.text_projection(item.pooled[None])[0]
  clip_embeds = tok.splice(tok.token_table(clip), item.ids, item.placeholder_ids, item.vectors)
  return clip.get_text_features(item.ids[None], inputs_embeds=clip_embeds[None], pooling=ctx.pooling)[0]


def item_terms(item, ctx, cfg) -> dict:
  """Noise MSE, and the regulariser's CE and hit of one item of class item.k."""
  mse = ti.noise_loss(item.prediction, item.target)
  # One shot (and flip) of every class j, drawn from fold_in(key, j): the draw of a real class does not depend on
  # how many padded classes follow it.
  features = ctx.image_features  # [K', N, F, P]
  num_all, shots_each, flips_each = features.shape[:3]
  draw = lambda key, n: jax.vmap(lambda j: jax.random.randint(jax.random.fold_in(key, j), (), 0, n))(  # noqa: E731
      jnp.arange(num_all))
  shot_key, flip_key = item.keys
  image_features = features[jnp.arange(num_all), draw(shot_key, shots_each), draw(flip_key, flips_each)]
  reg, correct = reg_loss(text_feature(item, ctx), image_features, item.k, ctx.valid, cfg.scale)
  return {"mse": mse, "reg": reg, "reg_acc": correct}


def loss(terms, cfg):
  return cfg.alpha * terms["mse"] + cfg.beta * terms["reg"]


def reg_train_accuracy(text_features, image_features):
  """How often the regulariser's classifier is right on the shots, without sampling.

  text_features [K, P] (one per class), image_features [K, N, P]. For every
  class k and shot index n, the candidates are the n-th shot of every class;
  the prediction is argmax_j cos(g_k, f_jn). Returns the mean over k and n.
  """
  g = text_features / jnp.linalg.norm(text_features, axis=-1, keepdims=True)
  f = image_features / jnp.linalg.norm(image_features, axis=-1, keepdims=True)
  cos = jnp.einsum("kp,jnp->knj", g, f)
  return jnp.mean(jnp.argmax(cos, axis=-1) == jnp.arange(g.shape[0])[:, None])
