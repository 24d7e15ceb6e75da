"""CLIP zero-shot as a classifier: logits = exp(logit_scale) * cos(image feature, text feature of each class).

The text features are computed once at load (`clip_head.name_text_features`,
prompt-ensembled over the templates); what runs per image is CLIP's vision
tower and projection only, so the params hold no text tower. The input
transform is `clip.preprocess` as a `Transform` (bicubic resize of the
shorter side to the tower's image_size, center crop, OpenAI mean/std).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mcti_jax.guides import Classifier, Transform, module_tensors, refuse_nonfinite, resolve_templates
from mcti_jax.classify import clip_head
from mcti_jax.errors import ConfigError
from mcti_jax.models import clip as clip_lib
from mcti_jax.models import pipeline
from mcti_jax.models.frozen import freeze


def clip_transform(model: clip_lib.CLIPModel) -> Transform:
  """`clip.preprocess(images, image_size)` as a Transform."""
  s = model.config.vision_config.image_size
  return Transform(resize=s, crop=(s, s), method="bicubic", mean=clip_lib.OPENAI_CLIP_MEAN,
                   std=clip_lib.OPENAI_CLIP_STD)


def clip_logits(params, x: jax.Array) -> jax.Array:
  """CLIP input [B, S, S, 3] -> exp(logit_scale) * cos(image feature, text_features) [B, K] (float32)."""
  _, pooled = params["vision"].module(x)
  image = params["projection"].module(pooled).astype(jnp.float32)
  image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
  return jnp.exp(params["logit_scale"].astype(jnp.float32)) * image @ params["text_features"].T


def cosine_classifier(model: clip_lib.CLIPModel, text_features, class_names: Sequence[str]) -> Classifier:
  """A classifier scoring images against `text_features` [K, P] (normalised here) with CLIP's vision tower."""
  text = jnp.asarray(text_features, jnp.float32)
  if text.shape[0] != len(class_names):
    raise ValueError(f"{text.shape[0]} text features for {len(class_names)} class names")
  params = {"vision": freeze(model.vision_model), "projection": freeze(model.visual_projection),
            "logit_scale": jnp.asarray(model.logit_scale[...]),
            "text_features": text / jnp.linalg.norm(text, axis=-1, keepdims=True)}
  return Classifier(params, clip_logits, clip_transform(model), tuple(class_names))


def load(clip_path: str, class_names: Sequence[str], template="a photo of a {}", dtype: str = "float32",
         where: str = "classifier") -> Classifier:
  """Zero-shot CLIP from a full CLIP folder; `template` a string, T1-T3, 'ti' or a list (prompt ensemble)."""
  if isinstance(class_names, str) or not class_names or len(set(class_names)) != len(class_names):
    raise ConfigError(f"{where}.class_names={class_names!r}: expected distinct names, e.g. ('cat', 'dog')")
  templates = resolve_templates(template, where)
  model, tokenizer = pipeline.load_clip(clip_path, dtype=dtype)
  refuse_nonfinite(module_tensors(model), f"{where}.clip_path={clip_path}")
  text = clip_head.name_text_features(freeze(model), tokenizer, list(class_names), templates)
  return cosine_classifier(model, text, class_names)
