"""Class tokens: placeholder words, prompt templates and splicing (where they start: training/token_init.py).

What trains is one array `[K, V, D]`: V vectors of width D for each of K
classes. Class k is written "<cls-k>" in prompts; with V > 1 it expands to
"<cls-k> <cls-k>_1 ... <cls-k>_{V-1}", the naming diffusers'
`load_textual_inversion` uses, so exported tokens mean the same there.

Classes may use fewer vectors than V (`ClassTokens.counts`: class k uses
its first V_k, e.g. as many as the tokens of the caption it starts from);
its prompts then hold V_k placeholders and its other vectors are never read.
The array stays [K, V, D] with V = max V_k, so one compiled step trains all.

The placeholder ids of all classes are added to the tokenizer in one block,
class after class, so the ids of class k are those of class 0 plus k*V. A
template is tokenized once (with class 0) and shifted per class on device;
with per-class counts once per class, with class 0's first V_k names.
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
  """The placeholder words of K classes with V vectors each, their token ids [K, V], and how many each uses."""
  names: tuple[tuple[str, ...], ...]  # names[k] = ("<cls-k>", "<cls-k>_1", ...)
  ids: np.ndarray  # int32 [K, V], ids[k, v] = ids[0, 0] + k*V + v
  counts: np.ndarray | None = None  # int32 [K]: class k uses its first V_k vectors (default: all V)
  init_texts: tuple[str, ...] | None = None  # the label or caption each class started from, for the export

  def __post_init__(self):
    counts = np.full(self.num_classes, self.num_vectors, np.int32) if self.counts is None else np.asarray(
        self.counts, np.int32)
    if counts.shape != (self.num_classes,) or np.any(counts < 1) or np.any(counts > self.num_vectors):
      raise ValueError(f"counts {counts.tolist()} must give 1..{self.num_vectors} vectors for each of the "
                       f"{self.num_classes} classes")
    object.__setattr__(self, "counts", counts)

  @property
  def num_classes(self) -> int:
    return self.ids.shape[0]

  @property
  def num_vectors(self) -> int:
    """V: the vectors per class in the token array (the largest V_k)."""
    return self.ids.shape[1]

  @property
  def uniform(self) -> bool:
    """Every class uses all V vectors (one template tokenization serves all classes)."""
    return bool(np.all(self.counts == self.num_vectors))

  @property
  def vector_valid(self) -> np.ndarray:
    """bool [K, V]: the vectors class k uses; the others never reach a prompt and must not move."""
    return np.arange(self.num_vectors)[None, :] < self.counts[:, None]

  def word(self, k: int) -> str:
    """What to write in a prompt for class k: its first V_k placeholder words."""
    return " ".join(self.names[k][: self.counts[k]])

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


def add_class_tokens(tokenizer, num_classes: int, num_vectors: int = 1, counts=None,
                     init_texts: tuple[str, ...] | None = None) -> ClassTokens:
  """Add the K*V placeholder words to `tokenizer` (in place) as one contiguous block of ids.

  `counts` [K] (default all V): class k's prompts hold only its first counts[k] words.
  """
  from mcti_jax.models import tokenizer as tokenizer_lib
  names = token_names(num_classes, num_vectors)
  ids = np.asarray(tokenizer_lib.add_placeholder_tokens(tokenizer, [n for row in names for n in row]), np.int32)
  ids = ids.reshape(num_classes, num_vectors)
  if not np.array_equal(ids.ravel(), ids[0, 0] + np.arange(ids.size)):
    raise ValueError("placeholder tokens did not get contiguous ids; was the tokenizer already holding some?")
  return ClassTokens(names, ids, counts, init_texts)


def template_ids(tokenizer, template_list: tuple[str, ...], class_tokens: ClassTokens) -> np.ndarray:
  """Token ids [T, 77] of every template filled with class 0; shift with `ids_for_class`.

  When classes use different numbers of vectors, [K, T, 77]: row k holds V_k placeholders (see
  `class_template_ids`).
  """
  if class_tokens.uniform:
    return class_template_ids(tokenizer, template_list, class_tokens, 0)
  by_count = {int(n): class_template_ids(tokenizer, template_list, class_tokens, k)
              for k, n in reversed(list(enumerate(class_tokens.counts)))}
  return np.stack([by_count[int(n)] for n in class_tokens.counts])


def class_template_ids(tokenizer, template_list: tuple[str, ...], class_tokens: ClassTokens, k: int) -> np.ndarray:
  """Token ids [T, 77] of the templates holding class k's V_k placeholders, written with class 0's ids (so that
  `ids_for_class(..., k)` makes them class k's)."""
  from mcti_jax.models import tokenizer as tokenizer_lib
  count = int(class_tokens.counts[k])
  word = " ".join(class_tokens.names[0][:count])
  ids = tokenizer_lib.encode(tokenizer, [t.format(word) for t in template_list])
  held = np.isin(ids, class_tokens.ids[0]).sum(axis=1)
  if np.any(held != count):
    bad = template_list[int(np.argmax(held != count))]
    raise ValueError(f"template {bad!r} does not hold class {k}'s {count} placeholder(s) after tokenization: "
                     f"{int(held.min())} fit in 77 tokens; shorten the template or use fewer vectors")
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
