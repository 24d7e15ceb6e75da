"""What the evaluators of one (N-shot, seed) cell share: the models, the run's result, the test images."""

from __future__ import annotations

import dataclasses
from functools import cached_property
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mcti_jax import parallel
from mcti_jax import tokens as tok
from mcti_jax.classify import clip_head
from mcti_jax.models import pipeline
from mcti_jax.models.frozen import Frozen, freeze


@dataclasses.dataclass
class Models:
  """Stable Diffusion and CLIP, loaded once for a whole evaluation; the class tokens added to SD's tokenizer."""
  sd: pipeline.StableDiffusion
  clip: Frozen
  class_tokens: tok.ClassTokens
  mesh: jax.sharding.Mesh
  pooling: str

  @classmethod
  def load(cls, train_config, num_classes: int, log=print) -> "Models":
    m = train_config.model
    log(f"loading Stable Diffusion from {m.sd_path} and CLIP from {m.clip_path} for evaluation")
    sd = pipeline.load_stable_diffusion(m.sd_path, dtype=m.dtype)
    clip_model, _ = pipeline.load_clip(m.clip_path, dtype=m.dtype)
    class_tokens = tok.add_class_tokens(sd.tokenizer, num_classes, train_config.tokens.num_vectors)
    return cls(sd, freeze(clip_model), class_tokens, parallel.make_mesh(train_config.num_devices), m.pooling)

  @property
  def first_id(self) -> int:
    return int(self.class_tokens.ids[0, 0])

  def template_ids(self, templates: tuple[str, ...]) -> jax.Array:
    return jnp.asarray(tok.template_ids(self.sd.tokenizer, templates, self.class_tokens))

  def token_text_features(self, tokens, templates: tuple[str, ...]) -> jax.Array:
    """The CLIP text features [K, P] of every class's tokens, averaged over `templates` (eq. 6)."""
    return clip_head.class_text_features(self.clip, jnp.asarray(tokens), self.template_ids(templates),
                                         first_id=self.first_id, pooling=self.pooling)


@dataclasses.dataclass
class Cell:
  models: Models
  result: object  # train.TrainResult
  train_config: object  # the cell's training config (configs/mcti.py)
  test: object  # data.LabeledImages
  test_features: np.ndarray  # [M, P] CLIP image features of the test images
  out_dir: Path  # the evaluation's workdir
  n_shots: int
  seed: int

  @cached_property
  def shot_features(self) -> np.ndarray:
    """[K, N, P] CLIP image features of the shots: the trainer's, or computed here if no phase needed CLIP."""
    if self.result.shot_features is not None:
      return self.result.shot_features
    shots = self.result.shots
    k, n = shots.shots.shape[:2]
    flat = shots.shots.reshape(k * n, *shots.shots.shape[2:])
    return np.asarray(jax.jit(clip_head.encode_images)(self.models.clip, flat)).reshape(k, n, -1)

  @property
  def name(self) -> str:
    return f"{self.n_shots}shot_seed{self.seed}"

  def scored(self, scores) -> tuple[np.ndarray, np.ndarray, dict]:
    return np.asarray(scores), self.test.labels, {}
