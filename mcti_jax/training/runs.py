"""What a run in a workdir was made with, so that a rerun resumes it only when that is still true.

A training run records its signature in <workdir>/run.json: every config
field, the content hashes of both checkpoints and of the shots. A rerun with
another signature is refused, naming what changed. The check fails closed:
only the fields in RESUMABLE may differ (where files go, logging, the device
count, and step counts that extend the last phase); a field added to the
config later is checked without anyone having to remember it here.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from mcti_jax.errors import ConfigError

# Fields a resumed run may change: outputs, logging, the device count and classes per pass (results don't
# depend on them), gradient checkpointing (the same arithmetic), and input paths whose contents are hashed instead.
RESUMABLE = ("workdir", "data.cache_dir", "log_every", "checkpoint_every", "num_devices", "mesh", "class_chunk",
             "model.remat", "model.guidance", "model.sd_path", "model.clip_path", "data.preset", "data.root",
             "data.data_dir", "data.split_file", "classifier.path", "classifier.clip_path", "classifier.export",
             "tokens.caption_file")
SIGNATURE_VERSION = 3  # 3: config.phases


def fingerprint(path: str | Path) -> str:
  """Names, sizes and times of a checkpoint's files: a changed model invalidates cached encodings."""
  folder = Path(path)
  if not folder.exists():
    return str(path)
  h = hashlib.sha256()
  for f in sorted(folder.rglob("*")):
    if f.is_file():
      st = f.stat()
      h.update(f"{f.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns};".encode())
  return h.hexdigest()[:16]


def weights_fingerprint(path: str | Path) -> str:
  """sha256 of a checkpoint's files, model cards (*.md) aside: what a resumed run must have been made with.

  Unlike fingerprint() it survives copying the folder; the file times only decide when to read it again.
  """
  return _weights_fingerprint(str(path), fingerprint(path))


@functools.lru_cache(maxsize=8)
def _weights_fingerprint(path: str, _times: str) -> str:
  folder = Path(path)
  if not folder.exists():
    return path  # a hub id
  h = hashlib.sha256()
  for f in sorted(folder.rglob("*")):
    if f.is_file() and f.suffix != ".md":
      with open(f, "rb") as file:
        h.update(f"{f.relative_to(folder)}:{hashlib.file_digest(file, 'sha256').hexdigest()};".encode())
  return h.hexdigest()[:16]


def shot_digests(class_names, shot_ids, shots: np.ndarray) -> np.ndarray:
  """uint8 [K, 32]: per class, sha256 of its name, its shots' ids and their pixels as the model sees them.

  Per class, so that a process holding only its own classes can hash them; the
  trainer gathers the rows and `data_fingerprint` hashes them all.
  """
  rows = []
  for name, ids, pixels in zip(class_names, shot_ids, shots):
    h = hashlib.sha256(json.dumps([name, list(ids), list(pixels.shape)]).encode())
    h.update(np.ascontiguousarray(pixels, np.uint8).tobytes())
    rows.append(np.frombuffer(h.digest(), np.uint8))
  return np.stack(rows)


def data_fingerprint(digests: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(digests, np.uint8).tobytes()).hexdigest()[:16]


def config_value(config, dotted: str):
  """config["a"]["b"] for "a.b"."""
  for part in dotted.split("."):
    config = config[part]
  return config


def settings_changes(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
  """'key: old -> new, ...' over the nested keys (dotted) that differ; '' when none does."""
  a, b = traverse_util.flatten_dict(old, sep="."), traverse_util.flatten_dict(new, sep=".")
  keys = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)
          and not any(k == i or k.startswith(i + ".") for i in ignore)]
  return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys)


def signature(config, *, num_classes: int, data: str | None, sd: str, clip: str | None,
              classifier: str | None = None, captions: list[str] | None = None) -> dict[str, Any]:
  """What must match for a checkpoint in the workdir to be resumed (JSON-ready).

  `captions`: the per-class captions the tokens start from (tokens.caption_file's content, hashed).
  """
  fingerprints = {"data": data, "sd": sd, "clip": clip}
  if classifier is not None:
    fingerprints["classifier"] = classifier
  if captions is not None:
    fingerprints["captions"] = hashlib.sha256(json.dumps(list(captions)).encode()).hexdigest()[:16]
  return {"version": SIGNATURE_VERSION, "config": json.loads(config.to_json_best_effort()),
          "num_classes": num_classes, "fingerprints": fingerprints}


def _phase_steps(sig: dict[str, Any]) -> list[int]:
  c = sig["config"]
  return [c["phase"][name]["steps"] for name in c["phases"]]


def extends(old: dict[str, Any], new: dict[str, Any]) -> bool:
  """Whether `new` only adds steps at the end of `old`: more steps in old's last training phase (the one after
  which every phase has 0 steps), the same phases before it."""
  if old["config"]["phases"] != new["config"]["phases"]:
    return False
  a, b = _phase_steps(old), _phase_steps(new)
  last = max((i for i, n in enumerate(a) if n), default=0)
  return a[:last] == b[:last] and a[last] <= b[last] and not any(a[last + 1:]) and not any(b[last + 1:])


def resume_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
  """What differs between two signatures of one version beyond what a resumed run may change ('' when none)."""
  ignore = tuple(f"config.{k}" for k in RESUMABLE)
  if extends(old, new):
    ignore += tuple(f"config.phase.{name}.steps" for name in new["config"]["phases"])
  return settings_changes(old, new, ignore=ignore)


def check_resumable(workdir: Path, new: dict[str, Any]) -> None:
  """Refuse a workdir whose run.json was made with another signature (run.json is written by `record`)."""
  path = workdir / "run.json"
  if not path.is_file():
    return
  old = json.loads(path.read_text())
  if old.get("version") != SIGNATURE_VERSION:
    raise ConfigError(f"{workdir} holds a run made by another version of mcti-jax (run.json version "
                      f"{old.get('version', 1)}; this one writes {SIGNATURE_VERSION}, with training phases in "
                      f"config.phases) that it cannot resume. Use a new --config.workdir, or delete {workdir} to "
                      "start over; its exported tokens (export/) still load.")
  detail = resume_changes(old, new)
  if detail:
    raise ConfigError(f"{workdir} holds a run made with other settings or data ({detail}). Use a new "
                      f"--config.workdir, or delete {workdir} to start over.")


def record(workdir: Path, sig: dict[str, Any]) -> None:
  """Write run.json atomically (again, when a run was extended or its resumable fields changed)."""
  workdir.mkdir(parents=True, exist_ok=True)
  tmp = workdir / "run.json.tmp"
  tmp.write_text(json.dumps(sig, indent=2) + "\n")
  tmp.replace(workdir / "run.json")
