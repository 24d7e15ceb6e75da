"""Custom tokens: the subspace is exact at every checkpoint, the alignment term, bad subspace words, preset words."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import set_fields, tiny_train_config
from mcti_jax.tokens import subspace
from mcti_jax.training import train
from mcti_jax.training import setup as setup_lib
from mcti_jax.tokens import placeholders as tok
from mcti_jax.errors import ConfigError
from mcti_jax.methods import custom_tokens, mcti
from mcti_jax.models import tokenizer as tokenizer_lib

TINY_WORDS = ("digit", "thin", "bold", "narrow", "wide", "heavy", "top", "bottom", "left", "right", "leaning")
BPE = Path(__file__).resolve().parents[3] / "shared" / "data" / "bpe_simple_vocab_16e6.txt.gz"


def custom_config(tiny_checkpoint, workdir, **overrides):
  """Custom tokens in the subspace on the random tiny model, 6 steps, a checkpoint every 2."""
  from mcti_jax.configs import custom_tokens as configs
  from mcti_jax import methods
  c = configs.get_config("tiny")
  base = tiny_train_config(tiny_checkpoint, workdir)
  c.model.sd_path, c.model.clip_path = base.model.sd_path, base.model.clip_path
  c.workdir, c.data.cache_dir = str(workdir), base.data.cache_dir
  c.data.num_classes, c.data.n_shots = 3, 2
  c.phases = ("proj",)
  c.phase = {"proj": methods.phase("custom_tokens", steps=6, lr=5e-2, beta=1.0, subspace=True)}
  c.log_every = c.checkpoint_every = 2
  return set_fields(c, overrides)


def embeddings_of(checkpoint, words) -> tuple[np.ndarray, np.ndarray]:
  """(the frozen token table [vocab, D], the rows of `words`), read here from the checkpoint."""
  from mcti_jax.models import pipeline
  tokenizer = tokenizer_lib.load_tokenizer(checkpoint / "sd", "tokenizer")
  table = np.asarray(tok.token_table(pipeline.load_stable_diffusion(checkpoint / "sd").text_encoder))
  return table, table[[tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]]


@pytest.mark.slow
def test_tokens_stay_in_the_span_of_the_words_at_every_checkpoint(tiny_checkpoint, tmp_path):
  """Every checkpoint's coordinates map to vectors within 1e-6 of span(word embeddings) (an independent
  least-squares fit), as do the exported tokens. (Off the span the residual is not small: see the next test.)"""
  config = custom_config(tiny_checkpoint, tmp_path / "run")
  table, embeddings = embeddings_of(tiny_checkpoint, TINY_WORDS)
  span = subspace.from_words(tokenizer_lib.load_tokenizer(tiny_checkpoint / "sd", "tokenizer"), table, TINY_WORDS)
  initial = embeddings_of(tiny_checkpoint, ("digit",))[1]  # the tokens' start, a subspace word
  checkpoints = tmp_path / "run" / "checkpoints"
  seen = {}

  def on_step(step):
    """The proj phase's tokens in each checkpoint: the state's coordinates within the phase (steps 2, 4), its
    final vectors at its end (step 6; the trainer also keeps them there for a next phase)."""
    if (checkpoints / str(step)).is_dir():
      saved = ocp.StandardCheckpointer().restore((checkpoints / str(step) / "default").absolute())
      if step < 6:
        coords = np.asarray(saved["state"]["tokens"])
        assert np.all(coords[..., span.rank:] == 0), f"step {step}: coordinates past the rank moved"
        seen[step] = np.asarray(span.to_vectors(jnp.asarray(coords)))[:3]
      else:
        seen[step] = np.asarray(saved["phase_tokens"])[0, :3]

  result = train.train(config, on_step=on_step, log=lambda _: None)
  assert sorted(seen) == [2, 4, 6]
  for step, vectors in seen.items():
    assert subspace.residual(vectors, embeddings) < 1e-6, step
    assert np.abs(vectors - initial).max() > 1e-3, f"step {step}: the tokens did not train"
  assert subspace.residual(result.tokens["proj"], embeddings) < 1e-6
  assert span.rank == np.linalg.matrix_rank(embeddings)


def test_coordinates_are_the_orthogonal_projection():
  """to_vectors(to_coords(v)) is v's projection onto the words' span (least squares, by hand), and exact for
  vectors in the span."""
  rng = np.random.default_rng(0)
  words = rng.normal(size=(5, 12)).astype(np.float32)

  class Tokenizer:  # ids 0..4 are the five words
    unk_token_id = 99

    def __call__(self, word, add_special_tokens=False):
      return {"input_ids": [int(word)]}

  span = subspace.from_words(Tokenizer(), words, tuple("01234"))
  v = rng.normal(size=(3, 12))
  coeffs, *_ = np.linalg.lstsq(words.T.astype(np.float64), v.T, rcond=None)
  projected = (words.T @ coeffs).T
  np.testing.assert_allclose(np.asarray(span.to_vectors(span.to_coords(jnp.asarray(v, jnp.float32)))), projected,
                             atol=1e-5)
  assert subspace.residual(v, words) > 0.1 and subspace.residual(projected, words) < 1e-6
  inside = rng.normal(size=(2, 5)) @ words
  np.testing.assert_allclose(np.asarray(span.to_vectors(span.to_coords(jnp.asarray(inside, jnp.float32)))), inside,
                             atol=1e-5)
  assert span.rank == 5


def test_alignment_is_the_cross_entropy_over_class_prototypes():
  """The alignment term is CE of s*cos(g, mean normalised shot feature of class j), by hand in numpy."""
  rng = np.random.default_rng(1)
  features = rng.normal(size=(4, 3, 2, 6)).astype(np.float32)  # [K', N, F, P]
  g = rng.normal(size=6).astype(np.float32)
  valid = np.array([True, True, True, False])
  unit = features / np.linalg.norm(features, axis=-1, keepdims=True)
  proto = unit.reshape(4, 6, 6).mean(1)
  logits = 10.0 * (proto / np.linalg.norm(proto, axis=-1, keepdims=True)) @ (g / np.linalg.norm(g))
  logits = logits[:3]
  expected = np.log(np.exp(logits).sum()) - logits[2]
  ce, hit = mcti.reg_loss(jnp.asarray(g), custom_tokens.prototypes(jnp.asarray(features)), 2, jnp.asarray(valid),
                          10.0)
  np.testing.assert_allclose(float(ce), expected, rtol=1e-5)
  assert float(hit) == float(np.argmax(logits) == 2)


@pytest.mark.parametrize("words, message", [
    (("digit", "heavy at the top"), "is 4 tokens"),
    (("digit", "zebra"), "tokens"),  # not a word of the tiny vocabulary: it splits into pieces
    (("digit", "<|endoftext|>"), "not in the text encoder's vocabulary"),
    ((), "is empty"),
])
def test_bad_subspace_words_are_refused_before_the_models_load(tiny_checkpoint, tmp_path, words, message):
  config = custom_config(tiny_checkpoint, tmp_path / "run", **{"tokens.subspace_words": words})
  with pytest.raises(ConfigError, match=message):
    setup_lib.prepare(config, log=lambda _: None)


def test_words_spanning_the_whole_space_are_refused():
  rng = np.random.default_rng(2)

  class Tokenizer:
    unk_token_id = 99

    def __call__(self, word, add_special_tokens=False):
      return {"input_ids": [int(word)]}

  with pytest.raises(ConfigError, match="span all 4 dimensions"):
    subspace.from_words(Tokenizer(), rng.normal(size=(6, 4)), tuple("012345"))


def test_preset_words_are_single_tokens_of_their_vocabularies():
  """Every preset's subspace words are one token of the real CLIP BPE vocabulary (where ../shared has it); the tiny
  preset's are words of the embedded tiny tokenizer."""
  from mcti_jax.configs import custom_tokens as configs
  from mcti_jax.tiny import checkpoints as tiny_checkpoints
  words = {w for name, ws in configs.SUBSPACE_WORDS.items() if name != "tiny" for w in ws}
  tiny_tokenizer = tokenizer_lib.load_tokenizer(Path(configs.mcti.TINY_ASSETS) / "sd", "tokenizer")
  subspace.word_ids(tiny_tokenizer, configs.SUBSPACE_WORDS["tiny"], len(tiny_tokenizer))
  assert set(configs.SUBSPACE_WORDS["tiny"]) <= set(tiny_checkpoints.WORDS)
  if not BPE.is_file():
    pytest.skip(f"{BPE} is absent: the real CLIP vocabulary is not here")
  import tempfile
  with tempfile.TemporaryDirectory() as folder:
    tokenizer_lib.write_tokenizer_from_bpe_gz(folder, BPE)
    real = tokenizer_lib.load_tokenizer(folder)
    subspace.word_ids(real, tuple(sorted(words)), len(real))
