"""MC-TI eq. 6: classify an image by the cosine of its CLIP feature with the text
features of "a photo of a S_k" for every class k.

With several templates (prompt ensembling) a class's text feature is the mean
of its normalised per-template features, normalised again (as CLIP does).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mcti_jax import tokens as tok
from mcti_jax.models.frozen import Frozen


def _normalize(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@functools.partial(jax.jit, static_argnames=("first_id", "pooling"))
def class_text_features(clip: Frozen, tokens, template_ids, *, first_id: int, pooling: str = "eos"):
  """Normalised text features [K, P] of every class's tokens [K, V, D] in every template [T, L] (class 0 ids)."""
  num_classes, num_vectors = tokens.shape[:2]
  model = clip.module
  table = model.text_model.embeddings.token_embedding.embedding[...]

  def one_class(vectors, k):
    ids = tok.ids_for_class(template_ids, first_id, num_vectors, k)
    placeholder_ids = first_id + k * num_vectors + jnp.arange(num_vectors)
    embeds = tok.splice(table, ids, placeholder_ids, vectors)
    features = model.get_text_features(ids, inputs_embeds=embeds, pooling=pooling)
    return _normalize(_normalize(features).mean(0))

  return jax.vmap(one_class)(tokens, jnp.arange(num_classes))


def cosine_scores(image_features, text_features):
  """cos(f_i, g_k) [N, K]; argmax over k is the prediction."""
  return _normalize(image_features) @ _normalize(text_features).T
