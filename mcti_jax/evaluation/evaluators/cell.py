"""What the evaluators of one (N-shot, seed) cell share: the models, the run's result, the test images."""

from __future__ import annotations

import copy
import dataclasses
from functools import cached_property
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mcti_jax.runtime import parallel
from mcti_jax.tokens import placeholders as tok
from mcti_jax.classify import clip_head
from mcti_jax.models import pipeline
from mcti_jax.models.frozen import Frozen, freeze


@dataclasses.dataclass
class Models:
  """Stable Diffusion and CLIP, loaded once for a whole evaluation; the class tokens added to SD's tokenizer.

  `class_tokens` has tokens.num_vectors vectors per class. A run whose classes use V_k vectors of a padded V
  (label/caption inits: V varies from run to run) gets its own tokenizer and ClassTokens from `tokens_for`.
  """
  sd: pipeline.StableDiffusion
  clip: Frozen
  class_tokens: tok.ClassTokens
  mesh: jax.sharding.Mesh
  pooling: str
  base_tokenizer: object = None  # SD's tokenizer without class tokens, for other layouts
  _layouts: dict = dataclasses.field(default_factory=dict, repr=False)

  @classmethod
  def load(cls, train_config, num_classes: int, log=print) -> "Models":
    m = train_config.model
    log(f"loading Stable Diffusion from {m.sd_path} and CLIP from {m.clip_path} for evaluation")
    sd = pipeline.load_stable_diffusion(m.sd_path, dtype=m.dtype)
    clip_model, _ = pipeline.load_clip(m.clip_path, dtype=m.dtype)
    base = copy.deepcopy(sd.tokenizer)
    class_tokens = tok.add_class_tokens(sd.tokenizer, num_classes, train_config.tokens.num_vectors)
    return cls(sd, freeze(clip_model), class_tokens, parallel.make_mesh(train_config.num_devices), m.pooling, base)

  @property
  def first_id(self) -> int:
    return int(self.class_tokens.ids[0, 0])

  def tokens_for(self, num_vectors: int, counts=None) -> tuple[object, tok.ClassTokens]:
    """(a tokenizer holding the K classes' placeholders with `num_vectors` each, their ClassTokens with `counts`)."""
    if num_vectors == self.class_tokens.num_vectors:
      return self.sd.tokenizer, dataclasses.replace(self.class_tokens, counts=counts)
    if num_vectors not in self._layouts:
      if self.base_tokenizer is None:
        raise ValueError(f"these Models hold class tokens of {self.class_tokens.num_vectors} vectors, not "
                         f"{num_vectors}, and no base tokenizer to add others to; load them with Models.load")
      tokenizer = copy.deepcopy(self.base_tokenizer)
      self._layouts[num_vectors] = tokenizer, tok.add_class_tokens(tokenizer, self.class_tokens.num_classes,
                                                                   num_vectors)
    tokenizer, class_tokens = self._layouts[num_vectors]
    return tokenizer, dataclasses.replace(class_tokens, counts=counts)

  def template_ids(self, templates: tuple[str, ...], num_vectors: int | None = None, counts=None) -> jax.Array:
    """[T, L] ids of `templates` (class 0's), or [K, T, L] when `counts` [K] of `num_vectors` vary per class."""
    tokenizer, class_tokens = self.tokens_for(num_vectors or self.class_tokens.num_vectors, counts)
    return jnp.asarray(tok.template_ids(tokenizer, templates, class_tokens))

  def token_text_features(self, tokens, templates: tuple[str, ...], counts=None) -> jax.Array:
    """The CLIP text features [K, P] of every class's tokens [K, V, D], averaged over `templates` (eq. 6); class k's
    prompts hold its first counts[k] vectors (default: all V)."""
    tokens = jnp.asarray(tokens)
    return clip_head.class_text_features(self.clip, tokens, self.template_ids(templates, tokens.shape[1], counts),
                                         first_id=self.first_id, pooling=self.pooling)


@dataclasses.dataclass
class Cell:
  models: Models
  result: object  # train.TrainResult
  train_config: object  # the cell's training config (mcti_jax/configs/mcti.py)
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
    if shots.num_classes != self.result.num_classes:  # several processes: each holds its own classes' images
      raise ValueError("this evaluator needs every class's shot features, but no training phase used CLIP and this "
                       "process holds only its own classes' shots; run it in one process (without --distributed)")
    encode = jax.jit(clip_head.encode_images)
    parts = []
    for rows, pixels in shots.chunks():  # a chunk of classes at a time: the trainer keeps no pixels
      features = encode(self.models.clip, pixels.reshape(-1, *pixels.shape[2:]))
      parts.append(np.asarray(features).reshape(len(rows), shots.num_shots, -1))
    return np.concatenate(parts)

  def token_text_features(self, phase: str, templates: tuple[str, ...]) -> jax.Array:
    """The CLIP text features [K, P] of a phase's tokens, each class's prompts holding its own V_k vectors."""
    return self.models.token_text_features(self.result.tokens[phase], templates, self.result.vector_counts)

  def learned_tokens(self, phase: str):
    """A phase's tokens as `conditioning.LearnedTokens`, and the tokenizer that knows their placeholders."""
    from mcti_jax.tokens import conditioning
    tokens = self.result.tokens[phase]
    tokenizer, class_tokens = self.models.tokens_for(tokens.shape[1], self.result.vector_counts)
    return conditioning.LearnedTokens(class_tokens, tokens, tuple(self.result.class_names)), tokenizer

  @property
  def name(self) -> str:
    return f"{self.n_shots}shot_seed{self.seed}"

  def scored(self, scores) -> tuple[np.ndarray, np.ndarray, dict]:
    return np.asarray(scores), self.test.labels, {}
