"""Class tokens: placeholder words, prompt templates, initialisation and splicing.

What trains is one array `[K, V, D]`: V vectors of width D for each of K
classes. Class k is written "<cls-k>" in prompts; with V > 1 it expands to
"<cls-k> <cls-k>_1 ... <cls-k>_{V-1}", the naming diffusers'
`load_textual_inversion` uses, so exported tokens mean the same there.

The placeholder ids of all classes are added to the tokenizer in one block,
class after class, so the ids of class k are those of class 0 plus k*V. A
template is tokenized once (with class 0) and shifted per class on device.
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np

# The prompt templates of the Textual Inversion paper (object set).
TI_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
)


def templates(spec: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
  """'ti' -> the TI list; a single string with '{}' -> just that one; a list as it is."""
  if spec == "ti":
    return TI_TEMPLATES
  spec = (spec,) if isinstance(spec, str) else tuple(spec)
  for t in spec:
    if t.count("{}") != 1:
      raise ValueError(f"template {t!r} must hold exactly one '{{}}' where the class token goes")
  return spec


@dataclasses.dataclass(frozen=True)
class ClassTokens:
  """The placeholder words of K classes with V vectors each, and their token ids [K, V]."""
  names: tuple[tuple[str, ...], ...]  # names[k] = ("<cls-k>", "<cls-k>_1", ...)
  ids: np.ndarray  # int32 [K, V], ids[k, v] = ids[0, 0] + k*V + v

  @property
  def num_classes(self) -> int:
    return self.ids.shape[0]

  @property
  def num_vectors(self) -> int:
    return self.ids.shape[1]

  def word(self, k: int) -> str:
    """What to write in a prompt for class k."""
    return " ".join(self.names[k])

  def fill(self, template: str, k: int) -> str:
    return template.format(self.word(k))

  def expand(self, prompt: str) -> str:
    """'a photo of <cls-3>' -> 'a photo of <cls-3> <cls-3>_1 ...' (as diffusers does)."""
    def one(match):
      k = int(match.group(1))
      if not 0 <= k < self.num_classes:
        raise ValueError(f"prompt {prompt!r} names {match.group(0)} but the tokens hold classes 0..{self.num_classes - 1}")
      return self.word(k)
    return re.sub(r"<cls-(\d+)>(?!_)", one, prompt)


def token_names(num_classes: int, num_vectors: int) -> tuple[tuple[str, ...], ...]:
  return tuple(tuple(f"<cls-{k}>" if v == 0 else f"<cls-{k}>_{v}" for v in range(num_vectors))
               for k in range(num_classes))


def add_class_tokens(tokenizer, num_classes: int, num_vectors: int = 1) -> ClassTokens:
  """Add the K*V placeholder words to `tokenizer` (in place) as one contiguous block of ids."""
  from mcti_jax.models import tokenizer as tok
  names = token_names(num_classes, num_vectors)
  ids = np.asarray(tok.add_placeholder_tokens(tokenizer, [n for row in names for n in row]), np.int32)
  ids = ids.reshape(num_classes, num_vectors)
  if not np.array_equal(ids.ravel(), ids[0, 0] + np.arange(ids.size)):
    raise ValueError("placeholder tokens did not get contiguous ids; was the tokenizer already holding some?")
  return ClassTokens(names, ids)


def template_ids(tokenizer, template_list: tuple[str, ...], class_tokens: ClassTokens) -> np.ndarray:
  """Token ids [T, 77] of every template filled with class 0; shift with `ids_for_class`."""
  from mcti_jax.models import tokenizer as tok
  ids = tok.encode(tokenizer, [class_tokens.fill(t, 0) for t in template_list])
  held = np.isin(ids, class_tokens.ids[0]).sum(axis=1)
  if np.any(held != class_tokens.num_vectors):
    bad = template_list[int(np.argmax(held != class_tokens.num_vectors))]
    raise ValueError(f"template {bad!r} does not hold the class token once after tokenization (too long?)")
  return ids


def ids_for_class(ids, class_tokens_first_id: int, num_vectors: int, k):
  """Shift the placeholder ids of class 0 in `ids` to those of class k (k may be traced)."""
  is_placeholder = (ids >= class_tokens_first_id) & (ids < class_tokens_first_id + num_vectors)
  return jnp.where(is_placeholder, ids + k * num_vectors, ids)


def token_table(text_module):
  """The token embedding table [vocab, D] of a CLIP text tower (SD's text encoder or CLIP's)."""
  return text_module.text_model.embeddings.token_embedding.embedding[...]


def splice(embedding_table, ids, placeholder_ids, vectors):
  """Token embeddings of `ids` [..., L] with each placeholder id replaced by its learned vector.

  `placeholder_ids` [P] and `vectors` [P, D] pair up. Ids past the end of the
  frozen table are placeholders by construction; their table row is never used.
  """
  base = jnp.take(embedding_table, jnp.minimum(ids, embedding_table.shape[0] - 1), axis=0)
  match = (ids[..., None] == placeholder_ids).astype(vectors.dtype)  # [..., L, P]
  learned = jnp.einsum("...lp,pd->...ld", match, vectors)
  return jnp.where(match.sum(-1, keepdims=True) > 0, learned.astype(base.dtype), base)


# ---------------------------------------------------------------- initialisation


def init_from_word(tokenizer, embedding_table: np.ndarray, word: str, num_classes: int, num_vectors: int) -> np.ndarray:
  """Every class starts at the embedding of `word` (e.g. 'pet', 'flower'), as in TI."""
  vec = _text_embedding(tokenizer, embedding_table, word)
  return np.broadcast_to(vec, (num_classes, num_vectors, vec.shape[-1])).astype(np.float32).copy()


def init_from_texts(tokenizer, embedding_table: np.ndarray, texts: list[str], num_vectors: int) -> np.ndarray:
  """Class k starts from the words of texts[k] (a label or caption).

  If the text is exactly V tokens, vector v starts at token v; otherwise every
  vector starts at the mean of the text's token embeddings.
  """
  rows = []
  for text in texts:
    token_vecs = _token_embeddings(tokenizer, embedding_table, text)
    rows.append(token_vecs if len(token_vecs) == num_vectors else
                np.repeat(token_vecs.mean(0, keepdims=True), num_vectors, axis=0))
  return np.stack(rows).astype(np.float32)


def init_random(key, embedding_table: np.ndarray, num_classes: int, num_vectors: int) -> np.ndarray:
  """Gaussian with the per-dimension mean and std of the frozen vocabulary."""
  import jax
  table = np.asarray(embedding_table, np.float32)
  noise = np.asarray(jax.random.normal(key, (num_classes, num_vectors, table.shape[1])))
  return (table.mean(0) + table.std(0) * noise).astype(np.float32)


def _token_embeddings(tokenizer, embedding_table, text: str) -> np.ndarray:
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  if not ids:
    raise ValueError(f"initializer text {text!r} has no tokens")
  if max(ids) >= embedding_table.shape[0]:
    raise ValueError(f"initializer text {text!r} holds a placeholder token; use plain words")
  return np.asarray(embedding_table, np.float32)[ids]


def _text_embedding(tokenizer, embedding_table, word: str) -> np.ndarray:
  return _token_embeddings(tokenizer, embedding_table, word).mean(0)
