"""Composite queries and their CLIP text features: what retrieval ranks with and GAIR refines.

A query is a class token S_k followed by words that qualify it ("a photo of a
<cls-3> with a red collar"). Its feature is the prompt's CLIP text feature, the
class token spliced into CLIP's text tower; `mix` moves the class prompt's
feature towards the composite's. Below both retrieve.py and gair.py.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mcti_jax.tokens import conditioning
from mcti_jax.tokens import placeholders as tok
from mcti_jax.errors import ConfigError
from mcti_jax.models.frozen import Frozen

_CLASS_TOKEN = re.compile(r"<cls-(\d+)>(?!_)")


# ------------------------------------------------------------------ queries


@dataclasses.dataclass(frozen=True)
class Query:
  """A composite prompt: `class_prompt` (up to and including the class token) then `words` that qualify it."""
  prompt: str
  class_index: int
  type: str = "query"  # results are reported per type too (the tiny world: the attribute words)
  opposite: str | None = None  # words that deny `words` ("thin" for "bold"); GAIR's attribute judge uses them

  @property
  def class_prompt(self) -> str:
    return self.prompt[:_CLASS_TOKEN.search(self.prompt).end()]

  @property
  def words(self) -> str:
    return self.prompt[_CLASS_TOKEN.search(self.prompt).end():].strip()


def parse_query(prompt: str, type: str = "query", opposite: str | None = None) -> Query:  # noqa: A002
  """A Query from its prompt: one class token, then the words; a ValueError saying how to write it otherwise."""
  if not isinstance(prompt, str):
    raise ValueError(f"a query prompt must be a string, not {prompt!r}")
  found = _CLASS_TOKEN.findall(prompt)
  if len(found) != 1:
    what = "holds no class token" if not found else f"holds {len(found)} class tokens"
    raise ValueError(f"prompt {prompt!r} {what}; a query names one class then qualifies it, e.g. "
                     "'a photo of a <cls-3> with a red collar'")
  query = Query(prompt, int(found[0]), type, opposite)
  if not query.words:
    raise ValueError(f"prompt {prompt!r} has no words after {query.class_prompt.split()[-1]}; write the words that "
                     "qualify the class after its token, e.g. 'a photo of a <cls-3> with a red collar'")
  return query


def check_classes(queries: Sequence[Query], num_classes: int, where: str) -> None:
  """Every query's class must be one the tokens hold."""
  for q in queries:
    if not 0 <= q.class_index < num_classes:
      raise ConfigError(f"{where}: query {q.prompt!r} names <cls-{q.class_index}>, but the tokens hold classes "
                        f"<cls-0>..<cls-{num_classes - 1}>")


# ------------------------------------------------------------------ CLIP text features of prompts


def normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@functools.partial(jax.jit, static_argnames=("pooling",))
def _text_features(clip: Frozen, ids, placeholder_ids, vectors, pooling: str):
  model = clip.module
  embeds = tok.splice(tok.token_table(model), ids, placeholder_ids, vectors)
  features = model.get_text_features(ids, inputs_embeds=embeds, pooling=pooling)
  return features / jnp.linalg.norm(features, axis=-1, keepdims=True)


def prompt_features(clip: Frozen, tokenizer, prompts: Sequence[str], learned=None, pooling: str = "eos",
                    batch_size: int = 256) -> np.ndarray:
  """Normalised CLIP text features [len(prompts), P] of prompts that may hold class tokens (<cls-k>).

  The tokens are spliced into CLIP's text tower, as `clip_head.class_text_features`
  does for one template; here every prompt is its own.
  """
  ids = conditioning.tokenize(tokenizer, list(prompts), learned)
  if learned is None:
    width = clip.module.text_model.config.hidden_size
    placeholder_ids, vectors = np.asarray([-1], np.int32), np.zeros((1, width), np.float32)
  else:
    placeholder_ids, vectors = learned.placeholder_ids, learned.flat_vectors
  out = []
  for start in range(0, len(ids), batch_size):  # padded to one shape: one compile
    chunk = ids[start:start + batch_size]
    padded = np.concatenate([chunk, np.repeat(chunk[:1], min(batch_size, len(ids)) - len(chunk), 0)])
    out.append(np.asarray(_text_features(clip, jnp.asarray(padded), jnp.asarray(placeholder_ids),
                                         jnp.asarray(vectors), pooling))[:len(chunk)])
  return np.concatenate(out)


def mix(class_features, composite_features, lam) -> np.ndarray:
  """q(lam) = normalize(g_c + lam (g_cw - g_c)): the class prompt's feature moved towards the composite's.

  lam 0 is the class prompt alone, 1 the composite prompt, above 1 beyond it;
  the CLIP-feature twin of GAIR's text-encoder interpolation. lam is a scalar
  or one per query [Q].
  """
  g_c, g_cw = normalize(np.asarray(class_features)), normalize(np.asarray(composite_features))
  lam = np.asarray(lam, np.float32).reshape(-1, 1) if np.ndim(lam) else np.float32(lam)
  return normalize(g_c + lam * (g_cw - g_c))


def fixed_queries(clip: Frozen, tokenizer, queries: Sequence[Query], learned, lams: Sequence[float],
                  pooling: str = "eos") -> dict[str, np.ndarray]:
  """The baselines: {"composite": the prompt's own feature, "lam=<l>": q(l) for each l} -> features [Q, P]."""
  composite = prompt_features(clip, tokenizer, [q.prompt for q in queries], learned, pooling)
  class_only = prompt_features(clip, tokenizer, [q.class_prompt for q in queries], learned, pooling)
  out = {"composite": composite}
  for lam in lams:
    out[f"lam={lam:g}"] = mix(class_only, composite, lam)
  return out
