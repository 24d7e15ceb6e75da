"""Encode the few-shot images once and keep the result on disk.

The frozen encoders (VAE latent moments, CLIP image features) see each shot
once per run setup, not once per step. The cache file name is a hash of the
caller's key (model id, source, resolution, preprocessing, ...), the flip
setting, the shot identities and the shot pixels, so any change gives a new
file and a stale file is never read. Files are staged and renamed into place
(`hf_io.write_folder`), so a crash leaves either the whole file or none.

`encode_by_class` keeps one file per class and reads the shots a chunk of
classes at a time: a run with more classes encodes only the new ones, and host
memory is bounded by the chunk, not by K. `encode_cached` keeps one file for a
whole shot set already in memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mcti_jax.errors import DataError
from mcti_jax.data.labeled import SHOT_CHUNK, FewShot
from mcti_jax.data.preprocess import flip_horizontal

EncodeFn = Callable[[np.ndarray], Mapping[str, Any]]
_META = "__meta__"


def _key_json(key: Mapping[str, Any]) -> str:
  try:
    return json.dumps(key, sort_keys=True)
  except TypeError as e:
    raise DataError(f"cache key must be JSON-serializable (str, numbers, lists, dicts): {e}") from e


def cache_digest(few_shot: FewShot, key: Mapping[str, Any], flip: bool) -> str:
  """Hex sha256 over the key, flip, the shot identities and the shot pixels."""
  h = hashlib.sha256()
  h.update(_key_json(key).encode())
  shots = few_shot.shots
  h.update(json.dumps({"flip": bool(flip), "classes": few_shot.class_indices.tolist(),
                       "shots": few_shot.shot_ids, "shape": shots.shape}).encode())
  h.update(np.ascontiguousarray(shots).data)
  return h.hexdigest()


def cache_path(few_shot: FewShot, cache_dir: str | os.PathLike, key: Mapping[str, Any], flip: bool) -> str:
  return os.path.join(os.fspath(cache_dir), f"shots-{cache_digest(few_shot, key, flip)[:40]}.npz")


def _with_flips(pixels: np.ndarray, flip: bool) -> np.ndarray:
  """[C, N, R, R, 3] -> [C*N(*2), R, R, 3]: each image, then (with flip) its mirror."""
  images = pixels.reshape(-1, *pixels.shape[2:])
  if flip:
    images = np.stack([images, flip_horizontal(images)], axis=1).reshape(-1, *images.shape[1:])
  return images


def _encode_all(images: np.ndarray, encode_fn: EncodeFn, batch_size: int) -> dict[str, np.ndarray]:
  """encode_fn over images [M, H, W, 3] in fixed-size batches (the last one padded, so a jitted fn compiles once)."""
  outputs: dict[str, list[np.ndarray]] = {}
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    real = len(batch)
    if real < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
    result = encode_fn(batch)
    if not isinstance(result, Mapping) or not result:
      raise DataError(f"encode_fn must return a non-empty dict of arrays, got {type(result).__name__}")
    for name, value in result.items():
      value = np.asarray(value)
      if value.ndim == 0 or value.shape[0] != batch_size:
        raise DataError(f"encode_fn output {name!r} has shape {value.shape}; its first axis should be "
                        f"the batch size {batch_size}")
      outputs.setdefault(name, []).append(value[:real])
  return {name: np.concatenate(parts) for name, parts in outputs.items()}


def _load(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as f:
      return {name: f[name] for name in f.files if name != _META}
  except (OSError, ValueError, EOFError) as e:
    raise DataError(f"cache file {path} is unreadable ({e}); delete it to re-encode") from e


def _npz(arrays: Mapping[str, np.ndarray], meta: str) -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays, **{_META: np.asarray(meta)})
  return buffer.getvalue()


def _save_all(files: Mapping[str, bytes]) -> None:
  """.npz files {path: content} of one folder, each written whole or not at all (`hf_io.write_folder`)."""
  from mcti_jax.models import hf_io
  if files:
    folders = {os.path.dirname(path) for path in files}
    assert len(folders) == 1, folders
    folder = folders.pop()
    os.makedirs(folder, exist_ok=True)  # then each file is renamed in alone: processes may share the folder
    hf_io.write_folder(folder, {os.path.basename(path): content for path, content in files.items()})


def _save(path: str, arrays: Mapping[str, np.ndarray], meta: str) -> None:
  _save_all({path: _npz(arrays, meta)})


def encode_cached(few_shot: FewShot, encode_fn: EncodeFn, cache_dir: str | os.PathLike,
                  key: Mapping[str, Any], *, flip: bool = False, batch_size: int = 8) -> dict[str, np.ndarray]:
  """encode_fn(shots) for every shot, computed once per key and then read from cache_dir.

  Args:
    few_shot: the shots, uint8 [K, N, R, R, 3].
    encode_fn: uint8 images [B, R, R, 3] -> {name: array [B, ...]}; called
      with exactly batch_size images each time.
    cache_dir: folder of the cache files (created if missing).
    key: JSON-serializable description of everything besides the shots that
      changes the encoding: model id, data source, resolution, preprocessing.
    flip: also encode each shot's mirror image.
    batch_size: images per encode_fn call.

  Returns:
    {name: array [K, N, ...]}, or [K, N, 2, ...] with flip (index 1 = mirrored).
  """
  if batch_size < 1:
    raise DataError(f"batch_size must be at least 1, got {batch_size}")
  cache_dir = os.fspath(cache_dir)
  path = cache_path(few_shot, cache_dir, key, flip)
  if os.path.exists(path):
    return _load(path)
  shots = few_shot.shots
  k, n = shots.shape[:2]
  encoded = _encode_all(_with_flips(shots, flip), encode_fn, batch_size)
  lead = (k, n, 2) if flip else (k, n)
  encoded = {name: value.reshape(*lead, *value.shape[1:]) for name, value in encoded.items()}
  os.makedirs(cache_dir, exist_ok=True)
  meta = json.dumps({"key": key, "flip": flip, "source": few_shot.source, "seed": few_shot.seed,
                     "classes": few_shot.class_names, "shots": few_shot.shot_ids})
  _save(path, encoded, meta)
  return encoded


def class_digest(key: Mapping[str, Any] | str, flip: bool, shot_ids, pixels: np.ndarray) -> str:
  """Hex sha256 of one class's cache entry: the key (or its _key_json), flip, its shots' ids and pixels [N, R, R, 3].

  Not its class index or name: the same shots encode the same whatever class they are, or however many there are.
  """
  h = hashlib.sha256((key if isinstance(key, str) else _key_json(key)).encode())
  h.update(json.dumps({"flip": bool(flip), "shots": list(shot_ids), "shape": list(pixels.shape)}).encode())
  h.update(np.ascontiguousarray(pixels, np.uint8).data)
  return h.hexdigest()


def class_cache_path(cache_dir: str | os.PathLike, digest: str) -> str:
  return os.path.join(os.fspath(cache_dir), "classes", f"class-{digest[:40]}.npz")


def encode_by_class(few_shot: FewShot, encode_fn: EncodeFn, cache_dir: str | os.PathLike, key: Mapping[str, Any],
                    *, flip: bool = False, batch_size: int = 8, chunk: int = SHOT_CHUNK,
                    digests: Sequence[str] | None = None, note: Mapping[str, Any] | None = None
                    ) -> dict[str, np.ndarray]:
  """encode_fn over every shot, one cache file per class, reading the shots `chunk` classes at a time.

  A class's entry is keyed by class_digest (key, flip, its shot ids and pixels): classes already in the cache are
  read, the others encoded (batch_size images per encode_fn call, across the classes of a chunk; the last batch
  padded, so a jitted fn compiles once) and written. Only the encodings of all classes are kept.

  Args:
    few_shot: the shots, usually sampled with load=False (then read here a chunk at a time).
    encode_fn, key, flip, batch_size: as encode_cached.
    cache_dir: folder of the cache (entries go to cache_dir/classes/, created if missing).
    chunk: classes whose shots are read (and encoded) at once.
    digests: [K] class_digest of each class, if already computed from its pixels (the trainer hashes the shots
      before the models load); then the shots of classes in the cache are not read again.
    note: more JSON-ready facts for the entries' metadata (the trainer records which process encoded them).

  Returns:
    {name: array [K, N, ...]}, or [K, N, 2, ...] with flip (index 1 = mirrored).
  """
  if batch_size < 1 or chunk < 1:
    raise DataError(f"batch_size and chunk must be at least 1, got {batch_size} and {chunk}")
  key_json, k = _key_json(key), few_shot.num_classes
  paths = [class_cache_path(cache_dir, d) for d in digests] if digests is not None else [None] * k
  if len(paths) != k:
    raise DataError(f"{len(paths)} digests for {k} classes")
  out: dict[str, np.ndarray] = {}
  encoded_here = set()

  def put(row: int, entry: Mapping[str, np.ndarray]) -> None:
    for name, value in entry.items():
      if name not in out:
        out[name] = np.empty((k, *value.shape), value.dtype)
      out[name][row] = value

  todo = [row for row, path in enumerate(paths) if path is None or not os.path.exists(path)]
  for rows, pixels in few_shot.chunks(chunk, rows=todo):
    new = []
    for i, row in enumerate(rows):
      paths[row] = class_cache_path(cache_dir, class_digest(key_json, flip, few_shot.shot_ids[row], pixels[i]))
      if not os.path.exists(paths[row]):
        new.append(i)
    if not new:
      continue
    encoded = _encode_all(_with_flips(pixels if len(new) == len(rows) else pixels[new], flip), encode_fn, batch_size)
    lead = (len(new), few_shot.num_shots, 2) if flip else (len(new), few_shot.num_shots)
    encoded = {name: value.reshape(*lead, *value.shape[1:]) for name, value in encoded.items()}
    files = {}
    for j, i in enumerate(new):
      row = int(rows[i])
      entry = {name: value[j] for name, value in encoded.items()}
      meta = json.dumps({"key": key, "flip": flip, "source": few_shot.source, "class": few_shot.class_names[row],
                         "shots": few_shot.shot_ids[row], **(note or {})})
      files[paths[row]] = _npz(entry, meta)
      put(row, entry)
      encoded_here.add(row)
    _save_all(files)  # the chunk's entries in one staged folder
  for row, path in enumerate(paths):
    if row not in encoded_here:
      put(row, _load(path))
  return out
