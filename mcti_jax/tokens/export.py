"""Learned tokens on disk, in the formats people load them with.

A run's export holds one such folder per phase (<workdir>/export/ti, .../mcti),
written together in one step: a crash leaves the previous export or none,
never some phases without the others. `mcti export` (reexport.py) rewrites an
older export in today's formats.

  <folder>/tokens.safetensors         {"tokens": float32 [K, V, D], "num_vectors": int32 [K]}: all classes at once
  <folder>/manifest.json              class index, token string, class name, V_k, init text, per-class files,
                                      and a digest of names, counts and tokens (`digest`, checked on re-export)
  <folder>/classes/<k>/learned_embeds.safetensors   {"<cls-k>": float32 [V_k, D]}: diffusers
  <folder>/a1111/<word>.safetensors   {"emb_params": float32 [V_k, D]}: AUTOMATIC1111 webui, kohya sd-scripts

The per-class file is what diffusers' `pipe.load_textual_inversion(path)`
accepts; with V_k > 1 it adds "<cls-k>", "<cls-k>_1", ... as our tokenizer does.
Classes may use different numbers of vectors V_k (label/caption inits): the
combined array is padded to V = max V_k (its rows past V_k are unused) and
`num_vectors` says how many each uses; the per-class files hold only theirs.
Exports made before per-class counts lack `num_vectors` and use all V; those
made before the A1111 files lack a1111/ and the manifest's "a1111_*" keys.

The manifest names the models the tokens were trained on ("base_model", "clip_model") so that `mcti generate`
and `mcti retrieve` can default to them, never as an absolute path of the machine that trained: a hub id as it
is, a model that ships in the package as "mcti_jax:assets/tiny/sd" (wherever the package is installed), and
another local folder relative to the export folder ("../../../models/sd"), so an export moved with its models
still finds them (`model_reference`, `resolve_model`).

The A1111 file is for tools that take the prompt word from the file name
(manifest: "a1111_word", "a1111_file"), e.g. "cls3-golden_retriever-mcti":
copy it into the webui's embeddings/ folder and write that word in a prompt.
What their loaders do with it (checked in tests/tokens/test_export_formats.py):
- AUTOMATIC1111 stable-diffusion-webui, modules/textual_inversion/textual_inversion.py
  (`EmbeddingDatabase.load_from_file`, later split out as `create_embedding_from_data`): reads a .safetensors
  file as a dict of tensors; one without "string_to_param" or "clip_g"/"clip_l" must hold exactly one tensor,
  which is the embedding [V, D] (a 1-D one becomes [1, D]); the name is the file name without its extension,
  and a prompt uses the embedding wherever the name's CLIP tokens occur. Hence one key, and a word of
  lowercase ASCII letters, digits, '-' and '_' (no prompt syntax such as <>()[]:, no spaces, no dots, no path
  separators; CLIP lowercases prompts, so case could not tell two words apart anyway), led by the class
  index so that it is unique in the folder even when class names sanitize alike, and ended by the phase
  so that the ti and mcti files of a run can sit in one embeddings/ folder.
- kohya sd-scripts train_textual_inversion.py saves SD1/2 embeddings as {"emb_params": [V, D]} and reads
  back the first tensor of the dict; we use its key.
- diffusers `load_textual_inversion(path, token=word)` (`_retrieve_tokens_and_embeddings`): a state dict of
  one key is that token's embedding; without `token=` the key itself ("emb_params") would be the word, so the
  A1111 file needs `token=`, while the per-class file needs none.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from mcti_jax.errors import MctiError
from mcti_jax.models import hf_io
from mcti_jax.tokens.placeholders import ClassTokens

MANIFEST = "manifest.json"
COMBINED = "tokens.safetensors"
A1111_KEY = "emb_params"  # kohya's key; A1111 and diffusers accept any single key
_NOT_WORD = re.compile(r"[^a-z0-9]+")
MODEL_KEYS = ("base_model", "clip_model")  # the manifest's model references
PACKAGE = Path(__file__).resolve().parents[1]  # mcti_jax/: models inside it are named "mcti_jax:<path>"
IN_PACKAGE = "mcti_jax:"


def model_reference(model: str | os.PathLike, folder: str | os.PathLike) -> str:
  """How the manifest in `folder` names `model`: a hub id as it is, a model inside the installed package as
  "mcti_jax:<its path there>", another local folder relative to `folder`, starting with "./" or "../"."""
  path = Path(model).expanduser()
  if not path.exists():
    return str(model)  # a hub id
  path = path.resolve()
  if path.is_relative_to(PACKAGE):
    return IN_PACKAGE + path.relative_to(PACKAGE).as_posix()
  try:
    relative = Path(os.path.relpath(path, Path(folder).expanduser().resolve())).as_posix()
  except ValueError:  # another drive (Windows): nothing relative exists
    return str(path)
  return relative if relative.startswith("../") or relative == ".." else f"./{relative}"


def resolve_model(reference: str, folder: str | os.PathLike) -> str:
  """The model a manifest in `folder` names (`model_reference`'s inverse); older manifests' absolute paths and hub
  ids as they are."""
  if reference.startswith(IN_PACKAGE):
    return str(PACKAGE / reference.removeprefix(IN_PACKAGE))
  if reference.startswith(("./", "../")) or reference == "..":
    return os.path.normpath(Path(folder).expanduser().resolve() / reference)
  return reference


def with_model_references(info: dict[str, Any] | None, folder: str | os.PathLike) -> dict[str, Any]:
  """`info` with its model paths written as `model_reference`s from `folder`."""
  info = dict(info or {})
  for key in MODEL_KEYS:
    if info.get(key):
      info[key] = model_reference(info[key], folder)
  return info


def manifest_models(manifest: dict[str, Any], folder: str | os.PathLike) -> dict[str, str | None]:
  """{"base_model": ..., "clip_model": ...}: the models the export in `folder` names, resolved (None: not named)."""
  return {key: resolve_model(manifest[key], folder) if manifest.get(key) else None for key in MODEL_KEYS}


def _slug(text: str, limit: int = 32) -> str:
  """'Golden Retriever (dog)' -> 'golden_retriever_dog': lowercase ASCII letters and digits joined by '_'."""
  ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
  return _NOT_WORD.sub("_", ascii_text).strip("_")[:limit].rstrip("_")


def a1111_word(k: int, class_name: str, phase: str | None = None) -> str:
  """The prompt word (= file name) of class k's A1111 file: 'cls<k>-<class name>-<phase>', sanitized."""
  return "-".join(part for part in (f"cls{k}", _slug(class_name), _slug(phase or "")) if part)


def token_files(tokens: np.ndarray, class_tokens: ClassTokens, class_names: list[str],
                info: dict[str, Any] | None = None) -> dict[str, Any]:
  """The files of one token folder, for `hf_io.write_folder`. `class_tokens` serves only for its names, counts,
  shape and init texts (its ids are not written), so `mcti export` can rebuild it from a manifest."""
  tokens = np.asarray(tokens, np.float32)[: class_tokens.num_classes]
  if tokens.shape[:2] != class_tokens.ids.shape:
    raise ValueError(f"tokens {tokens.shape} do not match {class_tokens.num_classes} classes x "
                     f"{class_tokens.num_vectors} vectors")
  counts = class_tokens.counts
  phase = (info or {}).get("phase")
  _check_finite(tokens, class_names, phase)
  files: dict[str, Any] = {COMBINED: hf_io.tensors({"tokens": tokens, "num_vectors": counts.astype(np.int32)})}
  classes = []
  for k, name in enumerate(class_names):
    token = class_tokens.names[k][0]
    own = np.ascontiguousarray(tokens[k, : counts[k]])
    rel = f"classes/{k:04d}/learned_embeds.safetensors"
    word = a1111_word(k, name, phase)
    a1111 = f"a1111/{word}.safetensors"
    files[rel] = hf_io.tensors({token: own})
    files[a1111] = hf_io.tensors({A1111_KEY: own})
    entry = {"index": k, "token": token, "name": name, "num_vectors": int(counts[k]), "file": rel,
             "a1111_file": a1111, "a1111_word": word}
    if class_tokens.init_texts is not None:
      entry["init_text"] = class_tokens.init_texts[k]
    classes.append(entry)
  files[MANIFEST] = {"num_classes": len(classes), "num_vectors": class_tokens.num_vectors,
                     "width": int(tokens.shape[-1]), "classes": classes, **(info or {}),
                     "digest": digest(tokens, class_names, counts, phase)}
  return files


def digest(tokens: np.ndarray, class_names: list[str], counts: np.ndarray, phase: str | None) -> str:
  """sha256 of what an export means: its phase, each class's name and vector count, and the token array [K, V, D].

  The manifest records it when the export is written (`mcti train`, `mcti export`), and `mcti export` checks it
  before writing the export again (reexport.read_export): a manifest edited by hand (class names swapped) or put
  beside another export's tokens.safetensors no longer matches it. It travels with the export, so a copy made
  with --out is checked as well as the run's own export/. It is a checksum, not a signature: whoever rewrites the
  manifest on purpose can recompute it (as they could rewrite run.json).
  """
  h = hashlib.sha256(json.dumps({"phase": phase, "names": list(class_names),
                                 "counts": [int(n) for n in counts]}, sort_keys=True).encode())
  tokens = np.ascontiguousarray(tokens, np.float32)
  h.update(json.dumps(list(tokens.shape)).encode())
  h.update(tokens.tobytes())
  return h.hexdigest()


def _check_finite(tokens: np.ndarray, class_names: list[str], phase: str | None) -> None:
  """Refuse NaN/inf tokens: the last line of defence behind the trainer's own divergence check."""
  bad = np.flatnonzero(~np.isfinite(tokens.reshape(tokens.shape[0], -1)).all(axis=1))
  if bad.size:
    shown = ", ".join(f"class {k} ({class_names[k]})" for k in bad[:5]) + (
        f" and {bad.size - 5} more" if bad.size > 5 else "")
    raise MctiError(f"phase {phase or 'tokens'}: the tokens of {shown} are non-finite (NaN or inf), so they are "
                    "not exported: the training diverged; lower the learning rate and train again")


def export_tokens(folder: str | Path, tokens: np.ndarray, class_tokens: ClassTokens, class_names: list[str],
                  info: dict[str, Any] | None = None) -> Path:
  """Write all formats atomically (a crash leaves the previous export, or none)."""
  hf_io.write_folder(folder, token_files(tokens, class_tokens, class_names, with_model_references(info, folder)))
  return Path(folder)


def export_phases(folder: str | Path, phases: dict[str, np.ndarray], class_tokens: ClassTokens,
                  class_names: list[str], info: dict[str, Any] | None = None,
                  phase_info: dict[str, dict[str, Any]] | None = None) -> dict[str, Path]:
  """<folder>/<phase>/ for every phase, replacing the whole of `folder` in one step.

  `info` goes into every manifest, `phase_info[phase]` (its method, templates) into that phase's.
  """
  files = {}
  for phase, tokens in phases.items():
    phase_folder = Path(folder) / phase
    one = token_files(tokens, class_tokens, class_names, with_model_references(
        {**(info or {}), **(phase_info or {}).get(phase, {}), "phase": phase}, phase_folder))
    files.update({f"{phase}/{name}": content for name, content in one.items()})
  hf_io.write_folder(folder, files, replace=True)
  return {phase: Path(folder) / phase for phase in phases}


def load_tokens(folder: str | Path, expected_width: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
  """(tokens [K, V, D], manifest). `expected_width` is the text encoder's D, checked here; `vector_counts` reads
  how many of the V vectors each class uses."""
  folder = Path(folder)
  if not (folder / MANIFEST).is_file():
    raise FileNotFoundError(f"{folder} holds no {MANIFEST}: pass the folder `mcti train` exported "
                            "(e.g. runs/<name>/export/mcti).")
  manifest = json.loads((folder / MANIFEST).read_text())
  state, _ = hf_io.read_safetensors(folder, COMBINED)
  tokens = state["tokens"].astype(np.float32)
  if expected_width is not None and tokens.shape[-1] != expected_width:
    base = manifest.get("base_model", "another model")
    raise ValueError(f"tokens in {folder} are {tokens.shape[-1]}-wide (trained on {base}), but this text encoder is "
                     f"{expected_width}-wide: tokens only work with the base model they were trained on.")
  return tokens, manifest


def vector_counts(manifest: dict[str, Any], tokens: np.ndarray) -> np.ndarray:
  """int32 [K]: how many of its V vectors each class of a loaded export uses (all V in older exports)."""
  return np.asarray([c.get("num_vectors", tokens.shape[1]) for c in manifest["classes"]], np.int32)
