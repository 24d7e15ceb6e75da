"""MC-TI's discriminative regulariser.

The CLIP text feature g_k of a prompt holding token k is scored against CLIP
image features f_j of one shot of every class j by s*cos(g_k, f_j); the loss
is the cross-entropy of those logits with target k. (The paper prints
s*exp(cos); a softmax over s*cos is what is meant and what is used here.)
"""

import jax
import jax.numpy as jnp


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
