"""Guides: the frozen image classifiers that DCT learns from, as a plug-in (images in [0, 1] -> logits,
differentiable in the images). `config.classifier` names one; `classify/` holds the classifiers made of tokens.

Discriminative Class Tokens learn a token by back-propagating a frozen
classifier's cross-entropy through the images it conditions, so a classifier
here is a pure function of (params, images): it sits inside a jitted, vmapped
or shard_mapped step like any pytree, and `jax.grad` reaches the pixels.

  classifier = load(dict(type="file", path="mcti_jax/assets/tiny/guide_digits"))
  classifier = load(dict(type="clip_zeroshot", clip_path=..., class_names=("cat", "dog")))
  classifier = load(dict(type="clip_tokens", clip_path=..., export="runs/x/export/mcti"))
  logits = classifier(images)                       # [B, H, W, 3] in [0, 1] -> [B, C]
  labels = classifier.index_of(run_class_names)     # where the run's classes sit among its outputs

Types: "file" (a folder a user brings, format in `file.py`), "clip_zeroshot"
(CLIP with class names in a template, `clip_zeroshot.py`), "clip_tokens"
(CLIP with the learned tokens of an `mcti train` export, `clip_tokens.py`).
Every type refuses weights (or tokens) holding NaN or inf at load, naming the
file and the tensor (`refuse_nonfinite`).

May import: errors, paths, models, tokens, classify.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mcti_jax.errors import ConfigError

RESIZE_METHODS = ("bilinear", "bicubic")


@dataclasses.dataclass(frozen=True)
class Transform:
  """A classifier's input transform: [optional grey] -> resize the shorter side -> center crop -> normalise.

  Frozen and hashable (it is static in a jitted step). The resize follows
  `clip.preprocess`: the shorter side becomes `resize`, the longer
  int(resize * long / short), with `jax.image.resize(antialias=True)`;
  images already that size are not resized. `mean`/`std` hold one value per
  output channel (1 with `grayscale`, else 3) or one for all.
  """
  resize: int | None = None  # shorter side, in pixels; None keeps the size
  crop: tuple[int, int] | None = None  # (H, W) of the centered crop; None keeps the whole image
  method: str = "bilinear"  # of the resize: "bilinear" or "bicubic" (CLIP's)
  grayscale: bool = False  # the mean over R, G, B as the one channel
  mean: tuple[float, ...] = (0.0,)
  std: tuple[float, ...] = (1.0,)

  def __post_init__(self):
    crop = None if self.crop is None else tuple(int(c) for c in self.crop)
    object.__setattr__(self, "crop", crop)
    object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
    object.__setattr__(self, "std", tuple(float(s) for s in self.std))
    if self.resize is not None and (isinstance(self.resize, bool) or not isinstance(self.resize, int)
                                    or self.resize < 1):
      raise ValueError(f"input resize={self.resize!r}: expected a positive int (the shorter side) or null")
    if crop is not None and (len(crop) != 2 or min(crop) < 1):
      raise ValueError(f"input crop={self.crop!r}: expected [height, width] in pixels, or null")
    if self.method not in RESIZE_METHODS:
      raise ValueError(f"input method={self.method!r}: expected one of {RESIZE_METHODS}")
    for name in ("mean", "std"):
      values = getattr(self, name)
      if len(values) not in (1, self.channels):
        raise ValueError(f"input {name} has {len(values)} values; expected 1 or {self.channels} (one per channel of "
                         f"the {'grey' if self.grayscale else 'RGB'} input)")
    if min(self.std) <= 0:
      raise ValueError(f"input std={list(self.std)} must be positive")

  @property
  def channels(self) -> int:
    """Channels of the model input."""
    return 1 if self.grayscale else 3

  def __call__(self, images) -> jax.Array:
    """Images [B, H, W, 3] (floats in [0, 1], or uint8) -> model input [B, h, w, channels] (pure jnp)."""
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"a classifier takes RGB images [B, H, W, 3], got shape {images.shape}")
    x = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images.astype(jnp.float32)
    if self.grayscale:
      x = x.mean(-1, keepdims=True)
    b, h, w, c = x.shape
    if self.resize is not None:
      short, long = min(h, w), max(h, w)
      new_long = int(self.resize * long / short)
      new_h, new_w = (self.resize, new_long) if h <= w else (new_long, self.resize)
      if (new_h, new_w) != (h, w):
        x = jax.image.resize(x, (b, new_h, new_w, c), method=self.method, antialias=True)
        h, w = new_h, new_w
    if self.crop is not None:
      ch, cw = self.crop
      if ch > h or cw > w:
        raise ValueError(f"images of {h}x{w} (after the resize) are smaller than the classifier's crop {ch}x{cw}; "
                         "give it larger images or set input.resize")
      top, left = (h - ch) // 2, (w - cw) // 2
      x = x[:, top:top + ch, left:left + cw]
    return (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)


@struct.dataclass
class Classifier:
  """A frozen image classifier: images [B, H, W, 3] in [0, 1] -> logits [B, C]; differentiable in the images."""
  params: Any  # pytree of arrays (weights, Frozen CLIP towers, text features)
  apply: Callable = struct.field(pytree_node=False)  # hashable (params, model_input) -> logits [B, C]
  transform: Transform = struct.field(pytree_node=False)
  class_names: tuple[str, ...] = struct.field(pytree_node=False)

  def __call__(self, images) -> jax.Array:
    return self.apply(self.params, self.transform(images))

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def index_of(self, names: Sequence[str]) -> np.ndarray:
    """The output index [len(names)] of each named class, e.g. a run's classes among a guide's outputs."""
    position = {name: i for i, name in enumerate(self.class_names)}
    unknown = [n for n in names if n not in position]
    if unknown:
      raise ConfigError(f"classes {unknown} are not among the classifier's classes {list(self.class_names)}; "
                        "name the run's classes as the classifier does")
    return np.asarray([position[n] for n in names], np.int32)


# type -> (required fields, optional fields) of its spec
TYPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "file": (("path",), ()),
    "clip_zeroshot": (("clip_path",), ("class_names", "template", "dtype")),
    "clip_tokens": (("clip_path", "export"), ("template", "pooling", "dtype")),
}


def load(spec: Mapping[str, Any], *, class_names: Sequence[str] | None = None,
         where: str = "classifier") -> Classifier:
  """The classifier a spec names, e.g. dict(type="file", path=...); `where` names the spec in errors.

  `class_names` are the run's classes: clip_zeroshot uses them when the spec
  has none; for the other types each must be one of the classifier's (see
  `Classifier.index_of`), so a run and its guide cannot silently disagree.
  """
  spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
  kind = spec.pop("type", None)
  if kind not in TYPES:
    raise ConfigError(f"{where}.type={kind!r}; classifier types: {', '.join(TYPES)}")
  required, optional = TYPES[kind]
  missing = [f for f in required if spec.get(f) in (None, "")]
  if missing:
    raise ConfigError(f"{where} ({kind}) needs {', '.join(missing)}; e.g. "
                      f"{dict(type=kind, **{f: '...' for f in required})}")
  unknown = sorted(set(spec) - set(required) - set(optional))
  if unknown:
    raise ConfigError(f"{where} ({kind}) has no fields {unknown}; it has: type, {', '.join(required + optional)}")
  if kind == "clip_zeroshot" and spec.get("class_names") is None:
    if class_names is None:
      raise ConfigError(f"{where} (clip_zeroshot) needs class_names: set {where}.class_names to the names to put in "
                        "the template, e.g. ('cat', 'dog')")
    spec["class_names"] = tuple(class_names)
  module = importlib.import_module(f"mcti_jax.guides.{kind}")
  if kind == "file":
    classifier = module.load(spec["path"])
  else:
    classifier = module.load(**spec, where=where)
  if class_names is not None and kind != "clip_zeroshot":
    classifier.index_of(list(class_names))
  return classifier


def refuse_nonfinite(tensors: Mapping[str, Any], where: str, error: type[Exception] = ConfigError) -> None:
  """Refuse weights holding NaN or inf at load: a classifier's NaN logits would train tokens to NaN (and argmax of
  NaN picks class 0). `tensors` maps names to NumPy arrays (checked on the host) or JAX arrays (reduced where they
  are, in one program); non-float tensors are skipped."""
  names = [n for n, x in tensors.items() if jnp.issubdtype(x.dtype, jnp.floating)]
  arrays = [tensors[n] for n in names]
  if all(isinstance(x, np.ndarray) for x in arrays):
    nan = [bool(np.isnan(np.asarray(x, np.float32)).any()) for x in arrays]
    inf = [bool(np.isinf(np.asarray(x, np.float32)).any()) for x in arrays]
  else:
    nan, inf = (np.asarray(v).tolist() for v in _nan_inf(arrays))
  bad = [(n, "nan" if a else "inf") for n, a, b in zip(names, nan, inf) if a or b]
  if bad:
    more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
    raise error(f"{where}: tensor {bad[0][0]!r} holds {bad[0][1]}{more}; a classifier with non-finite weights gives "
                "NaN logits, which would train NaN tokens. Fix the weights (or the export that made them)")


@jax.jit
def _nan_inf(arrays):
  return (jnp.stack([jnp.isnan(x).any() for x in arrays]), jnp.stack([jnp.isinf(x).any() for x in arrays]))


def module_tensors(module) -> dict[str, jax.Array]:
  """An nnx module's weights by dotted name ('visual_projection.kernel'), as `refuse_nonfinite` names them."""
  from flax import nnx
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(module))[0]:
    keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
    out[".".join(str(k) for k in (keys[:-1] if keys[-1] == "value" else keys))] = leaf
  return out


def resolve_templates(template: str | Sequence[str], where: str) -> tuple[str, ...]:
  """A template, its name (T1-T3 of MC-TI's study, 'ti' for the TI list) or a list (prompt ensemble)."""
  from mcti_jax.tokens import placeholders as tok
  from mcti_jax.classify import clip_head
  if isinstance(template, str):
    template = clip_head.TEMPLATES.get(template, template)
  try:
    return tok.templates(template)
  except ValueError as e:
    raise ConfigError(f"{where}.template: {e}") from None
