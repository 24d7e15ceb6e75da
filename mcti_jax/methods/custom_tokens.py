"""Custom tokens (Perera et al.): Textual Inversion plus a loss that aligns the token's CLIP text feature with
its class's CLIP image features; trained in the span of attribute words, the token composes with them.

The paper's details beyond its abstract are not public; this is our design.
- The alignment term is MC-TI's cross-entropy over s*cos(g_k, f_j) (methods/mcti.py), but its candidates f_j
  are every class's prototype: the mean of the normalised CLIP features of all its shots (and flips). The
  paper aligns a token with "the concept's" image features; the prototype is that concept, and unlike MC-TI's
  one random shot per class it gives the same target at every step.
- The subspace restriction is not part of the loss: a phase with `subspace=True` trains the token's
  coordinates in the span of `config.tokens.subspace_words` (tokens/subspace.py), so the restriction is exact.
  mcti_jax/configs/custom_tokens.py sets the words per dataset (the super-class word and attribute words).
- Inference: composite queries "a photo of a S_k <attribute words>" retrieve images (retrieval/retrieve.py), refined
  by Generation-Aided Image Retrieval (retrieval/gair.py).

Paper vs this module (Perera et al., arXiv 2502.12095; only the abstract and figure captions are available):

  setting        | paper                                    | this module                 | why, if different
  ---------------|------------------------------------------|-----------------------------|------------------------
  loss           | TI + a discriminative objective (abstract)| alpha MSE + beta CE         | weights not given: 1, 1
  CE candidates  | not given                                | class prototypes (above)    | a fixed target
  subspace       | a subspace projection (abstract)         | subspace=True: exact span   |
  GAIR           | balance token and words (abstract)       | the lam search; expansion   | expansion is ours, off
                 |                                          | (expand_query) optional     |
"""

import jax.numpy as jnp
import ml_collections

from mcti_jax.methods import mcti, ti

needs = ("clip",)
cross_class = False
metric_titles = {**ti.metric_titles, "align": "alignment with the class prototypes (CE)",
                 "align_acc": "train accuracy of the alignment"}


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=5e-4,
      alpha=1.0,  # weight of the noise MSE
      beta=1.0,  # weight of the alignment CE
      scale=10.0,  # s in softmax(s * cos)
  ))


def prototypes(image_features):
  """The mean normalised CLIP feature [K', P] of each class's shots and flips [K', N, F, P]."""
  f = image_features.astype(jnp.float32)
  f = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
  return f.reshape(f.shape[0], -1, f.shape[-1]).mean(1)


def item_terms(item, ctx, cfg) -> dict:
  """Noise MSE, and the alignment's CE and hit of one item of class item.k."""
  align, correct = mcti.reg_loss(mcti.text_feature(item, ctx), prototypes(ctx.image_features), item.k, ctx.valid,
                                 cfg.scale)
  return {"mse": ti.noise_loss(item.prediction, item.target), "align": align, "align_acc": correct}


def loss(terms, cfg):
  return cfg.alpha * terms["mse"] + cfg.beta * terms["align"]
