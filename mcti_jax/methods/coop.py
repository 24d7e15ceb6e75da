"""MC-TI + CoOp: M shared context vectors in front of the class tokens.

The prompt of class k is "<ctx-0> ... <ctx-{M-1}> <cls-k>"; the context is
shared by all classes and trained with CLIP's cross-entropy (logit scale 100,
as CoOp) on the cached CLIP image features of the shots. The class tokens stay
as MC-TI learned them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mcti_jax.tokens import placeholders as tok
from mcti_jax.classify import clip_head
from mcti_jax.models import tokenizer as tokenizer_lib
from mcti_jax.models.frozen import Frozen


@dataclasses.dataclass(frozen=True)
class CoOpConfig:
  num_context: int = 16
  steps: int = 200
  lr: float = 2e-3
  logit_scale: float = 100.0
  seed: int = 0


def add_context_tokens(tokenizer, num_context: int) -> np.ndarray:
  """Add "<ctx-0>".."<ctx-{M-1}>" to the tokenizer (those it does not hold yet); their ids [M]."""
  names = [f"<ctx-{i}>" for i in range(num_context)]
  vocab = tokenizer.get_vocab()
  missing = [n for n in names if n not in vocab]
  if missing:
    tokenizer_lib.add_placeholder_tokens(tokenizer, missing)
    vocab = tokenizer.get_vocab()
  return np.asarray([vocab[n] for n in names], np.int32)


def context_template_ids(tokenizer, class_tokens: tok.ClassTokens, num_context: int) -> np.ndarray:
  template = " ".join(f"<ctx-{i}>" for i in range(num_context)) + " {}"
  return tok.template_ids(tokenizer, (template,), class_tokens)


def train_context(clip: Frozen, tokens, template_ids, context_ids, shot_features, *, first_id: int,
                  pooling: str, cfg: CoOpConfig) -> tuple[np.ndarray, list[float]]:
  """The context vectors [M, D] after `cfg.steps` full-batch AdamW steps, and the loss curve.

  shot_features [K, N, P] are the cached CLIP image features of the shots.
  """
  tokens = jnp.asarray(tokens)
  num_classes, num_shots = shot_features.shape[:2]
  features = jnp.asarray(shot_features).reshape(num_classes * num_shots, -1)
  features = features / jnp.linalg.norm(features, axis=-1, keepdims=True)
  labels = jnp.repeat(jnp.arange(num_classes), num_shots)
  width = tokens.shape[-1]
  context = 0.02 * jax.random.normal(jax.random.PRNGKey(cfg.seed), (len(context_ids), width))
  optimizer = optax.adamw(cfg.lr)

  def loss_fn(context):
    text = clip_head.class_text_features(clip, tokens, template_ids, first_id=first_id, pooling=pooling,
                                         shared_ids=jnp.asarray(context_ids), shared_vectors=context)
    logits = cfg.logit_scale * features @ text.T
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(context, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(context)
    updates, opt_state = optimizer.update(grads, opt_state, context)
    return optax.apply_updates(context, updates), opt_state, loss

  opt_state, losses = optimizer.init(context), []
  for _ in range(cfg.steps):
    context, opt_state, loss = step(context, opt_state)
    losses.append(float(loss))
  return np.asarray(context), losses


def text_features(clip: Frozen, tokens, template_ids, context_ids, context, *, first_id: int, pooling: str):
  return clip_head.class_text_features(clip, jnp.asarray(tokens), template_ids, first_id=first_id, pooling=pooling,
                                       shared_ids=jnp.asarray(context_ids), shared_vectors=jnp.asarray(context))
