"""The CLIP tokenizer: loading, placeholder tokens, and writing vocabularies.

We use transformers' `CLIPTokenizer` (in transformers 5 it is the
`tokenizers`-backed byte-level BPE; in 4.x the fast one behaves the same) and
only add what Textual Inversion needs: new placeholder tokens and fixed-length
(77) id arrays as Stable Diffusion feeds its text encoder.

A CLIP vocabulary is laid out as
  [256 byte symbols] [the same 256 + '</w>'] [one token per BPE merge]
  ['<|startoftext|>', '<|endoftext|>'],
so EOS is the last id (49407 in the real 49408-token vocabulary). Both writers
below keep that layout, so that the text encoder's pooling rules (which look
for the EOS id) behave on a tiny test vocabulary as on the real one.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
from pathlib import Path

import numpy as np
import regex

from mcti_jax.models import hf_io

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77  # CLIP's context length; SD pads and truncates every prompt to it.

# CLIP's pre-tokenizer: contractions, letter runs, single digits, other symbol runs.
_WORD_RE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
# The real CLIP merges file: a header line, then 49152 - 256 - 2 merges are used.
_NUM_CLIP_MERGES = 49152 - 256 - 2


# ----------------------------------------------------------------- loading


def load_tokenizer(path_or_hub_id: str | os.PathLike, subfolder: str | None = None, *,
                   model_max_length: int = MAX_LENGTH):
  """transformers' CLIPTokenizer from a `tokenizer/` folder (or a CLIP model folder).

  For a diffusers pipeline folder pass `subfolder="tokenizer"`.
  """
  from transformers import CLIPTokenizer

  folder = hf_io.resolve_folder(path_or_hub_id, subfolder)
  if not (folder / "vocab.json").is_file() and not (folder / "tokenizer.json").is_file():
    raise hf_io.CheckpointError(f"{folder / 'vocab.json'} is missing: a CLIP tokenizer folder holds vocab.json and "
                                "merges.txt (or tokenizer.json). For a diffusers pipeline pass subfolder='tokenizer'.")
  return CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length)


def add_placeholder_tokens(tokenizer, tokens: list[str]) -> list[int]:
  """Add new tokens (e.g. '<digit-3>') and return their ids, which follow the vocabulary (> EOS).

  The text encoder's token embedding is NOT resized: our CLIP text model takes
  `inputs_embeds` for those positions instead (see clip.py).
  """
  if len(set(tokens)) != len(tokens):
    raise ValueError(f"placeholder tokens must be distinct, got {tokens}")
  vocab = tokenizer.get_vocab()
  for token in tokens:
    # 'cat' is in the vocabulary as 'cat</w>': a token that already encodes to one id exists.
    existing = [vocab[token]] if token in vocab else tokenizer(token, add_special_tokens=False).input_ids
    if len(existing) == 1:
      raise ValueError(f"placeholder token {token!r} already exists in the tokenizer (id {existing[0]}); choose a "
                       "string that is not in the vocabulary, e.g. '<my-class>'.")
  num_added = tokenizer.add_tokens(list(tokens))
  if num_added != len(tokens):
    raise ValueError(f"only {num_added} of the placeholder tokens {tokens} could be added")
  ids = tokenizer.convert_tokens_to_ids(list(tokens))
  for token, token_id in zip(tokens, ids):
    got = tokenizer(token, add_special_tokens=False).input_ids
    if got != [token_id]:
      raise ValueError(f"placeholder token {token!r} (id {token_id}) tokenizes to {got}, not to itself")
  return list(ids)


def encode(tokenizer, prompts: str | list[str], max_length: int | None = None) -> np.ndarray:
  """Token ids [B, 77] as SD computes them: BOS, tokens, EOS, then padding; long prompts truncated (EOS kept)."""
  if isinstance(prompts, str):
    prompts = [prompts]
  max_length = max_length or tokenizer.model_max_length
  out = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
  return np.asarray(out["input_ids"], dtype=np.int32)


# ----------------------------------------------------------------- writing


def bytes_to_unicode() -> dict[int, str]:
  """The byte -> printable character table of byte-level BPE (GPT-2 and CLIP).

  Printable Latin-1 bytes stand for themselves; every other byte gets a code
  point from 256 up, in byte order. The dict order is the vocabulary order.
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  table = {b: chr(b) for b in printable}
  extra = 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _base_vocab() -> list[str]:
  symbols = list(bytes_to_unicode().values())
  return symbols + [s + "</w>" for s in symbols]


