"""MC-TI + CoOp: context vectors shared by all classes, learned on the shots in front of a phase's tokens."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mcti_jax.classify import clip_head
from mcti_jax.methods import coop


@dataclasses.dataclass(frozen=True)
class Evaluator:
  phase: str = "mcti"
  num_context: int = 16
  steps: int = 200
  lr: float = 2e-3
  logit_scale: float = 100.0
  seed: int = 0

  def run(self, cell, name: str):
    del name
    cfg = coop.CoOpConfig(num_context=self.num_context, steps=self.steps, lr=self.lr, logit_scale=self.logit_scale,
                          seed=self.seed)
    m = cell.models
    tokens = cell.result.tokens[self.phase]
    tokenizer, class_tokens = m.tokens_for(tokens.shape[1], cell.result.vector_counts)
    context_ids = coop.add_context_tokens(tokenizer, cfg.num_context)
    template_ids = jnp.asarray(coop.context_template_ids(tokenizer, class_tokens, cfg.num_context))
    context, _ = coop.train_context(m.clip, tokens, template_ids, context_ids, cell.shot_features,
                                    first_id=m.first_id, pooling=m.pooling, cfg=cfg)
    text = coop.text_features(m.clip, tokens, template_ids, context_ids, context, first_id=m.first_id,
                              pooling=m.pooling)
    return cell.scored(clip_head.cosine_scores(cell.test_features, text))
