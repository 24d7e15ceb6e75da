"""The common representation of every data source, and reproducible few-shot sampling.

`LabeledImages` holds only references (paths or record indices) and labels;
pixels are read on demand, in batches, so a test split of thousands of images
costs nothing until it is evaluated.

Few-shot sampling draws each class's shots from its own random stream, seeded
by (seed, class index). So a process that loads only some classes (multi-host
training, where each process holds its own classes) gets exactly the shots a
full load would give for those classes. A `FewShot` sampled with load=False
holds no pixels: it reads them a chunk of classes at a time (`chunks`), so a
thousand classes x 16 shots at 512 px (12.6 GB) never sit in memory at once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from mcti_jax.data import preprocess
from mcti_jax.errors import DataError

# Reads a batch of items (paths, record indices, ...) -> raw uint8 RGB images of any size.
ReadFn = Callable[[Sequence[Any]], list[np.ndarray]]
SHOT_CHUNK = 64  # classes whose shots are read at once when streaming (64 x 16 shots at 512 px: 800 MB)


def threaded_reader(read_one: Callable[[Any], np.ndarray], num_workers: int = 8) -> ReadFn:
  """Turns a one-item reader into a batch reader that decodes on a few threads (PIL frees the GIL)."""

  def read(items):
    if len(items) <= 1 or num_workers <= 1:
      return [read_one(item) for item in items]
    with concurrent.futures.ThreadPoolExecutor(min(num_workers, len(items))) as pool:
      return list(pool.map(read_one, items))

  return read


@dataclasses.dataclass(frozen=True, eq=False)
class LabeledImages:
  """Images of classes, by reference.

  Attributes:
    class_names: the name of each class; a label is an index into it.
    items: what `read_fn` takes for each image (a file path, a record index).
    ids: a portable name for each image, for reports and cache keys (a path
      relative to the data root, "digits[17]", "cifar10/test[5]").
    labels: int32 [M], the class index of each image.
    read_fn: reads a batch of items -> raw uint8 RGB images.
    source: a short description of where the images come from.
  """
  class_names: tuple[str, ...]
  items: tuple[Any, ...]
  ids: tuple[str, ...]
  labels: np.ndarray
  read_fn: ReadFn
  source: str

  def __post_init__(self):
    object.__setattr__(self, "class_names", tuple(self.class_names))
    object.__setattr__(self, "items", tuple(self.items))
    object.__setattr__(self, "ids", tuple(self.ids))
    object.__setattr__(self, "labels", np.asarray(self.labels, np.int32))
    if not len(self.items) == len(self.ids) == len(self.labels):
      raise ValueError(f"{self.source}: {len(self.items)} items, {len(self.ids)} ids and {len(self.labels)} labels")

  def __len__(self) -> int:
    return len(self.items)

  def __repr__(self) -> str:
    return f"LabeledImages({self.source!r}, {len(self)} images, {self.num_classes} classes)"

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def subset(self, positions: Sequence[int] | np.ndarray) -> LabeledImages:
    """The images at `positions` (same classes and labels)."""
    positions = np.asarray(positions, np.int64).reshape(-1)
    return dataclasses.replace(self, items=tuple(self.items[i] for i in positions),
                               ids=tuple(self.ids[i] for i in positions), labels=self.labels[positions])

  def shard(self, index: int, count: int) -> LabeledImages:
    """Every count-th image starting at index: this process's share of an evaluation."""
    return self.subset(np.arange(index, len(self), count))

  def positions_of_class(self, class_index: int) -> np.ndarray:
    return np.flatnonzero(self.labels == class_index)

  def load(self, positions: Sequence[int] | np.ndarray, resolution: int,
           interpolation: str = "bicubic") -> np.ndarray:
    """uint8 [len(positions), resolution, resolution, 3], preprocessed for the model."""
    positions = np.asarray(positions, np.int64).reshape(-1)
    raw = self.read_fn([self.items[i] for i in positions])
    out = np.empty((len(positions), resolution, resolution, 3), np.uint8)
    for j, image in enumerate(raw):
      out[j] = preprocess.center_crop_resize(image, resolution, interpolation)
    return out

  def batches(self, resolution: int, batch_size: int,
              interpolation: str = "bicubic") -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields (images uint8 [B, R, R, 3], labels int32 [B], positions [B]); the last batch may be short."""
    for start in range(0, len(self), batch_size):
      positions = np.arange(start, min(start + batch_size, len(self)))
      yield self.load(positions, resolution, interpolation), self.labels[positions], positions


@dataclasses.dataclass(frozen=True, eq=False)
class FewShot:
  """N shots of each of K classes, at the model resolution: held, or read from the source when asked for.

  Attributes:
    class_names: [K] names of the sampled classes.
    class_indices: int32 [K], their class index in the source.
    shot_ids: [K][N] where each shot came from (see LabeledImages.ids).
    shot_positions: int64 [K, N], positions of the shots in the source.
    seed: the sampling seed.
    source: LabeledImages.source of the source.
    resolution: R.
    remaining: the source's other images of these classes (for evaluation),
      when asked for; labels stay the source's class indices.
    pixels: uint8 [K, N, R, R, 3] when held (sample_few_shot(load=True)); else None and `images` reads them.
    images: the source, where pixels are read on demand.
    interpolation: the resize filter they are read with.
  """
  class_names: tuple[str, ...]
  class_indices: np.ndarray
  shot_ids: tuple[tuple[str, ...], ...]
  shot_positions: np.ndarray
  seed: int
  source: str
  resolution: int
  remaining: LabeledImages | None = None
  pixels: np.ndarray | None = None
  images: LabeledImages | None = None
  interpolation: str = "bicubic"

  def __post_init__(self):
    if self.pixels is None and self.images is None:
      raise ValueError("a FewShot needs its pixels or the images to read them from")

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def num_shots(self) -> int:
    return self.shot_positions.shape[1]

  @property
  def shots(self) -> np.ndarray:
    """uint8 [K, N, R, R, 3], every class's shots; read again on each use when not held (prefer `chunks`)."""
    return self.pixels if self.pixels is not None else self.load_classes(np.arange(self.num_classes))

  def load_classes(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """uint8 [len(rows), N, R, R, 3]: the shots of the classes at `rows` (positions in class_names)."""
    rows = np.asarray(rows, np.int64).reshape(-1)
    if self.pixels is not None:
      return self.pixels[rows]
    r = self.resolution
    flat = self.images.load(self.shot_positions[rows].reshape(-1), r, self.interpolation)
    return flat.reshape(len(rows), self.num_shots, r, r, 3)

  def chunks(self, size: int | None = None, rows: Sequence[int] | np.ndarray | None = None
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (rows [C], uint8 [C, N, R, R, 3]) for `size` (default SHOT_CHUNK) classes at a time (of `rows`,
    default all): memory bounded by the chunk, not by K."""
    size = size or SHOT_CHUNK
    rows = np.arange(self.num_classes) if rows is None else np.asarray(rows, np.int64).reshape(-1)
    for start in range(0, len(rows), size):
      part = rows[start:start + size]
      yield part, self.load_classes(part)

  def __repr__(self) -> str:
    held = "" if self.pixels is not None else ", read on demand"
    return (f"FewShot({self.source!r}, seed={self.seed}, {self.num_classes} classes x {self.num_shots} shots at "
            f"{self.resolution}px{held}, remaining={self.remaining!r})")

  def manifest(self) -> dict[str, Any]:
    """A JSON-ready record of which images were used, for run reports."""
    return {
        "source": self.source,
        "seed": self.seed,
        "classes": [{"index": int(c), "name": name, "shots": list(ids)}
                    for c, name, ids in zip(self.class_indices, self.class_names, self.shot_ids)],
    }


def choose_shots(labeled: LabeledImages, n_shots: int, seed: int, classes: Sequence[int]) -> np.ndarray:
  """Positions int64 [K, N] (sorted per class) of the shots of `classes`; class c's depend on (seed, c) only. Loads
  nothing: with several processes, each loads its own classes' shots but can name every class's."""
  chosen = []
  for c in classes:
    members = labeled.positions_of_class(c)
    if len(members) < n_shots:
      raise DataError(f"class {labeled.class_names[c]!r} (index {c}) of {labeled.source} has {len(members)} "
                      f"image(s), fewer than n_shots={n_shots}; add images to it or lower n_shots")
    chosen.append(members[np.sort(class_rng(seed, c).choice(len(members), n_shots, replace=False))])
  return np.stack(chosen).astype(np.int64)


def shots_manifest(labeled: LabeledImages, positions: np.ndarray, seed: int, classes: Sequence[int]
                   ) -> dict[str, Any]:
  """FewShot.manifest() of the shots at `positions` [K, N] of `classes`, without loading them."""
  return {"source": labeled.source, "seed": int(seed),
          "classes": [{"index": int(c), "name": labeled.class_names[c], "shots": [labeled.ids[i] for i in row]}
                      for c, row in zip(classes, positions)]}


def class_rng(seed: int, class_index: int) -> np.random.Generator:
  """The random stream of one class: depends on (seed, class index) only."""
  return np.random.default_rng([int(seed), int(class_index)])


def _check_class_indices(labeled: LabeledImages, class_indices) -> np.ndarray:
  if class_indices is None:
    return np.arange(labeled.num_classes, dtype=np.int32)
  idx = np.asarray(class_indices, np.int64).reshape(-1)
  bad = [int(c) for c in idx if not 0 <= c < labeled.num_classes]
  if bad:
    raise DataError(f"class_indices {bad} are out of range: {labeled.source} has {labeled.num_classes} classes "
                    f"(0..{labeled.num_classes - 1})")
  if len(set(idx.tolist())) != len(idx):
    raise DataError(f"class_indices has repeated classes: {idx.tolist()}")
  return idx.astype(np.int32)


def sample_few_shot(labeled: LabeledImages, n_shots: int, seed: int,
                    class_indices: Sequence[int] | None = None, *, resolution: int,
                    interpolation: str = "bicubic", with_remaining: bool = False, load: bool = True) -> FewShot:
  """Draws n_shots images of each class reproducibly and loads them at `resolution` (or, with load=False, reads
  them when asked for: `FewShot.chunks`).

  Args:
    labeled: the source.
    n_shots: N, the shots per class.
    seed: the same seed gives the same shots for a class whatever
      `class_indices` is.
    class_indices: the classes to sample (all by default), in this order.
    resolution: the model's image size R.
    interpolation: resize filter (see preprocess.INTERPOLATIONS).
    with_remaining: also return the non-shot images of these classes.
    load: read the pixels now; False keeps only the references, for many classes.
  """
  if n_shots < 1:
    raise DataError(f"n_shots must be at least 1, got {n_shots}")
  classes = _check_class_indices(labeled, class_indices)
  positions = choose_shots(labeled, n_shots, seed, classes)
  rest = [np.setdiff1d(labeled.positions_of_class(c), row) for c, row in zip(classes, positions)]
  few = FewShot(
      class_names=tuple(labeled.class_names[c] for c in classes),
      class_indices=classes,
      shot_ids=tuple(tuple(labeled.ids[i] for i in row) for row in positions),
      shot_positions=positions,
      seed=int(seed),
      source=labeled.source,
      resolution=int(resolution),
      remaining=labeled.subset(np.sort(np.concatenate(rest))) if with_remaining else None,
      images=labeled,
      interpolation=interpolation,
  )
  return dataclasses.replace(few, pixels=few.shots, images=None) if load else few