def _words(text: str) -> list[str]:
  """Pre-tokenize like CLIP: collapse whitespace, lowercase, split; each word as byte symbols."""
  byte_symbols = bytes_to_unicode()
  text = " ".join(text.split()).lower()
  return ["".join(byte_symbols[b] for b in w.encode("utf-8")) for w in _WORD_RE.findall(text)]


def learn_merges(texts: list[str]) -> list[tuple[str, str]]:
  """Greedy BPE on the words of `texts` until every word is one token (most frequent pair first)."""
  counts = collections.Counter(w for t in texts for w in _words(t) if w not in (BOS_TOKEN, EOS_TOKEN))
  words = {tuple(w[:-1]) + (w[-1] + "</w>",): n for w, n in counts.items()}
  merges = []
  while True:
    pairs = collections.Counter()
    for symbols, n in words.items():
      for pair in zip(symbols, symbols[1:]):
        pairs[pair] += n
    if not pairs:
      return merges
    best = max(sorted(pairs), key=lambda p: pairs[p])  # ties: the alphabetically first pair
    merges.append(best)
    words = {_merge(symbols, best): n for symbols, n in words.items()}


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
  out, i = [], 0
  while i < len(symbols):
    if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
      out.append(symbols[i] + symbols[i + 1])
      i += 2
    else:
      out.append(symbols[i])
      i += 1
  return tuple(out)


def _write(folder: str | os.PathLike, merges: list[tuple[str, str]], pad_token: str, model_max_length: int) -> Path:
  tokens = _base_vocab()
  seen = set(tokens)
  for a, b in merges:
    if a + b not in seen:  # every CLIP merge makes a new token; guard anyway
      tokens.append(a + b)
      seen.add(a + b)
  tokens += [BOS_TOKEN, EOS_TOKEN]
  vocab = {t: i for i, t in enumerate(tokens)}
  merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
  special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
  config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
            "do_lower_case": True, "errors": "replace", "add_prefix_space": False}
  hf_io.write_folder(folder, {
      "vocab.json": json.dumps(vocab, ensure_ascii=False).encode("utf-8"),
      "merges.txt": merges_txt.encode("utf-8"),
      "special_tokens_map.json": special,
      "tokenizer_config.json": config,
  })
  return Path(folder)


def write_tokenizer_folder(folder: str | os.PathLike, words: list[str], *, pad_token: str = EOS_TOKEN,
                           model_max_length: int = MAX_LENGTH) -> Path:
  """A tiny CLIP tokenizer folder whose merges make each word of `words` a single token.

  For tests and the demo (no downloads): 512 byte symbols + one token per merge
  + BOS + EOS, so the vocabulary stays well under 2000 for a few dozen words.
  Any other text still tokenizes (into smaller pieces, down to bytes).
  `pad_token` is '<|endoftext|>' as in SD1 ('!' in SD2's tokenizer).
  """
  return _write(folder, learn_merges(list(words)), pad_token, model_max_length)


def write_tokenizer_from_bpe_gz(folder: str | os.PathLike, bpe_gz_path: str | os.PathLike, *,
                                pad_token: str = EOS_TOKEN, model_max_length: int = MAX_LENGTH) -> Path:
  """The real 49408-token CLIP tokenizer folder from OpenAI's `bpe_simple_vocab_16e6.txt.gz`.

  As CLIP's SimpleTokenizer does: skip the header line, keep the first
  49152 - 256 - 2 merges, vocabulary = bytes, bytes + '</w>', merges, BOS, EOS.
  """
  path = Path(bpe_gz_path)
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist (OpenAI CLIP and open_clip ship it as "
                            "bpe_simple_vocab_16e6.txt.gz)")
  lines = gzip.open(path).read().decode("utf-8").split("\n")[1:_NUM_CLIP_MERGES + 1]
  merges = [tuple(line.split()) for line in lines]
  bad = [i + 2 for i, m in enumerate(merges) if len(m) != 2]
  if bad or len(merges) != _NUM_CLIP_MERGES:
    raise ValueError(f"{path} is not a CLIP BPE merges file (expected {_NUM_CLIP_MERGES} lines 'a b' after the "
                     f"header; {len(merges)} read, malformed lines: {bad[:5]})")
  return _write(folder, merges, pad_token, model_max_length)
