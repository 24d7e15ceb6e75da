"""pooling="eos" on checkpoints whose vocabulary was resized for an added token, as diffusers' TI saves them.

The config keeps the legacy eos_token_id 2 and <|endoftext|> keeps its id, so
vocab_size - 1 is the placeholder, not EOS: only the tokenizer says where EOS is.
transformers (the oracle) pools such a config at argmax = the placeholder; we
compare with its hidden state at the real EOS.
"""

import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

from conftest import max_abs_diff
from mcti_jax.errors import MctiError
from mcti_jax.models import clip, frozen, hf_io, pipeline, tokenizer as tokenizer_lib

PLACEHOLDER = "<cat-0>"
PROMPT = f"a photo of {PLACEHOLDER}"
LEGACY = dict(bos_token_id=0, pad_token_id=1, eos_token_id=2)  # SD 1.x's text_encoder config
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=tokenizer_lib.MAX_LENGTH, **LEGACY)  # width 32 = the tiny UNet's cross-attention
TOL = 1e-4


def _tokenizer_with_placeholder(folder):
  """A tiny CLIP tokenizer (EOS last) with one added token after EOS, as TI adds its placeholder."""
  tokenizer_lib.write_tokenizer_folder(folder, ["a photo of"])
  tokenizer = tokenizer_lib.load_tokenizer(folder)
  base_size = len(tokenizer)
  tokenizer.add_tokens([PLACEHOLDER])
  assert tokenizer.eos_token_id == base_size - 1 and tokenizer.convert_tokens_to_ids(PLACEHOLDER) == base_size
  return tokenizer, base_size


@pytest.fixture(scope="module")
def resized(tmp_path_factory):
  """<root>/text_encoder + <root>/tokenizer (as in a pipeline) and <root>/clip, all saved by transformers."""
  root = tmp_path_factory.mktemp("resized")
  tokenizer, base_size = _tokenizer_with_placeholder(root / "tokenizer")
  tokenizer.save_pretrained(str(root / "tokenizer"))
  torch.manual_seed(0)
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(vocab_size=base_size, **TEXT)).eval()
  text.resize_token_embeddings(len(tokenizer))  # what textual_inversion.py does
  text.save_pretrained(root / "text_encoder")
  # transformers cannot resize a CLIPModel's embedding, so this one is built at the grown size.
  full = transformers.CLIPModel(transformers.CLIPConfig(
      text_config=dict(vocab_size=len(tokenizer), **TEXT), projection_dim=16,
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         image_size=8, patch_size=4))).eval()
  full.save_pretrained(root / "clip")
  tokenizer.save_pretrained(str(root / "clip"))
  for folder in (root / "text_encoder", root / "clip"):
    config = hf_io.read_config(folder)
    saved = config.get("text_config", config)
    assert saved["eos_token_id"] == 2 and saved["vocab_size"] == len(tokenizer)
  ids = tokenizer_lib.encode(tokenizer, [PROMPT, "a photo"])
  return root, text, full, ids


def _positions(ids, tokenizer_folder):
  """(first EOS, first placeholder) per row, from the tokenizer; the placeholder is the largest id."""
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_folder)
  eos = np.argmax(ids == tokenizer.eos_token_id, axis=-1)
  placeholder = np.argmax(ids, axis=-1)
  assert ids[0, placeholder[0]] == tokenizer.convert_tokens_to_ids(PLACEHOLDER) and placeholder[0] != eos[0]
  return eos


def _hidden_at(last_hidden_state, positions):
  return np.asarray(last_hidden_state)[np.arange(len(positions)), positions]


def test_pipeline_text_encoder_pools_at_the_tokenizers_eos(resized, tiny_checkpoint, tmp_path):
  root, text, _, ids = resized
  folder = tmp_path / "sd"
  shutil.copytree(tiny_checkpoint / "sd", folder)
  for part in ("text_encoder", "tokenizer"):
    shutil.rmtree(folder / part)
    shutil.copytree(root / part, folder / part)
  sd = pipeline.load_stable_diffusion(folder)
  eos = _positions(ids, folder / "tokenizer")
  with torch.no_grad():
    theirs = text(input_ids=torch.from_numpy(ids.astype(np.int64)))
  want = _hidden_at(theirs.last_hidden_state, eos)
  assert max_abs_diff(_hidden_at(theirs.last_hidden_state, np.argmax(ids, -1))[0], theirs.pooler_output[0]) <= TOL

  # Frozen and jitted, as training calls it: the id lives in the graphdef.
  hidden, pooled = jax.jit(lambda text_encoder, ids: text_encoder.module(ids))(frozen.freeze(sd.text_encoder), ids)
  assert max_abs_diff(hidden, theirs.last_hidden_state) <= TOL
  assert max_abs_diff(pooled, want) <= TOL
  assert max_abs_diff(pooled[0], theirs.pooler_output[0]) > 1e-2  # argmax pools at the placeholder


def test_clip_folder_pools_at_the_tokenizers_eos(resized):
  root, _, full, ids = resized
  model, _ = pipeline.load_clip(root / "clip")
  eos = _positions(ids, root / "clip")
  with torch.no_grad():
    theirs = full.text_model(input_ids=torch.from_numpy(ids.astype(np.int64)))
    want = full.text_projection(theirs.last_hidden_state[np.arange(len(eos)), eos]).numpy()
  assert max_abs_diff(model.get_text_features(ids), want) <= TOL
  assert max_abs_diff(model.get_text_features(ids, pooling="argmax")[0], want[0]) > 1e-2


def test_legacy_config_without_tokenizer_asks_for_it(resized):
  root, _, _, ids = resized
  model = clip.text_from_pretrained(root / "text_encoder")
  with pytest.raises(MctiError, match="tokenizer") as error:
    model(ids)
  assert isinstance(error.value, hf_io.CheckpointError) and "load_stable_diffusion" in str(error.value)
  model(ids, pooling="argmax")  # the legacy rule needs no id
  eos = _positions(ids, root / "tokenizer")
  hidden, pooled = model(ids, eos_token_id=tokenizer_lib.load_tokenizer(root / "tokenizer").eos_token_id)
  assert max_abs_diff(pooled, _hidden_at(hidden, eos)) == 0
  with pytest.raises(hf_io.CheckpointError, match="eos_token_id=tokenizer.eos_token_id"):
    clip.from_pretrained(root / "clip").get_text_features(ids)


def test_the_tokenizers_eos_wins_over_the_config():
  legacy, real = clip.CLIPTextConfig(eos_token_id=2), clip.CLIPTextConfig(eos_token_id=49407)
  assert clip.pooling_eos_token_id(legacy) is None and clip.pooling_eos_token_id(legacy, 49407) == 49407
  assert clip.pooling_eos_token_id(real) == 49407 and clip.pooling_eos_token_id(real, 99) == 99
