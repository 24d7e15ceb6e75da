"""Write a finished run's tokens again, in every format this version writes (see export.py): `mcti export`
(export_command.py, its flags).

  reexport("runs/pets")                                  # every phase of the run, in place
  reexport("runs/pets/export/mcti", out="~/tokens")      # one phase, elsewhere

An export written before a format existed (the A1111/kohya files, per-class
vector counts) gains it. Nothing is trained or encoded: the vectors are copied
bit for bit from each folder's tokens.safetensors, the source of truth, and the
manifest's other fields (base model, shots, templates...) are kept. Each
destination is replaced in one step (hf_io.write_folder), so a crash leaves the
old export, never a mix.

What it writes is vouched for: each manifest's digest (export.digest, recorded
when the run exported) must match its class names, counts and tokens, so an
edited manifest is refused, not spread into every format. An export from before
digests has none; it is refused too, unless --trust-manifest says its names are
right (re-training, the other way out, costs hours for what is usually a good
old export; the rewritten export then records a digest). --out replaces only a
new or empty folder or this run's own export, i.e. one holding the same phases
with the same tokens and names, whose replacement loses nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mcti_jax.tokens import export
from mcti_jax import paths
from mcti_jax.tokens import placeholders as tok
from mcti_jax.errors import MctiError
from mcti_jax.models import hf_io

# Manifest fields that token_files computes; everything else in a manifest is the run's info and is kept.
_COMPUTED = ("num_classes", "num_vectors", "width", "classes", "digest")
_UNFINISHED = "run the same `mcti train` command to finish it (it resumes from its checkpoint and exports)"
_REWRITE = "run the same `mcti train` command to write it again"
_EXPORT_FILES = (export.COMBINED, export.MANIFEST, "classes", "a1111")  # what an export folder holds


class ExportError(MctiError):
  """A folder that holds no export, or an export whose files are damaged."""


def find_exports(path: str | Path) -> tuple[Path, dict[str | None, Path]]:
  """(the folder to rewrite, its export folders by phase; {None: path} when `path` is one export folder).

  `path` is a run's workdir (its export/ is rewritten), that export/ folder itself, or one export folder.
  """
  path = Path(path).expanduser()
  if not path.is_dir():
    raise ExportError(f"{path} is not a folder: pass a run's workdir (runs/<name>) or one of its export folders "
                      "(runs/<name>/export/<phase>)")
  if (path / export.MANIFEST).is_file():
    _refuse_others(path, [p.name for p in path.iterdir() if p.name not in _EXPORT_FILES], "its export files")
    return path, {None: path}
  root = path / "export" if (path / "export").is_dir() else path
  entries = sorted(root.iterdir())
  phases = {p.name: p for p in entries if p.is_dir() and (p / export.MANIFEST).is_file()}
  if not phases:
    raise ExportError(f"{path} is not a finished run: it holds no export/<phase>/{export.MANIFEST}; {_UNFINISHED}")
  _refuse_others(root, [p.name for p in entries if p.name not in phases], f"its phase folders ({', '.join(phases)})",
                 f" (a phase folder without its {export.MANIFEST} is unfinished: {_UNFINISHED})")
  return root, phases


def _refuse_others(folder: Path, names: list[str], besides: str, hint: str = "") -> None:
  """Rewriting replaces `folder` whole: refuse when it holds the user's files (staging leftovers start with '.')."""
  others = sorted(n for n in names if not n.startswith("."))
  if others:
    raise ExportError(f"{folder} holds {', '.join(others)} besides {besides}; move "
                      f"{'it' if len(others) == 1 else 'them'} out first, as the export is rewritten whole{hint}")


