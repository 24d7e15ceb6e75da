"""The Diffusion Classifier (Li et al. 2023): the class whose prompt best predicts the noise.

For an image latent x0 and the conditioning c_k of each class k, the error

  e_k(t, eps) = mean over the latent of err(target(x0, eps, t) - unet(x_t, t, c_k)),
  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,

is taken at evenly spaced timesteps (one noise draw per image and timestep,
the same for every class: a paired comparison), and the class with the lowest
mean error wins. err is l2 (squared), l1 or huber (delta 1, as torch's
huber_loss); the target is the noise, or v for v_prediction schedules.

Sample ids and timesteps follow the DiC code (eval_prob_adaptive): for at most
S samples, sample j has t_j = T//S//2 + j*(T//S). Stage i (keep_i, n_i) scores
the surviving classes on the evenly spaced n_i of the S sample ids
(ids[(S//n_i)//2 :: S//n_i][:n_i]); ids scored in an earlier stage are reused,
not recomputed. Classes are ranked by their mean error over EVERY sample they
have been scored on (when the stage grids do not nest, as imagenet's, that is
more than n_i), and the best keep_i survive. Ties: on equal mean error the
lower class index ranks first. The last stage keeps one class: the prediction.
The full ranking lists the survivor, then the classes dropped at the last
stage in their order, then those dropped at the stage before, and so on.

The noise of sample j of an image is normal(fold_in(fold_in(key(seed),
image_index), j)): it depends on the image's index in the dataset, not on its
place in a batch, the device count or the stage configuration.

Speed: the [images x classes x new samples] grid of UNet calls of a stage is
flattened, padded to a multiple of (devices x chunk), sharded over the mesh and
run in chunks of `batch_size` per device by `lax.map`, in ONE jitted call.
Its shapes depend only on the stage, so a whole evaluation compiles once per
stage. Results go to an append-only JSONL cache so long runs resume.

  cfg = preset("pets")
  mesh = parallel.make_mesh()
  contexts = class_contexts(freeze(sd.text_encoder), sd.tokenizer, class_names=labeled.class_names)
  # few-shot: class_contexts(..., learned=conditioning.LearnedTokens.from_export(folder, sd.tokenizer, sd.text_width))
  key = settings_key(cfg, sd.schedule, contexts, {"unet": sd_fingerprint, "resolution": 512})
  result = evaluate(freeze(sd.unet), sd.schedule, contexts, labeled.batches(512, 8), cfg,
                    encode=latent_encoder(freeze(sd.vae), mesh), mesh=mesh, cache=ResultCache("runs/dic.jsonl", key),
                    image_ids=labeled.ids, total=len(labeled))
  print(result.summary())  # accuracy, images/s, UNet evaluations/s, ...
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mcti_jax import parallel
from mcti_jax.data import preprocess
from mcti_jax.models import vae as vae_lib
from mcti_jax.models.frozen import Frozen

ERRORS = ("l2", "l1", "huber")

# Stage settings of the DiC paper's commands (github.com/diffusion-classifier, commands.md).
PRESETS: dict[str, dict[str, Any]] = {
    "pets": dict(keep=(5, 1), samples=(25, 250), error="l1"),
    "flowers": dict(keep=(20, 10, 5, 1), samples=(20, 50, 100, 500), error="l1"),
    "food": dict(keep=(20, 10, 5, 1), samples=(20, 50, 100, 500), error="l2"),
    "aircraft": dict(keep=(20, 10, 5, 1), samples=(20, 50, 100, 500), error="l2"),
    "cifar10": dict(keep=(5, 1), samples=(50, 500), error="l1"),
    "stl10": dict(keep=(5, 1), samples=(100, 500), error="l1"),
    "imagenet": dict(keep=(500, 50, 10, 1), samples=(50, 100, 500, 1000), error="l2"),
    "objectnet": dict(keep=(25, 10, 5, 1), samples=(50, 100, 500, 1000), error="l2"),
    # The embedded tiny model and the tests: seconds on a CPU.
    "tiny": dict(keep=(3, 1), samples=(4, 8), error="l2"),
}


# ------------------------------------------------------------------ settings


@dataclasses.dataclass(frozen=True)
class DiCConfig:
  """What the classifier does; all but the last two fields change its results.

  Attributes:
    keep: classes kept after each stage; strictly decreasing, ends with 1.
    samples: (t, noise) samples per stage; strictly increasing, the last is S.
    error: "l2", "l1" or "huber".
    seed: noise seed (see module docstring).
    batch_size: UNet batch per device (one chunk of the grid); bounds memory.
    images_per_call: images whose grids share one jitted call.
  """
  keep: tuple[int, ...] = (5, 1)
  samples: tuple[int, ...] = (25, 250)
  error: str = "l2"
  seed: int = 0
  batch_size: int = 16
  images_per_call: int = 1

  def __post_init__(self):
    object.__setattr__(self, "keep", _int_tuple(self.keep, "keep"))
    object.__setattr__(self, "samples", _int_tuple(self.samples, "samples"))
    keep, samples = self.keep, self.samples
    where = f"DiC stages keep={keep} samples={samples}"
    if not keep or len(keep) != len(samples):
      raise ValueError(f"{where}: keep and samples need one entry per stage (same non-zero length)")
    if min(keep) < 1 or min(samples) < 1:
      raise ValueError(f"{where}: every keep and samples entry must be at least 1")
    if any(a <= b for a, b in zip(keep, keep[1:])):
      raise ValueError(f"{where}: keep must strictly decrease (each stage drops classes)")
    if any(a >= b for a, b in zip(samples, samples[1:])):
      raise ValueError(f"{where}: samples must strictly increase (each stage scores more samples)")
    if keep[-1] != 1:
      raise ValueError(f"{where}: the last stage must keep exactly 1 class (the prediction), not {keep[-1]}")
    if self.error not in ERRORS:
      raise ValueError(f"DiC error {self.error!r} is not one of {ERRORS}")
    if self.batch_size < 1 or self.images_per_call < 1:
      raise ValueError(f"batch_size ({self.batch_size}) and images_per_call ({self.images_per_call}) must be >= 1")

  @property
  def max_samples(self) -> int:
    return self.samples[-1]

  def check(self, num_train_timesteps: int | None = None, num_classes: int | None = None) -> None:
    """Raise ValueError if the stages don't fit the schedule or the class count."""
    if num_train_timesteps is not None and self.max_samples > num_train_timesteps:
      raise ValueError(f"DiC samples={self.samples}: at most num_train_timesteps={num_train_timesteps} samples "
                       "(one per timestep)")
    if num_classes is not None:
      if num_classes < 1:
        raise ValueError("no classes to choose from: the conditioning contexts are empty")
      if self.keep[0] > num_classes:
        raise ValueError(f"DiC keep={self.keep} keeps {self.keep[0]} classes after the first stage but there are "
                         f"only {num_classes}; lower keep (e.g. preset('tiny') or keep=({num_classes - 1}, 1))")

  def settings(self) -> dict[str, Any]:
    """The fields that change results (for cache keys)."""
    return dict(keep=list(self.keep), samples=list(self.samples), error=self.error, seed=self.seed)


