"""Per-image results in an append-only JSONL cache, so long runs resume."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

from mcti_jax.runtime import distributed
from mcti_jax.classify.dic.config import DiCConfig
from mcti_jax.classify.dic.stages import Ranking


@dataclasses.dataclass(frozen=True)
class ImageResult:
  """The outcome for one image, as cached (one JSON line)."""
  id: str
  index: int
  prediction: int
  ranking: list[int]
  mean_error: list[float]  # aligned with ranking
  num_samples: list[int]  # aligned with ranking
  label: int | None = None

  @property
  def correct(self) -> bool:
    return self.label is not None and self.prediction == self.label

  @classmethod
  def from_ranking(cls, image_id: str, index: int, ranking: Ranking, label: int | None = None) -> ImageResult:
    return cls(str(image_id), int(index), ranking.prediction, [int(k) for k in ranking.ranking],
               [float(e) for e in ranking.mean_error], [int(n) for n in ranking.num_samples],
               None if label is None else int(label))


def settings_key(cfg: DiCConfig, schedule, contexts, extra: dict[str, Any] | None = None) -> str:
  """A hash of everything that changes an image's result, apart from the image itself.

  `extra` should name the model weights and the image pipeline, e.g.
  {"unet": runs.fingerprint(sd_path), "resolution": 512}: the UNet's weights
  are not hashed here (gigabytes).
  """
  h = hashlib.sha256()
  h.update(json.dumps({"dic": cfg.settings(), "schedule": schedule.config.to_hf(), "extra": extra or {}},
                      sort_keys=True, default=str).encode())
  c = np.ascontiguousarray(np.asarray(jax.device_get(contexts), np.float32))
  h.update(str(c.shape).encode())
  h.update(c.tobytes())
  return h.hexdigest()[:24]


class ResultCache:
  """Append-only JSONL of per-image results, keyed by (image id, dataset index, settings key).

  Each result is one line, written with one write() and fsynced, so a crash can
  at most leave a partial LAST line; it is cut off when the file is reopened.
  Lines with other settings stay in the file and are ignored. With several
  processes (one mesh over all hosts) every process computes every image, so
  only process 0 writes; the file must be on a filesystem all of them read.
  """

  def __init__(self, path: str | os.PathLike, key: str):
    self.path, self.key = os.fspath(path), key
    self._results: dict[tuple[str, int], ImageResult] = {}
    if os.path.exists(self.path):
      self._load()
    else:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

  def _load(self) -> None:
    with open(self.path, "rb") as f:
      data = f.read()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):  # a line cut short by a crash: drop it
      with open(self.path, "r+b") as f:
        f.truncate(complete)
    fields = {f.name for f in dataclasses.fields(ImageResult)}
    for number, line in enumerate(data[:complete].splitlines(), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{self.path}:{number} is not a JSON line ({e}); the DiC cache is corrupt: "
                         "delete the file to start over") from e
      if record.get("settings") == self.key:
        result = ImageResult(**{k: v for k, v in record.items() if k in fields})
        self._results[(result.id, result.index)] = result

  def __len__(self) -> int:
    return len(self._results)

  def get(self, image_id: str, index: int) -> ImageResult | None:
    return self._results.get((str(image_id), int(index)))

  def put(self, result: ImageResult) -> None:
    self._results[(result.id, result.index)] = result
    if not distributed.is_main():
      return
    line = json.dumps({"settings": self.key, **dataclasses.asdict(result)}) + "\n"
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(line)
      f.flush()
      os.fsync(f.fileno())
