"""Encode the few-shot images once and keep the result on disk.

The frozen encoders (VAE latent moments, CLIP image features) see each shot
once per run setup, not once per step. The cache file name is a hash of the
caller's key (model id, source, resolution, preprocessing, ...), the flip
setting, the shot identities and the shot pixels, so any change gives a new
file and a stale file is never read. Files are staged and renamed into place
(`hf_io.write_folder`), so a crash leaves either the whole file or none.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mcti_jax.data.errors import DataError
from mcti_jax.data.labeled import FewShot
from mcti_jax.data.preprocess import flip_horizontal

EncodeFn = Callable[[np.ndarray], Mapping[str, Any]]
_META = "__meta__"


def cache_digest(few_shot: FewShot, key: Mapping[str, Any], flip: bool) -> str:
  """Hex sha256 over the key, flip, the shot identities and the shot pixels."""
  try:
    key_json = json.dumps(key, sort_keys=True)
  except TypeError as e:
    raise DataError(f"cache key must be JSON-serializable (str, numbers, lists, dicts): {e}") from e
  h = hashlib.sha256()
  h.update(key_json.encode())
  h.update(json.dumps({"flip": bool(flip), "classes": few_shot.class_indices.tolist(),
                       "shots": few_shot.shot_ids, "shape": few_shot.shots.shape}).encode())
  h.update(np.ascontiguousarray(few_shot.shots).data)
  return h.hexdigest()


def cache_path(few_shot: FewShot, cache_dir: str | os.PathLike, key: Mapping[str, Any], flip: bool) -> str:
  return os.path.join(os.fspath(cache_dir), f"shots-{cache_digest(few_shot, key, flip)[:40]}.npz")


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


def _save(path: str, arrays: Mapping[str, np.ndarray], meta: str) -> None:
  """One .npz, written whole or not at all (`hf_io.write_folder`)."""
  from mcti_jax.models import hf_io
  buffer = io.BytesIO()
  np.savez(buffer, **arrays, **{_META: np.asarray(meta)})
  hf_io.write_folder(os.path.dirname(path), {os.path.basename(path): buffer.getvalue()})


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
  k, n = few_shot.shots.shape[:2]
  images = few_shot.shots.reshape(k * n, *few_shot.shots.shape[2:])
  if flip:  # [K*N, 2, ...]: the image then its mirror
    images = np.stack([images, flip_horizontal(images)], axis=1).reshape(-1, *images.shape[1:])
  encoded = _encode_all(images, encode_fn, batch_size)
  lead = (k, n, 2) if flip else (k, n)
  encoded = {name: value.reshape(*lead, *value.shape[1:]) for name, value in encoded.items()}
  os.makedirs(cache_dir, exist_ok=True)
  meta = json.dumps({"key": key, "flip": flip, "source": few_shot.source, "seed": few_shot.seed,
                     "classes": few_shot.class_names, "shots": few_shot.shot_ids})
  _save(path, encoded, meta)
  return encoded
