"""Learned tokens on disk, in the formats people load them with.

A run's export holds one such folder per phase (<workdir>/export/ti, .../mcti),
written together in one step: a crash leaves the previous export or none,
never some phases without the others.

  <folder>/tokens.safetensors         {"tokens": float32 [K, V, D], "num_vectors": int32 [K]}: all classes at once
  <folder>/manifest.json              class index, token string, class name, V_k, init text, per-class file
  <folder>/classes/<k>/learned_embeds.safetensors   {"<cls-k>": float32 [V_k, D]}

The per-class file is what diffusers' `pipe.load_textual_inversion(path)`
accepts; with V_k > 1 it adds "<cls-k>", "<cls-k>_1", ... as our tokenizer does.
Classes may use different numbers of vectors V_k (label/caption inits): the
combined array is padded to V = max V_k (its rows past V_k are unused) and
`num_vectors` says how many each uses; the per-class files hold only theirs.
Exports made before per-class counts lack `num_vectors` and use all V.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mcti_jax.models import hf_io
from mcti_jax.tokens import ClassTokens

MANIFEST = "manifest.json"
COMBINED = "tokens.safetensors"


def token_files(tokens: np.ndarray, class_tokens: ClassTokens, class_names: list[str],
                info: dict[str, Any] | None = None) -> dict[str, Any]:
  """The files of one token folder, for `hf_io.write_folder`."""
  tokens = np.asarray(tokens, np.float32)[: class_tokens.num_classes]
  if tokens.shape[:2] != class_tokens.ids.shape:
    raise ValueError(f"tokens {tokens.shape} do not match {class_tokens.num_classes} classes x "
                     f"{class_tokens.num_vectors} vectors")
  counts = class_tokens.counts
  files: dict[str, Any] = {COMBINED: hf_io.tensors({"tokens": tokens, "num_vectors": counts.astype(np.int32)})}
  classes = []
  for k, name in enumerate(class_names):
    token = class_tokens.names[k][0]
    rel = f"classes/{k:04d}/learned_embeds.safetensors"
    files[rel] = hf_io.tensors({token: np.ascontiguousarray(tokens[k, : counts[k]])})
    entry = {"index": k, "token": token, "name": name, "num_vectors": int(counts[k]), "file": rel}
    if class_tokens.init_texts is not None:
      entry["init_text"] = class_tokens.init_texts[k]
    classes.append(entry)
  files[MANIFEST] = {"num_classes": len(classes), "num_vectors": class_tokens.num_vectors,
                     "width": int(tokens.shape[-1]), "classes": classes, **(info or {})}
  return files


def export_tokens(folder: str | Path, tokens: np.ndarray, class_tokens: ClassTokens, class_names: list[str],
                  info: dict[str, Any] | None = None) -> Path:
  """Write all formats atomically (a crash leaves the previous export, or none)."""
  hf_io.write_folder(folder, token_files(tokens, class_tokens, class_names, info))
  return Path(folder)


def export_phases(folder: str | Path, phases: dict[str, np.ndarray], class_tokens: ClassTokens,
                  class_names: list[str], info: dict[str, Any] | None = None,
                  phase_info: dict[str, dict[str, Any]] | None = None) -> dict[str, Path]:
  """<folder>/<phase>/ for every phase, replacing the whole of `folder` in one step.

  `info` goes into every manifest, `phase_info[phase]` (its method, templates) into that phase's.
  """
  files = {}
  for phase, tokens in phases.items():
    one = token_files(tokens, class_tokens, class_names,
                      {**(info or {}), **(phase_info or {}).get(phase, {}), "phase": phase})
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
