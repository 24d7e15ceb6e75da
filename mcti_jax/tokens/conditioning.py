"""Prompts -> text-encoder hidden states, with learned class tokens spliced in.

Used wherever a prompt conditions the UNet or gives a CLIP text feature
outside training: the Diffusion Classifier, generation, evaluation.

  learned = LearnedTokens.from_export(export_folder, tokenizer, text_width)
  context = encode_prompts(freeze(sd.text_encoder), sd.tokenizer, ["a photo of a <cls-3>"], learned)
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from mcti_jax.tokens import export
from mcti_jax.tokens import placeholders as tok
from mcti_jax.models import tokenizer as tokenizer_lib
from mcti_jax.models.frozen import Frozen

_CLASS_TOKEN = re.compile(r"<cls-\d+>")


@dataclasses.dataclass(frozen=True)
class LearnedTokens:
  """Class tokens known to a tokenizer, and their vectors [K, V, D] (class k's prompts hold its first V_k)."""
  class_tokens: tok.ClassTokens
  vectors: np.ndarray
  class_names: tuple[str, ...]

  @classmethod
  def from_export(cls, folder, tokenizer, text_width: int) -> "LearnedTokens":
    """Load `mcti train`'s export and add its tokens to `tokenizer` (in place)."""
    vectors, manifest = export.load_tokens(folder, expected_width=text_width)
    class_tokens = tok.add_class_tokens(tokenizer, vectors.shape[0], vectors.shape[1],
                                        export.vector_counts(manifest, vectors))
    return cls(class_tokens, vectors, tuple(c["name"] for c in manifest["classes"]))

  @property
  def placeholder_ids(self) -> np.ndarray:
    return self.class_tokens.ids.ravel()

  @property
  def flat_vectors(self) -> np.ndarray:
    return self.vectors.reshape(-1, self.vectors.shape[-1])


def tokenize(tokenizer, prompts: list[str], learned: LearnedTokens | None = None,
             require_class_token: bool = False) -> np.ndarray:
  """Token ids [B, 77]; '<cls-k>' expands to its V placeholder words."""
  out = []
  for prompt in prompts:
    has_token = bool(_CLASS_TOKEN.search(prompt))
    if require_class_token and not has_token:
      raise ValueError(f"prompt {prompt!r} holds no class token; write e.g. 'a photo of a <cls-3>'")
    if has_token and learned is None:
      raise ValueError(f"prompt {prompt!r} names a class token but no learned tokens were loaded (--tokens)")
    out.append(learned.class_tokens.expand(prompt) if has_token else prompt)
  return tokenizer_lib.encode(tokenizer, out)


@functools.partial(jax.jit, static_argnames=("pooling",))
def _encode(text_encoder: Frozen, ids, placeholder_ids, vectors, pooling: str):
  model = text_encoder.module
  table = model.text_model.embeddings.token_embedding.embedding[...]
  embeds = tok.splice(table, ids, placeholder_ids, vectors)
  return model(ids, inputs_embeds=embeds, pooling=pooling)


def encode_prompts(text_encoder: Frozen, tokenizer, prompts: list[str], learned: LearnedTokens | None = None,
                   pooling: str = "eos") -> tuple[jax.Array, jax.Array]:
  """(last hidden states [B, 77, D], pooled [B, D]) of the prompts."""
  ids = jnp.asarray(tokenize(tokenizer, prompts, learned))
  if learned is None:  # nothing to splice: one dummy id that never occurs
    placeholder_ids = jnp.asarray([-1], jnp.int32)
    width = text_encoder.module.text_model.config.hidden_size
    vectors = jnp.zeros((1, width), jnp.float32)
  else:
    placeholder_ids, vectors = jnp.asarray(learned.placeholder_ids), jnp.asarray(learned.flat_vectors)
  return _encode(text_encoder, ids, placeholder_ids, vectors, pooling)
