"""The CLIP-token head of learned tokens (MC-TI eq. 6) as a classifier.

An `mcti train` export's tokens are spliced into CLIP's text tower under the
template ("a photo of a <cls-k>"), as `clip_head.class_text_features` does
for the evaluators; logits = exp(logit_scale) * cos with the image feature.
Class names come from the export's manifest, pooling from its run unless
the spec sets it.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp

from mcti_jax.tokens import conditioning
from mcti_jax.tokens import placeholders as tok
from mcti_jax.guides import Classifier, module_tensors, refuse_nonfinite, resolve_templates
from mcti_jax.guides.clip_zeroshot import cosine_classifier
from mcti_jax.classify import clip_head
from mcti_jax.errors import ConfigError, MctiError
from mcti_jax.tokens.export import MANIFEST
from mcti_jax.models import clip as clip_lib
from mcti_jax.models import pipeline
from mcti_jax.models.frozen import freeze


def load(clip_path: str, export: str, template="a photo of a {}", pooling: str | None = None,
         dtype: str = "float32", where: str = "classifier") -> Classifier:
  """The head of the tokens in `export` (a phase folder, e.g. runs/x/export/mcti) on the CLIP at `clip_path`."""
  folder = Path(export).expanduser()
  templates = resolve_templates(template, where)
  model, tokenizer = pipeline.load_clip(clip_path, dtype=dtype)
  refuse_nonfinite(module_tensors(model), f"{where}.clip_path={clip_path}")
  try:
    learned = conditioning.LearnedTokens.from_export(folder, tokenizer, model.config.text_config.hidden_size)
  except MctiError:
    raise
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"{where}.export={str(export)!r}: {e}") from None
  refuse_nonfinite({f"class {k} ({name})": learned.vectors[k] for k, name in enumerate(learned.class_names)},
                   f"{where}.export={str(export)!r} (its tokens)")
  if pooling is None:
    pooling = json.loads((folder / MANIFEST).read_text()).get("pooling", "eos")
  if pooling not in clip_lib.POOLINGS:
    raise ConfigError(f"{where}.pooling={pooling!r}; expected one of {clip_lib.POOLINGS} (see models/clip.py)")
  try:
    ids = tok.template_ids(tokenizer, templates, learned.class_tokens)
  except ValueError as e:
    raise ConfigError(f"{where}.template: {e}") from None
  text = clip_head.class_text_features(freeze(model), jnp.asarray(learned.vectors), jnp.asarray(ids),
                                       first_id=int(learned.class_tokens.ids[0, 0]), pooling=pooling)
  return cosine_classifier(model, text, learned.class_names)

