"""MC-TI eq. 6: classify an image by the cosine of its CLIP feature with the text
features of "a photo of a S_k" for every class k.

With several templates (prompt ensembling) a class's text feature is the mean
of its normalised per-template features, normalised again (as CLIP does).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mcti_jax.tokens import placeholders as tok
from mcti_jax.models.frozen import Frozen


def _normalize(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@functools.partial(jax.jit, static_argnames=("first_id", "pooling"))
def class_text_features(clip: Frozen, tokens, template_ids, *, first_id: int, pooling: str = "eos",
                        shared_ids=None, shared_vectors=None):
  """Normalised text features [K, P] of every class's tokens [K, V, D] in every template [T, L] (class 0 ids),
  or in per-class templates [K, T, L] (classes with different numbers of vectors: `tok.template_ids`).

  `shared_ids` [M] / `shared_vectors` [M, D] are spliced into every prompt too
  (CoOp's context vectors).
  """
  num_classes, num_vectors = tokens.shape[:2]
  model = clip.module
  table = model.text_model.embeddings.token_embedding.embedding[...]
  if shared_ids is None:
    shared_ids, shared_vectors = jnp.full((1,), -1, jnp.int32), jnp.zeros((1, tokens.shape[-1]), tokens.dtype)
  per_class = template_ids.ndim == 3
  if per_class and template_ids.shape[0] != num_classes:
    raise ValueError(f"per-class template ids {template_ids.shape} do not match the tokens' {num_classes} classes")

  def one_class(vectors, k, class_templates):
    ids = tok.ids_for_class(class_templates, first_id, num_vectors, k)
    placeholder_ids = jnp.concatenate([shared_ids, first_id + k * num_vectors + jnp.arange(num_vectors)])
    embeds = tok.splice(table, ids, placeholder_ids, jnp.concatenate([shared_vectors, vectors]))
    features = model.get_text_features(ids, inputs_embeds=embeds, pooling=pooling)
    return _normalize(_normalize(features).mean(0))

  return jax.vmap(one_class, in_axes=(0, 0, 0 if per_class else None))(tokens, jnp.arange(num_classes), template_ids)


def cosine_scores(image_features, text_features):
  """cos(f_i, g_k) [N, K]; argmax over k is the prediction."""
  return _normalize(image_features) @ _normalize(text_features).T


# The three templates of MC-TI's classification study.
TEMPLATES = {"T1": "a photo of a {}", "T2": "a photo of the nice {}", "T3": "a cropped photo of the {}"}


def name_text_features(clip: Frozen, tokenizer, class_names, templates) -> jax.Array:
  """Zero-shot text features [K, P] from class names (the semantic-aware reference), prompt-ensembled."""
  from mcti_jax.models import tokenizer as tokenizer_lib
  ids = [tokenizer_lib.encode(tokenizer, [t.format(name) for t in templates]) for name in class_names]
  return _name_features(clip, jnp.asarray(np.stack(ids)))


@jax.jit
def _name_features(clip: Frozen, ids):  # ids [K, T, L]
  model = clip.module
  features = jax.vmap(lambda class_ids: _normalize(model.get_text_features(class_ids)).mean(0))(ids)
  return _normalize(features)


def prototype_features(shot_features) -> jax.Array:
  """CLIP-feat: the mean of a class's normalised shot features [K, N, P] -> [K, P]."""
  return _normalize(_normalize(jnp.asarray(shot_features)).mean(1))


def image_features(clip: Frozen, labeled, resolution: int, mesh, batch_size: int = 64,
                   progress: bool = True) -> np.ndarray:
  """CLIP image features [M, P] of every image of `labeled`, batches sharded over the mesh.

  Every batch is padded to `batch_size` (a multiple of the device count), so
  one program serves the whole split.
  """
  from mcti_jax.runtime import parallel
  if len(labeled) == 0:
    raise ValueError(f"{labeled.source} holds no images to evaluate on; check the test split")
  n = mesh.devices.size
  batch_size = -(-batch_size // n) * n
  encode = jax.jit(encode_images, out_shardings=parallel.replicated(mesh))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.CLASS_AXIS))
  out = []
  batches = labeled.batches(resolution, batch_size)
  if progress:
    from tqdm.auto import tqdm
    batches = tqdm(batches, total=-(-len(labeled) // batch_size), desc="CLIP image features", unit="batch")
  for images, _, _ in batches:
    padded = np.concatenate([images, np.repeat(images[:1], batch_size - len(images), 0)])
    out.append(np.asarray(encode(clip, jax.device_put(padded, sharding)))[: len(images)])
  return np.concatenate(out)


def encode_images(clip: Frozen, images):
  """uint8 images [B, H, W, 3] -> CLIP image features [B, P] (not normalised); jit it."""
  from mcti_jax.models import clip as clip_lib
  return clip_lib.image_features(clip.module, images)


def save_linear_head(folder, text_features, class_names, info: dict | None = None):
  """The K text features as a plain linear classifier: logits = normalize(f) @ weight.T (safetensors + names)."""
  from mcti_jax.models import hf_io
  weight = np.asarray(_normalize(jnp.asarray(text_features)), np.float32)
  hf_io.write_folder(folder, {"linear_head.safetensors": hf_io.tensors({"weight": weight}),
                              "classes.json": {"class_names": list(class_names), **(info or {})}})