def read_export(folder: Path, trust: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
  """(tokens [K, V, D], manifest) of one export folder, checked to agree with each other and with the manifest's
  digest (without one, only when `trust`: the manifest's names are then taken as they are)."""
  where = folder / export.MANIFEST
  try:
    manifest = json.loads(where.read_text())
  except ValueError as e:  # not JSON, not text
    raise ExportError(f"{where} is not valid JSON ({e}): the export is damaged; {_REWRITE}") from None
  if not isinstance(manifest, dict) or not isinstance(manifest.get("classes"), list):
    raise ExportError(f"{where} has no list of classes: it is not a manifest `mcti train` wrote; {_REWRITE}")
  try:
    state, _ = hf_io.read_safetensors(folder, export.COMBINED)
  except hf_io.CheckpointError as e:
    raise ExportError(f"{e}; {_REWRITE}") from None
  if "tokens" not in state or state["tokens"].ndim != 3:
    raise ExportError(f"{folder / export.COMBINED} holds no [K, V, D] 'tokens' array; {_REWRITE}")
  tokens = state["tokens"].astype(np.float32)
  classes = manifest["classes"]
  if len(classes) != tokens.shape[0]:
    raise ExportError(f"{where} lists {len(classes)} classes but {export.COMBINED} holds {tokens.shape[0]}; "
                      f"{_REWRITE}")
  for k, c in enumerate(classes):
    token = f"<cls-{k}>"
    if not isinstance(c, dict) or c.get("index", k) != k or not isinstance(c.get("name"), str) or \
        c.get("token", token) != token:
      raise ExportError(f"{where}: class entry {k} ({c!r:.200}) is not class {k} with a name and token <cls-{k}>; "
                        f"{_REWRITE}")
  counts = _counts(manifest, tokens, where)
  if "num_vectors" in state and not np.array_equal(state["num_vectors"], counts):
    raise ExportError(f"{folder / export.COMBINED} gives {state['num_vectors'].tolist()} vectors per class but "
                      f"{where} gives {counts.tolist()}; {_REWRITE}")
  recorded = manifest.get("digest")
  if recorded is None and not trust:
    raise ExportError(f"{where} records no digest (it predates them), so its class names cannot be checked against "
                      f"its tokens: pass --trust-manifest if they are right, or {_REWRITE}")
  if recorded is not None and recorded != _digest(tokens, manifest, counts):
    raise ExportError(f"{where} does not match the digest the run recorded: its class names, vector counts or phase "
                      f"were edited, or {export.COMBINED} comes from another export; restore the export's own files, "
                      f"or {_REWRITE}")
  return tokens, manifest


def _digest(tokens: np.ndarray, manifest: dict[str, Any], counts: np.ndarray) -> str:
  return export.digest(tokens, [c["name"] for c in manifest["classes"]], counts, manifest.get("phase"))


def _counts(manifest: dict[str, Any], tokens: np.ndarray, where: Path) -> np.ndarray:
  try:
    counts = export.vector_counts(manifest, tokens)
  except (TypeError, ValueError) as e:
    raise ExportError(f"{where}: a class's num_vectors is not a whole number ({e}); {_REWRITE}") from None
  if np.any(counts < 1) or np.any(counts > tokens.shape[1]):
    raise ExportError(f"{where}: num_vectors {counts.tolist()} must lie in 1..{tokens.shape[1]} (the V of "
                      f"{export.COMBINED}); {_REWRITE}")
  return counts


def rebuild(folder: Path, trust: bool = False) -> dict[str, Any]:
  """The files of one export folder in today's formats (`export.token_files`), from its own tokens and manifest."""
  tokens, manifest = read_export(folder, trust)
  num_classes, num_vectors = tokens.shape[:2]
  classes = manifest["classes"]
  texts = [c.get("init_text") for c in classes]
  # The ids only shape the array here (token_files writes names, not ids): no tokenizer is needed.
  class_tokens = tok.ClassTokens(tok.token_names(num_classes, num_vectors),
                                 np.arange(num_classes * num_vectors, dtype=np.int32).reshape(num_classes, num_vectors),
                                 export.vector_counts(manifest, tokens),
                                 tuple(texts) if all(t is not None for t in texts) else None)
  info = {k: v for k, v in manifest.items() if k not in _COMPUTED}
  files = export.token_files(tokens, class_tokens, [c["name"] for c in classes], info)
  # Keys of a class entry that this version does not compute (none today) are kept as they were.
  rebuilt = files[export.MANIFEST]
  rebuilt["classes"] = [{**old, **new} for old, new in zip(classes, rebuilt["classes"])]
  return files


def reexport(path: str | Path, out: str | Path | None = None, trust_manifest: bool = False) -> dict[str | None, Path]:
  """Rewrite the export(s) at `path` in every format, in place or into `out`; their folders by phase.

  `trust_manifest`: rewrite an export whose manifest records no digest (see read_export).
  """
  root, folders = find_exports(path)
  files, digests = {}, {}
  for phase, folder in folders.items():
    one = rebuild(folder, trust_manifest)
    digests[phase] = one[export.MANIFEST]["digest"]
    files.update({(name if phase is None else f"{phase}/{name}"): content for name, content in one.items()})
  target = root if out is None else _check_out(Path(out).expanduser(), root, digests)
  for phase, folder in folders.items():  # the models, named from where the manifest will be
    manifest = files[export.MANIFEST if phase is None else f"{phase}/{export.MANIFEST}"]
    models = {k: v for k, v in export.manifest_models(manifest, folder).items() if v is not None}
    manifest.update(export.with_model_references(models, target if phase is None else target / phase))
  hf_io.write_folder(target, files, replace=True)
  return {phase: target if phase is None else target / phase for phase in folders}


def _check_out(out: Path, root: Path, digests: dict[str | None, str]) -> Path:
  """`out` is replaced whole: refuse anything but a new or empty folder, or this run's own export.

  "Its own" is judged by content, not by a name or path a copy would not keep: `out` holds the same phases (or,
  for one export folder, one export), each with the tokens, names and counts about to be written (`digests`, by
  phase), so that replacing it loses nothing. An older export of the same run, before it trained further, differs
  and is refused too: nothing an export records tells it apart from another run's.
  """
  if out.resolve() == root.resolve():
    return out
  if out.resolve().is_relative_to(root.resolve()):
    raise ExportError(f"--out {out} lies inside {root}, which is rewritten whole; pass a folder outside it")
  paths.output_folder(out, "--out", error=ExportError)  # a file in the way, a read-only mount: before any work
  if not out.exists():
    return out
  entries = [p for p in out.iterdir() if not p.name.startswith(".")]  # staging leftovers start with '.'
  if not entries:
    return out
  single = None in digests
  earlier = (out / export.MANIFEST).is_file() and all(p.name in _EXPORT_FILES for p in entries) if single else \
      all(p.is_dir() and (p / export.MANIFEST).is_file() for p in entries)
  if not earlier:
    raise ExportError(f"--out {out} exists and holds other files than an export; it would be replaced whole: pass "
                      "a new folder")
  theirs = {None: out} if single else {p.name: p for p in entries}
  if theirs.keys() != digests.keys() or any(_content_digest(folder) != digests[phase]
                                            for phase, folder in theirs.items()):
    raise ExportError(f"--out {out} holds another export (other phases, tokens or class names than {root}'s), "
                      "which would be replaced whole: pass a new or empty folder")
  return out


def _content_digest(folder: Path) -> str | None:
  """The digest of what an export folder holds, computed from its files (its recorded one may be stale or forged);
  None when it cannot be read."""
  try:
    tokens, manifest = read_export(folder, trust=True)
  except (ExportError, OSError):
    return None
  return _digest(tokens, manifest, export.vector_counts(manifest, tokens))
