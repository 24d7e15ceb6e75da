"""The CLIP tokenizer folders we write, loaded by transformers' CLIPTokenizer."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import transformers

from mcti_jax.models import hf_io, tokenizer as tokenizer_lib

REAL_BPE = Path("/work/shared/data/bpe_simple_vocab_16e6.txt.gz")
WORDS = ["a photo of the digit zero", "a photo of the digit one", "a photo of the digit three",
         "a blurry photo of a handwritten number seven"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
  return tokenizer_lib.write_tokenizer_folder(tmp_path_factory.mktemp("tok") / "tokenizer", WORDS)


@pytest.fixture()
def tiny(tiny_folder):
  return tokenizer_lib.load_tokenizer(tiny_folder)


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory):
  if not REAL_BPE.is_file():
    pytest.skip(f"{REAL_BPE} is not available")
  return tokenizer_lib.write_tokenizer_from_bpe_gz(tmp_path_factory.mktemp("real") / "tokenizer", REAL_BPE)


def test_real_bpe_gives_the_real_clip_ids(real_folder):
  t = transformers.CLIPTokenizer.from_pretrained(str(real_folder))
  assert len(t) == 49408
  assert t.eos_token_id == 49407 and t.bos_token_id == 49406
  assert t("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
  vocab = json.loads((real_folder / "vocab.json").read_text())
  assert len(vocab) == 49408 and max(vocab.values()) == 49407


def test_tiny_vocab_has_the_real_layout(tiny_folder, real_folder):
  tiny_vocab = json.loads((tiny_folder / "vocab.json").read_text())
  real_vocab = json.loads((real_folder / "vocab.json").read_text())
  byte_symbols = [t for t, i in sorted(real_vocab.items(), key=lambda kv: kv[1])][:512]
  assert [t for t, i in sorted(tiny_vocab.items(), key=lambda kv: kv[1])][:512] == byte_symbols


def test_tiny_vocab_round_trips_through_transformers(tiny_folder):
  t = transformers.CLIPTokenizer.from_pretrained(str(tiny_folder))
  vocab = t.get_vocab()
  assert len(vocab) < 2000
  assert t.eos_token_id == len(vocab) - 1 and t.bos_token_id == len(vocab) - 2
  for text in WORDS:
    ids = t(text).input_ids
    assert ids[0] == t.bos_token_id and ids[-1] == t.eos_token_id
    assert len(ids) == len(text.split()) + 2  # every word is one token
    assert t.decode(ids, skip_special_tokens=True) == text
  # Words outside the training text still tokenize, into smaller pieces (no unknown token).
  ids = t("Zebra Photos, 42!").input_ids
  assert t.unk_token_id not in ids[1:-1]
  assert t.decode(ids, skip_special_tokens=True) == "zebra photos , 4 2 !"


def test_learned_merges_follow_bpe():
  # 'aab aab ab': the most frequent pair (a, b) is merged first, then (a, ab</w>).
  assert tokenizer_lib.learn_merges(["aab aab ab"])[:2] == [("a", "b</w>"), ("a", "ab</w>")]


def test_placeholder_tokens_get_new_single_ids(tiny):
  eos = tiny.eos_token_id
  ids = tokenizer_lib.add_placeholder_tokens(tiny, ["<digit-3>", "<digit-7>"])
  assert ids == [eos + 1, eos + 2]
  encoded = tiny("a photo of <digit-3>, and<digit-7>.").input_ids
  assert encoded.count(ids[0]) == 1 and encoded.count(ids[1]) == 1
  assert tiny.convert_ids_to_tokens(ids) == ["<digit-3>", "<digit-7>"]
  words = tiny("a photo of the digit").input_ids[1:-1]
  assert tiny("a photo of the digit <digit-3>").input_ids[1:-1] == [*words, ids[0]]


def test_placeholder_errors(tiny):
  for existing in ("photo", "<|endoftext|>", "a"):
    with pytest.raises(ValueError, match="already exists"):
      tokenizer_lib.add_placeholder_tokens(tiny, [existing])
  with pytest.raises(ValueError, match="distinct"):
    tokenizer_lib.add_placeholder_tokens(tiny, ["<x>", "<x>"])
  tokenizer_lib.add_placeholder_tokens(tiny, ["<x>"])
  with pytest.raises(ValueError, match="already exists"):
    tokenizer_lib.add_placeholder_tokens(tiny, ["<x>"])


def test_placeholders_survive_save_and_load(tiny, tmp_path):
  ids = tokenizer_lib.add_placeholder_tokens(tiny, ["<cls-0>", "<cls-1>"])
  tiny.save_pretrained(tmp_path / "saved")
  reloaded = tokenizer_lib.load_tokenizer(tmp_path / "saved")
  assert reloaded.convert_tokens_to_ids(["<cls-0>", "<cls-1>"]) == ids
  np.testing.assert_array_equal(tokenizer_lib.encode(reloaded, "a <cls-1>"), tokenizer_lib.encode(tiny, "a <cls-1>"))


def test_encode_pads_and_truncates_to_77(tiny):
  bos, eos = tiny.bos_token_id, tiny.eos_token_id
  word = tiny("photo", add_special_tokens=False).input_ids[0]
  ids = tokenizer_lib.encode(tiny, ["a photo", "photo " * 100])
  assert ids.shape == (2, 77) and ids.dtype == np.int32
  short = tiny("a photo").input_ids
  assert ids[0].tolist() == short + [tiny.pad_token_id] * (77 - len(short))
  assert ids[1].tolist() == [bos] + [word] * 75 + [eos]
  assert tokenizer_lib.encode(tiny, "a photo").shape == (1, 77)


def test_sd2_style_padding(tmp_path):
  folder = tokenizer_lib.write_tokenizer_folder(tmp_path / "tokenizer", WORDS, pad_token="!")
  t = tokenizer_lib.load_tokenizer(folder)
  assert t.pad_token_id == t.get_vocab()["!"] == 0
  ids = tokenizer_lib.encode(t, "a photo")[0]
  assert ids[:4].tolist() == [t.bos_token_id, *t("a photo", add_special_tokens=False).input_ids, t.eos_token_id]
  assert (ids[4:] == 0).all()


def test_load_tokenizer_subfolder_and_errors(tiny_folder, tmp_path):
  t = tokenizer_lib.load_tokenizer(tiny_folder.parent, subfolder="tokenizer")
  assert t.model_max_length == 77
  (tmp_path / "empty").mkdir()
  with pytest.raises(hf_io.CheckpointError, match="vocab.json"):
    tokenizer_lib.load_tokenizer(tmp_path / "empty")
  with pytest.raises(hf_io.CheckpointError, match="does not exist"):
    tokenizer_lib.load_tokenizer(tmp_path / "missing")


def test_bad_bpe_file(tmp_path):
  bad = tmp_path / "bpe.txt.gz"
  with gzip.open(bad, "wt") as f:
    f.write("#version: 0.2\na b\nc d\n")
  with pytest.raises(ValueError, match="not a CLIP BPE merges file"):
    tokenizer_lib.write_tokenizer_from_bpe_gz(tmp_path / "out", bad)
  with pytest.raises(FileNotFoundError):
    tokenizer_lib.write_tokenizer_from_bpe_gz(tmp_path / "out", tmp_path / "absent.txt.gz")