def _int_tuple(values, name: str) -> tuple[int, ...]:
  values = (values,) if isinstance(values, (int, np.integer)) else tuple(values)
  if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
    raise ValueError(f"DiC {name}={values!r} must be integers")
  return tuple(int(v) for v in values)


def preset(name: str, **overrides) -> DiCConfig:
  """The DiC paper's stages for a dataset (see PRESETS), with field overrides."""
  if name not in PRESETS:
    raise ValueError(f"no DiC preset {name!r}; choose one of {sorted(PRESETS)}")
  return DiCConfig(**{**PRESETS[name], **overrides})


def timestep_grid(num_train_timesteps: int, max_samples: int) -> np.ndarray:
  """t of each sample id j < S: T//S//2 + j*(T//S), as the DiC code."""
  step = num_train_timesteps // max_samples
  if step < 1:
    raise ValueError(f"{max_samples} samples need at least as many timesteps, got {num_train_timesteps}")
  return np.arange(step // 2, num_train_timesteps, step)[:max_samples].astype(np.int32)


def stage_sample_ids(max_samples: int, n: int) -> np.ndarray:
  """The n evenly spaced sample ids of a stage among S, as the DiC code."""
  stride = max_samples // n
  return np.arange(max_samples)[stride // 2::stride][:n]


@dataclasses.dataclass(frozen=True)
class Plan:
  """The stages worked out for a schedule: which sample ids each stage computes and ranks on."""
  timesteps: np.ndarray  # [S] int32, t of each sample id
  keep: tuple[int, ...]
  new: tuple[np.ndarray, ...]  # sample ids first scored at stage i
  scored: tuple[np.ndarray, ...]  # every sample id scored by the end of stage i (sorted)


def make_plan(cfg: DiCConfig, num_train_timesteps: int) -> Plan:
  cfg.check(num_train_timesteps)
  done: set[int] = set()
  new, scored = [], []
  for n in cfg.samples:
    ids = [int(j) for j in stage_sample_ids(cfg.max_samples, n) if int(j) not in done]
    done.update(ids)
    new.append(np.asarray(ids, np.int32))
    scored.append(np.asarray(sorted(done), np.int32))
  return Plan(timestep_grid(num_train_timesteps, cfg.max_samples), cfg.keep, tuple(new), tuple(scored))


# ----------------------------------------------------------- adaptive stages


@dataclasses.dataclass(frozen=True)
class Ranking:
  """One image's outcome: classes best first, with the mean error and sample count each was ranked on."""
  ranking: np.ndarray  # int [K]
  mean_error: np.ndarray  # float64 [K], aligned with ranking
  num_samples: np.ndarray  # int [K], aligned with ranking

  @property
  def prediction(self) -> int:
    return int(self.ranking[0])


# score_fn(classes int [B, Kc], sample_ids int [n]) -> errors [B, Kc, n]
ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def run_stages(score_fn: ScoreFn, num_images: int, num_classes: int, plan: Plan) -> list[Ranking]:
  """The adaptive stages for a batch of images; `score_fn` is asked only for samples not scored before.

  Pure numpy around the scorer, so it can be tested on a hand-made error table.
  Means are taken in float64; NaN errors rank last.
  """
  if plan.keep[0] > num_classes:
    raise ValueError(f"keep={plan.keep} keeps {plan.keep[0]} classes of only {num_classes}")
  rows = np.arange(num_images)[:, None]
  errors = np.full((num_images, num_classes, len(plan.timesteps)), np.nan)
  candidates = np.tile(np.arange(num_classes), (num_images, 1))
  dropped = []  # per stage: (classes, means, count), each [B, dropped]
  for keep, new, scored in zip(plan.keep, plan.new, plan.scored):
    if len(new):
      e = np.asarray(score_fn(candidates, new), np.float64)
      if e.shape != (num_images, candidates.shape[1], len(new)):
        raise ValueError(f"score_fn returned {e.shape}, expected {(num_images, candidates.shape[1], len(new))}")
      errors[rows[:, :, None], candidates[:, :, None], new] = e
    means = errors[rows, candidates][:, :, scored].mean(-1)
    means = np.where(np.isnan(means), np.inf, means)
    order = np.stack([np.lexsort((c, m)) for c, m in zip(candidates, means)])  # by mean, then class index
    ranked, ranked_means = np.take_along_axis(candidates, order, 1), np.take_along_axis(means, order, 1)
    dropped.append((ranked[:, keep:], ranked_means[:, keep:], len(scored)))
    candidates, survivor_means = ranked[:, :keep], ranked_means[:, :keep]
  out = []
  for b in range(num_images):
    parts = [(candidates[b], survivor_means[b], len(plan.scored[-1]))] + [(c[b], m[b], n) for c, m, n in dropped[::-1]]
    out.append(Ranking(ranking=np.concatenate([c for c, _, _ in parts]),
                       mean_error=np.concatenate([m for _, m, _ in parts]),
                       num_samples=np.concatenate([np.full(len(c), n) for c, _, n in parts])))
  return out


# -------------------------------------------------------------- UNet errors


def prediction_errors(prediction: jax.Array, target: jax.Array, kind: str) -> jax.Array:
  """Per-item error [N] of predictions [N, ...] against targets, averaged over all but the first axis (float32)."""
  diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
  if kind == "l2":
    e = diff**2
  elif kind == "l1":
    e = jnp.abs(diff)
  elif kind == "huber":  # torch.nn.functional.huber_loss with delta=1
    a = jnp.abs(diff)
    e = jnp.where(a < 1.0, 0.5 * diff**2, a - 0.5)
  else:
    raise ValueError(f"error kind {kind!r} is not one of {ERRORS}")
  return e.mean(axis=tuple(range(1, e.ndim)))


def sample_noise(seed, image_index, sample_id, shape) -> jax.Array:
  """The noise of one (image, sample): normal(fold_in(fold_in(key(seed), image_index), sample_id))."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), image_index), sample_id)
  return jax.random.normal(key, shape, jnp.float32)


@functools.partial(jax.jit, static_argnames=("mesh", "chunk", "error"))
def _score_items(unet: Frozen, schedule, contexts, x0, image_indices, seed, item_image, item_class, item_sample,
                 item_t, *, mesh, chunk: int, error: str):
  """Errors [P] of P (image, class, sample) items; items sharded over the mesh, `chunk` UNet calls at a time."""

  def local(unet, schedule, contexts, x0, image_indices, seed, item_image, item_class, item_sample, item_t):
    model = unet.module

    def one_chunk(args):
      b, c, j, t = args
      x = x0[b].astype(jnp.float32)
      noise = jax.vmap(lambda i, s: sample_noise(seed, i, s, x0.shape[1:]))(image_indices[b], j)
      x_t = schedule.add_noise(x, noise, t)
      prediction = model(x_t, t, contexts[c])
      return prediction_errors(prediction, schedule.training_target(x, noise, t), error)

    n = item_image.shape[0]
    chunks = [a.reshape(n // chunk, chunk) for a in (item_image, item_class, item_sample, item_t)]
    return jax.lax.map(one_chunk, chunks).reshape(n)

  shard = P(parallel.CLASS_AXIS)
  errors = jax.shard_map(local, mesh=mesh, in_specs=(P(),) * 6 + (shard,) * 4, out_specs=shard,
                         check_vma=False)(unet, schedule, contexts, x0, image_indices, seed, item_image, item_class,
                                          item_sample, item_t)
  return jax.lax.with_sharding_constraint(errors, parallel.replicated(mesh))  # every process reads all errors


class Scorer:
  """The UNet error grid of a batch of images on the mesh: the `score_fn` of `run_stages`.

  Frozen weights, schedule and contexts are placed (replicated) on the mesh once.
  """

  def __init__(self, unet: Frozen, schedule, contexts, cfg: DiCConfig, mesh):
    self.cfg, self.mesh = cfg, mesh
    replicated = parallel.replicated(mesh)
    self.unet, self.schedule = jax.device_put((unet, schedule), replicated)
    self.contexts = jax.device_put(jnp.asarray(contexts), replicated)
    self.timesteps = timestep_grid(schedule.num_train_timesteps, cfg.max_samples)
    self.unet_evals = 0  # real (unpadded) UNet evaluations so far
    self.x0 = self.image_indices = None

  @property
  def num_classes(self) -> int:
    return self.contexts.shape[0]

  def set_images(self, x0, image_indices, num_real: int | None = None) -> None:
    """The batch the next calls score; rows past `num_real` are padding (not counted)."""
    replicated = parallel.replicated(self.mesh)
    self.x0 = jax.device_put(jnp.asarray(x0, jnp.float32), replicated)
    self.image_indices = jax.device_put(np.asarray(image_indices, np.int32), replicated)
    self.num_real = len(image_indices) if num_real is None else num_real

  def __call__(self, classes: np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
    classes, sample_ids = np.asarray(classes, np.int32), np.asarray(sample_ids, np.int32)
    num_images, num_classes = classes.shape
    b = np.repeat(np.arange(num_images, dtype=np.int32), num_classes * len(sample_ids))
    c = np.repeat(classes.ravel(), len(sample_ids))
    j = np.tile(sample_ids, num_images * num_classes)
    items = len(b)
    devices = self.mesh.devices.size
    chunk = min(self.cfg.batch_size, -(-items // devices))  # small grids: don't pad to a full batch
    padded = -(-items // (devices * chunk)) * devices * chunk
    pad = lambda a: np.concatenate([a, np.repeat(a[:1], padded - items)])
    sharding = parallel.class_sharding(self.mesh)
    args = [jax.device_put(pad(a), sharding) for a in (b, c, j, self.timesteps[j])]
    seed = jax.device_put(np.uint32(self.cfg.seed), parallel.replicated(self.mesh))
    errors = _score_items(self.unet, self.schedule, self.contexts, self.x0, self.image_indices, seed, *args,
                          mesh=self.mesh, chunk=chunk, error=self.cfg.error)
    self.unet_evals += self.num_real * num_classes * len(sample_ids)
    return np.asarray(jax.device_get(errors))[:items].reshape(num_images, num_classes, len(sample_ids))


def error_grid(unet: Frozen, schedule, contexts, x0, image_index: int, cfg: DiCConfig, mesh,
               sample_ids: Sequence[int] | None = None) -> np.ndarray:
  """Errors [K, n] of one image (x0 [h, w, c]) for every class and the given sample ids (default all S)."""
  scorer = Scorer(unet, schedule, contexts, cfg, mesh)
  scorer.set_images(np.asarray(x0)[None], [image_index])
  ids = np.arange(cfg.max_samples) if sample_ids is None else np.asarray(sample_ids)
  return scorer(np.arange(scorer.num_classes)[None], ids)[0]


# ---------------------------------------------------------------- results


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
    if jax.process_index() != 0:
      return
    line = json.dumps({"settings": self.key, **dataclasses.asdict(result)}) + "\n"
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(line)
      f.flush()
      os.fsync(f.fileno())


# --------------------------------------------------------------- classify


def classify(unet: Frozen | None, schedule, contexts, x0_batch, image_indices: Sequence[int], cfg: DiCConfig, mesh,
             cache: ResultCache | None = None, *, image_ids: Sequence[str] | None = None,
             labels: Sequence[int] | None = None, scorer: Scorer | None = None) -> list[ImageResult]:
  """Classify images x0 [B, h, w, c] (VAE latent mean x scaling factor) with dataset indices [B].

  Images already in `cache` are not scored again (`unet` may then be None);
  new results are appended to it. Pass a `scorer` to reuse placed weights
  across calls (`evaluate` does).
  """
  image_indices = [int(i) for i in image_indices]
  image_ids = [str(i) for i in image_indices] if image_ids is None else [str(i) for i in image_ids]
  labels = [None] * len(image_indices) if labels is None else [int(y) for y in labels]
  if not len(image_indices) == len(image_ids) == len(labels) == len(x0_batch):
    raise ValueError(f"{len(x0_batch)} latents, {len(image_indices)} indices, {len(image_ids)} ids and "
                     f"{len(labels)} labels")
  num_classes = int(np.shape(contexts)[0])
  cfg.check(schedule.num_train_timesteps, num_classes)
  results: list[ImageResult | None] = [cache.get(i, n) if cache is not None else None
                                           for i, n in zip(image_ids, image_indices)]
  todo = [p for p, r in enumerate(results) if r is None]
  if not todo:
    return results
  if scorer is None:
    if unet is None:
      raise ValueError("the UNet is needed: some images are not in the cache")
    scorer = Scorer(unet, schedule, contexts, cfg, mesh)
  plan = make_plan(cfg, schedule.num_train_timesteps)
  x0_batch = np.asarray(x0_batch, np.float32)
  group = cfg.images_per_call
  for start in range(0, len(todo), group):
    part = todo[start:start + group]
    rows = part + [part[0]] * (group - len(part))  # pad with copies: every call has the same shapes
    scorer.set_images(x0_batch[rows], [image_indices[p] for p in rows], num_real=len(part))
    rankings = run_stages(scorer, group, num_classes, plan)
    for p, ranking in zip(part, rankings):
      results[p] = ImageResult.from_ranking(image_ids[p], image_indices[p], ranking, labels[p])
      if cache is not None:
        cache.put(results[p])
  return results


# --------------------------------------------------------------- evaluate


@dataclasses.dataclass
class EvalResult:
  accuracy: float
  num_images: int
  num_correct: int
  results: list[ImageResult]  # in the order of the batches
  num_computed: int  # images scored by this run (the rest came from the cache)
  unet_evals: int
  seconds: float  # wall time of the whole run
  images_per_s: float  # computed images per second of this run
  unet_evals_per_s: float

  def summary(self) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(self).items() if k != "results"}


def evaluate(unet: Frozen | None, schedule, contexts, batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
             cfg: DiCConfig, *, encode: Callable[[np.ndarray], np.ndarray], mesh,
             cache: ResultCache | None = None, image_ids: Sequence[str] | None = None, total: int | None = None,
             progress: bool = True) -> EvalResult:
  """Accuracy of the Diffusion Classifier over (uint8 images [B, R, R, 3], labels [B], dataset indices [B]) batches.

  `LabeledImages.batches(resolution, batch_size)` yields exactly these. Labels
  index the rows of `contexts`. `encode` maps uint8 images to x0 (see
  `latent_encoder`); every batch is padded to the first one's size so it
  compiles once. `image_ids[index]` names images in the cache (e.g.
  `labeled.ids`); by default the index itself. `total` (image count) sizes the
  progress bar and its ETA.
  """
  num_classes = int(np.shape(contexts)[0])
  cfg.check(schedule.num_train_timesteps, num_classes)
  scorer = None
  results: list[ImageResult] = []
  computed, compute_s, first_size, start = 0, 0.0, None, time.perf_counter()
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc="diffusion classifier", unit="img", dynamic_ncols=True)
  try:
    for images, labels, indices in batches:
      labels, indices = np.asarray(labels).reshape(-1), np.asarray(indices).reshape(-1)
      if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels {sorted(set(labels.tolist()))} fall outside the {num_classes} classes of contexts")
      ids = [str(image_ids[i]) if image_ids is not None else str(i) for i in indices]
      batch = [cache.get(i, n) if cache is not None else None for i, n in zip(ids, indices)]
      pending = [p for p, r in enumerate(batch) if r is None]
      if pending:
        tick = time.perf_counter()
        if scorer is None:
          if unet is None:
            raise ValueError("the UNet is needed: some images are not in the cache")
          scorer = Scorer(unet, schedule, contexts, cfg, mesh)
        images = np.asarray(images)
        first_size = first_size or len(images)
        padded = np.concatenate([images, np.repeat(images[:1], max(first_size - len(images), 0), 0)])
        x0 = np.asarray(encode(padded))[:len(images)]
        new = classify(unet, schedule, contexts, x0[pending], indices[pending], cfg, mesh, cache,
                       image_ids=[ids[p] for p in pending], labels=labels[pending], scorer=scorer)
        for p, r in zip(pending, new):
          batch[p] = r
        computed += len(pending)
        compute_s += time.perf_counter() - tick
      results += [dataclasses.replace(r, label=int(y)) for r, y in zip(batch, labels)]
      if bar is not None:
        evals = scorer.unet_evals if scorer else 0
        bar.update(len(batch))
        bar.set_postfix(acc=f"{sum(r.correct for r in results) / len(results):.3f}",
                        img_s=f"{computed / max(compute_s, 1e-9):.3g}", evals_s=f"{evals / max(compute_s, 1e-9):.3g}")
  finally:
    if bar is not None:
      bar.close()
  if not results:
    raise ValueError("no images to evaluate: the test split is empty (check the data source, split name and "
                     "class selection)")
  unet_evals = scorer.unet_evals if scorer else 0
  correct = sum(r.correct for r in results)
  return EvalResult(accuracy=correct / len(results), num_images=len(results), num_correct=correct, results=results,
                    num_computed=computed, unet_evals=unet_evals, seconds=time.perf_counter() - start,
                    images_per_s=computed / compute_s if compute_s else 0.0,
                    unet_evals_per_s=unet_evals / compute_s if compute_s else 0.0)


# ----------------------------------------------------------------- inputs


@jax.jit
def _encode_latents(vae: Frozen, images):
  model = vae.module
  mean, _ = model.encode(preprocess.to_model_range(images))
  return vae_lib.scale_latents(mean, model.config)


def latent_encoder(vae: Frozen, mesh=None) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 images [B, H, W, 3] -> x0 = (VAE latent mean - shift) x scaling_factor [B, h, w, c], jitted.

  With a mesh the VAE weights are replicated on it once.
  """
  if mesh is not None:
    vae = jax.device_put(vae, parallel.replicated(mesh))
  return lambda images: np.asarray(jax.device_get(_encode_latents(vae, jnp.asarray(images, jnp.uint8))))


def class_contexts(text_encoder: Frozen, tokenizer, *, class_names: Sequence[str] | None = None, learned=None,
                   template: str = "a photo of a {}", pooling: str = "eos") -> jax.Array:
  """The UNet conditioning [K, 77, D] of every class.

  Zero-shot: pass `class_names` ("a photo of a {name}"). Few-shot: pass the
  learned tokens (`conditioning.LearnedTokens`), giving "a photo of a <cls-k>".
  """
  from mcti_jax import conditioning
  if (class_names is None) == (learned is None):
    raise ValueError("pass exactly one of class_names (zero-shot) and learned (learned class tokens)")
  if template.count("{}") != 1:
    raise ValueError(f"template {template!r} must hold exactly one '{{}}' for the class")
  if learned is not None:
    prompts = [template.format(f"<cls-{k}>") for k in range(learned.class_tokens.num_classes)]
  else:
    prompts = [template.format(name) for name in class_names]
  if not prompts:
    raise ValueError("no classes: class_names is empty")
  hidden, _ = conditioning.encode_prompts(text_encoder, tokenizer, prompts, learned, pooling=pooling)
  return hidden
