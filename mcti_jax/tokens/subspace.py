"""Tokens restricted to the span of chosen words: v = mean + B a, and only a is learned (custom tokens).

Perera et al. keep a custom token in the low-dimensional subspace spanned by
the embeddings of words that suit the super-class ("digit", "bold", "leaning",
...), so that it composes with those words in prompts. Here B [D, r] is an
orthonormal basis of the words' embeddings E [n, D] (from their SVD; r is
E's numerical rank) and `mean` is E's mean, so v = mean + B a lies in span(E)
for every a: the restriction is exact at every step, not a penalty.

A phase with `subspace=True` trains the coordinates a instead of the vectors.
To keep the trainer's one [K, V, D] array, the coordinates are stored
zero-padded to width D: `basis` is [D, D] with its columns past r zero, so
the padded coordinates get a zero gradient and AdamW leaves them at zero
(weight decay then pulls a token towards the words' mean, not towards 0).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct

from mcti_jax.errors import ConfigError


@struct.dataclass
class Subspace:
  mean: jnp.ndarray  # [D] the words' mean embedding: a = 0
  basis: jnp.ndarray  # [D, D] orthonormal columns spanning the words' embeddings, then zero columns
  rank: int = struct.field(pytree_node=False)

  def to_vectors(self, coords):
    """Coordinates [..., D] (zero past `rank`) -> token vectors [..., D] in the span."""
    return self.mean + coords @ self.basis.T

  def to_coords(self, vectors):
    """Token vectors [..., D] -> the coordinates of their projection onto mean + span(B)."""
    return (vectors - self.mean) @ self.basis


def word_ids(tokenizer, words: tuple[str, ...], vocab_size: int) -> np.ndarray:
  """The token id of every word; each must be one token of the frozen vocabulary."""
  if not words:
    raise ConfigError("tokens.subspace_words is empty: a phase with subspace=True needs the words whose span holds "
                      "the tokens (the super-class word plus attribute words, see mcti_jax/configs/custom_tokens.py)")
  ids = []
  for word in words:
    got = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(got) != 1:
      pieces = tokenizer.convert_ids_to_tokens(got)
      raise ConfigError(f"subspace word {word!r} is {len(got)} tokens {pieces}, not one: the subspace is spanned by "
                        "single-token words of the vocabulary. Split it into its words or choose another.")
    if got[0] == tokenizer.unk_token_id or got[0] >= vocab_size:
      raise ConfigError(f"subspace word {word!r} is not in the text encoder's vocabulary; choose another word")
    ids.append(got[0])
  return np.asarray(ids, np.int32)


def from_words(tokenizer, embedding_table, words: tuple[str, ...]) -> Subspace:
  """The subspace spanned by the embeddings of `words` (rows of the frozen `embedding_table` [vocab, D])."""
  table = np.asarray(embedding_table, np.float64)
  embeddings = table[word_ids(tokenizer, tuple(words), table.shape[0])]
  width = table.shape[1]
  _, singular, vt = np.linalg.svd(embeddings, full_matrices=False)
  rank = int(np.sum(singular > singular[0] * 1e-6))
  if rank >= width:
    raise ConfigError(f"the {len(words)} subspace words span all {width} dimensions of the token space, so the "
                      f"restriction restricts nothing; give fewer than {width} words")
  basis = np.zeros((width, width))
  basis[:, :rank] = vt[:rank].T
  return Subspace(mean=jnp.asarray(embeddings.mean(0), jnp.float32), basis=jnp.asarray(basis, jnp.float32), rank=rank)


def residual(vectors, embeddings) -> float:
  """The largest distance of a row of `vectors` [..., D] from span(embeddings [n, D]), in float64 (for checks)."""
  e = np.asarray(embeddings, np.float64)
  v = np.asarray(vectors, np.float64).reshape(-1, e.shape[1])
  coeffs, *_ = np.linalg.lstsq(e.T, v.T, rcond=None)
  return float(np.max(np.linalg.norm(v - (e.T @ coeffs).T, axis=1)))
