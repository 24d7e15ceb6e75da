"""A classifier you bring as a folder: `classifier.json` (what it is) + `classifier.safetensors` (its weights).

Only safetensors are read (never pickle), and the network is a plain list of
layers, so a file says all it does. Load it with
`guides.load(dict(type="file", path=FOLDER))`; write one with `save`.

classifier.json, version 1:

  {
    "format": "mcti-classifier",
    "version": 1,
    "class_names": ["zero", "one", ...],           # one per output, in output order
    "input": {                                     # guides.Transform; every key optional
      "resize": 16,                                # shorter side in pixels, or null (keep the size)
      "crop": [16, 16],                            # centered crop [H, W], or null (whole image)
      "method": "bilinear",                        # of the resize: "bilinear" or "bicubic"
      "grayscale": true,                           # mean over R, G, B -> 1 channel
      "mean": [0.2], "std": [0.3]                  # per channel of the model input (or one for all)
    },
    "layers": [                                    # applied in order to NHWC floats
      {"type": "conv", "name": "conv1", "features": 16, "kernel": 3, "stride": 1, "padding": "SAME"},
      {"type": "relu"},
      {"type": "max_pool", "window": 2},           # "stride" defaults to the window; no padding
      {"type": "global_mean_pool"},                # [B, H, W, C] -> [B, C]
      {"type": "flatten"},                         # [B, H, W, C] -> [B, H*W*C], row-major over H, W, C
      {"type": "dense", "name": "fc", "features": 10}
    ],
    "info": {...}                                  # optional, free-form (where it came from)
  }

Images come in as RGB floats in [0, 1]; the input transform runs first. A
conv's "kernel" is an int or [kh, kw], "stride" an int (default 1),
"padding" "SAME" or "VALID" (TensorFlow/lax conventions). A dense layer needs
a flat input (flatten or global_mean_pool before it), and the last layer must
give [B, len(class_names)]; with flatten, "input.crop" fixes the size.

classifier.safetensors holds float tensors `<name>.kernel` and `<name>.bias`
for every conv and dense layer: a conv kernel HWIO [kh, kw, in, out], a dense
kernel [in, out], a bias [out], and nothing else. From PyTorch: a Conv2d
weight [out, in, kh, kw] is transposed (2, 3, 1, 0), a Linear weight [out, in]
is transposed, and a Linear after torch's flatten (C, H, W order) has its
input rows permuted to (H, W, C).

Loading checks everything against the JSON and names the file, the key and
the fix: a missing folder or file, a wrong format or version, an unknown
layer type, a missing, unused or wrongly shaped tensor, and a last layer
whose size is not the number of classes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcti_jax import paths
from mcti_jax.guides import Classifier, Transform, refuse_nonfinite
from mcti_jax.models import hf_io
from mcti_jax.models.hf_io import CheckpointError

FORMAT, VERSION = "mcti-classifier", 1
CONFIG_NAME, WEIGHTS_NAME = "classifier.json", "classifier.safetensors"
_KEYS = ("format", "version", "class_names", "input", "layers", "info")
_INPUT_KEYS = tuple(f.name for f in dataclasses.fields(Transform))
# layer type -> (required fields, optional fields with their defaults)
LAYER_TYPES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "conv": (("name", "features", "kernel"), {"stride": 1, "padding": "SAME"}),
    "dense": (("name", "features"), {}),
    "relu": ((), {}),
    "max_pool": (("window",), {"stride": None}),
    "global_mean_pool": ((), {}),
    "flatten": ((), {}),
}
PADDINGS = ("SAME", "VALID")


@dataclasses.dataclass(frozen=True)
class Layer:
  """One entry of "layers"; only its type's fields are set."""
  type: str
  name: str | None = None
  features: int | None = None
  kernel: tuple[int, int] | None = None
  stride: int | None = None
  padding: str | None = None
  window: int | None = None

  def to_json(self) -> dict[str, Any]:
    out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
    if self.kernel is not None:
      out["kernel"] = self.kernel[0] if self.kernel[0] == self.kernel[1] else list(self.kernel)
    return out

  def describe(self, index: int) -> str:
    return f"layer {index} ({self.type}{f' {self.name!r}' if self.name else ''})"


def layer(d: Mapping[str, Any], index: int = 0) -> Layer:
  """A layer from its JSON dict; ValueError (naming the layer and the fix) when it is not one."""
  d = dict(d)
  kind = d.pop("type", None)
  if kind not in LAYER_TYPES:
    raise ValueError(f"layers[{index}] has type {kind!r}; layer types: {', '.join(LAYER_TYPES)}")
  required, optional = LAYER_TYPES[kind]
  missing = [k for k in required if d.get(k) is None]
  unknown = sorted(set(d) - set(required) - set(optional))
  if missing or unknown:
    problem = f"needs {missing}" if missing else f"has unknown fields {unknown}"
    raise ValueError(f"layers[{index}] ({kind}) {problem}; its fields: {', '.join(required + tuple(optional))}")
  fields = {**optional, **d}
  if kind == "max_pool" and fields["stride"] is None:
    fields["stride"] = fields["window"]

  def positive_int(key):
    v = fields[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"layers[{index}] ({kind}) {key}={v!r}: expected a positive int")
    return v

  for key in ("features", "stride", "window"):
    if key in fields:
      fields[key] = positive_int(key)
  if "kernel" in fields:
    k = fields["kernel"]
    k = [k, k] if isinstance(k, int) and not isinstance(k, bool) else k
    if not isinstance(k, (list, tuple)) or len(k) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                                             for v in k):
      raise ValueError(f"layers[{index}] ({kind}) kernel={fields['kernel']!r}: expected an int or [kh, kw]")
    fields["kernel"] = tuple(k)
  if "padding" in fields and fields["padding"] not in PADDINGS:
    raise ValueError(f"layers[{index}] ({kind}) padding={fields['padding']!r}: expected one of {PADDINGS}")
  if "name" in fields and (not isinstance(fields["name"], str) or not fields["name"] or "." in fields["name"]):
    raise ValueError(f"layers[{index}] ({kind}) name={fields['name']!r}: expected a non-empty name without dots")
  return Layer(kind, **fields)


def _out_size(size: int | None, kernel: int, stride: int, padding: str) -> int | None:
  if size is None:
    return None
  return math.ceil(size / stride) if padding == "SAME" else (size - kernel) // stride + 1


@dataclasses.dataclass(frozen=True)
class Sequential:
  """The layers as a hashable function (params, model input [B, h, w, c]) -> logits; params {"<name>.kernel": ...}."""
  layers: tuple[Layer, ...]

  def __call__(self, params: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
    for spec in self.layers:
      if spec.type == "conv":
        s = spec.stride
        x = jax.lax.conv_general_dilated(x, params[f"{spec.name}.kernel"], (s, s), spec.padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) + params[f"{spec.name}.bias"]
      elif spec.type == "dense":
        x = x @ params[f"{spec.name}.kernel"] + params[f"{spec.name}.bias"]
      elif spec.type == "relu":
        x = jax.nn.relu(x)
      elif spec.type == "max_pool":
        w, s = spec.window, spec.stride
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, w, w, 1), (1, s, s, 1), "VALID")
      elif spec.type == "global_mean_pool":
        x = x.mean((1, 2))
      elif spec.type == "flatten":
        x = x.reshape(x.shape[0], -1)
    return x

  def weight_shapes(self, channels: int, size: tuple[int, int] | None) -> tuple[dict[str, tuple[int, ...]], int]:
    """({tensor name: shape}, number of outputs) for inputs of `channels` and `size` (None: not fixed).

    ValueError, naming the layer, when the layers do not fit together.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    h, w = size if size is not None else (None, None)
    c, flat = channels, False
    for i, spec in enumerate(self.layers):
      if spec.type in ("conv", "max_pool", "global_mean_pool", "flatten") and flat:
        raise ValueError(f"{spec.describe(i)} needs an image [B, H, W, C] but gets a flat [B, {c}]; "
                         "move it before the flatten / global_mean_pool")
      if spec.type == "conv":
        (kh, kw), s = spec.kernel, spec.stride
        shapes[f"{spec.name}.kernel"], shapes[f"{spec.name}.bias"] = (kh, kw, c, spec.features), (spec.features,)
        h, w, c = _out_size(h, kh, s, spec.padding), _out_size(w, kw, s, spec.padding), spec.features
      elif spec.type == "max_pool":
        h, w = _out_size(h, spec.window, spec.stride, "VALID"), _out_size(w, spec.window, spec.stride, "VALID")
      elif spec.type == "dense":
        if not flat:
          raise ValueError(f"{spec.describe(i)} needs a flat input; put a flatten or global_mean_pool before it")
        shapes[f"{spec.name}.kernel"], shapes[f"{spec.name}.bias"] = (c, spec.features), (spec.features,)
        c = spec.features
      elif spec.type == "global_mean_pool":
        flat = True
      elif spec.type == "flatten":
        if h is None:
          raise ValueError(f"{spec.describe(i)} needs a fixed image size: set input.crop to [H, W]")
        c, flat = h * w * c, True
      if h is not None and min(h, w) < 1:
        raise ValueError(f"{spec.describe(i)} leaves no pixels of the {size[0]}x{size[1]} input; use fewer "
                         "poolings or strides, or a larger input.crop")
    names = [s.name for s in self.layers if s.name]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      raise ValueError(f"layer names {repeated} are used twice; give every conv and dense layer its own name")
    if not flat:
      raise ValueError("the last layer gives an image, not logits [B, classes]; end with a flatten or "
                       "global_mean_pool and a dense layer")
    return shapes, c


def _check(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], json_file, weights_file
           ) -> tuple[Sequential, Transform, tuple[str, ...]]:
  """Everything `load` checks, on the parsed JSON and the tensors; CheckpointError naming the file and the fix."""
  def bad(message, file=json_file):
    return CheckpointError(f"{file}: {message}")

  if not isinstance(config, Mapping):
    raise bad(f"expected a JSON object with {list(_KEYS[:5])}")
  if config.get("format") != FORMAT:
    raise bad(f"format={config.get('format')!r}, expected {FORMAT!r}: this is not an mcti classifier file "
              "(see mcti_jax/guides/file.py for the format)")
  if config.get("version") != VERSION:
    raise bad(f"version={config.get('version')!r}; this mcti_jax reads version {VERSION}. "
              "Write the file with this version's guides.file.save, or update mcti_jax.")
  unknown = sorted(set(config) - set(_KEYS))
  if unknown:
    raise bad(f"unknown keys {unknown}; the keys are {list(_KEYS)} (put anything else under \"info\")")
  names = config.get("class_names")
  if (not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names)
      or len(set(names)) != len(names)):
    raise bad(f"class_names={names!r}: expected a list of distinct non-empty names, one per output")
  inputs = config.get("input", {})
  if not isinstance(inputs, Mapping) or set(inputs) - set(_INPUT_KEYS):
    extra = sorted(set(inputs) - set(_INPUT_KEYS)) if isinstance(inputs, Mapping) else inputs
    raise bad(f"input: unexpected {extra!r}; its keys are {list(_INPUT_KEYS)}")
  try:
    transform = Transform(**inputs)
  except (TypeError, ValueError) as e:
    raise bad(str(e)) from None
  layers = config.get("layers")
  if not isinstance(layers, list) or not layers or not all(isinstance(x, Mapping) for x in layers):
    raise bad("layers: expected a non-empty list of layer objects such as "
              '{"type": "dense", "name": "fc", "features": 10}')
  try:
    net = Sequential(tuple(layer(d, i) for i, d in enumerate(layers)))
    shapes, outputs = net.weight_shapes(transform.channels, transform.crop)
  except ValueError as e:
    raise bad(str(e)) from None
  if outputs != len(names):
    raise bad(f"the last layer gives {outputs} outputs but there are {len(names)} class_names; "
              "they must match one to one")
  missing = sorted(set(shapes) - set(tensors))
  if missing:
    raise bad(f"tensors {missing} are missing; the layers of {Path(json_file).name} need {sorted(shapes)}",
              weights_file)
  unused = sorted(set(tensors) - set(shapes))
  if unused:
    raise bad(f"tensors {unused} belong to no layer; remove them or name their layer in {Path(json_file).name}",
              weights_file)
  for key, shape in shapes.items():
    got = tuple(np.shape(tensors[key]))
    if got != shape:
      hint = " (conv kernels are HWIO [kh, kw, in, out], dense [in, out])" if key.endswith(".kernel") else ""
      raise bad(f"tensor {key!r} has shape {got}, but its layer needs {shape}{hint}", weights_file)
    if np.asarray(tensors[key]).dtype.kind not in "fV":  # V: bfloat16 (ml_dtypes)
      raise bad(f"tensor {key!r} has dtype {tensors[key].dtype}; weights must be floats", weights_file)
  refuse_nonfinite({k: np.asarray(v) for k, v in tensors.items()}, str(weights_file), CheckpointError)
  return net, transform, tuple(names)


def load(folder: str | Path) -> Classifier:
  """The classifier of a folder holding classifier.json and classifier.safetensors (module docstring)."""
  folder = paths.input_folder(folder, "classifier folder", f"a file classifier is a folder holding {CONFIG_NAME} "
                              f"and {WEIGHTS_NAME} (see mcti_jax/guides/file.py)", CheckpointError)
  json_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
  for file in (json_file, weights_file):
    if not file.is_file():
      others = sorted(p.name for p in folder.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt"))
      hint = ""
      if others:
        hint = f" ({', '.join(others)} are not read: pickles can run code; save the weights as safetensors)"
      kind = "is a folder, not a file" if file.exists() else "is missing"
      raise CheckpointError(f"{file} {kind}: a file classifier folder holds {CONFIG_NAME} and {WEIGHTS_NAME}"
                            f"{hint} (see mcti_jax/guides/file.py)")
  try:
    config = json.loads(paths.read_text(json_file, "classifier file", error=CheckpointError))
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{json_file} is not valid JSON: {e}") from None
  tensors, _ = hf_io.read_safetensors(folder, WEIGHTS_NAME)
  net, transform, names = _check(config, tensors, json_file, weights_file)
  params = {k: jnp.asarray(v, jnp.float32) for k, v in tensors.items()}
  return Classifier(params, net, transform, names)


def build(layers: Sequence[Mapping[str, Any] | Layer], params: Mapping[str, Any], class_names: Sequence[str],
          transform: Transform) -> Classifier:
  """A file classifier from its parts, checked as `load` checks a folder."""
  config = _config_json([x if isinstance(x, Layer) else layer(x, i) for i, x in enumerate(layers)], class_names,
                        transform)
  tensors = {k: np.asarray(v) for k, v in params.items()}
  net, transform, names = _check(config, tensors, "classifier", "classifier params")
  return Classifier({k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, net, transform, names)


def init(layers: Sequence[Mapping[str, Any] | Layer], class_names: Sequence[str], transform: Transform,
         seed: int | jax.Array = 0) -> Classifier:
  """Fresh weights for `layers` (He-normal kernels, zero biases), e.g. to train a guide.

  Drawn by NumPy from `seed` (an int or a JAX key): jax.random would compile
  a program per weight shape, seconds on CPU for a few kilobytes.
  """
  net = Sequential(tuple(x if isinstance(x, Layer) else layer(x, i) for i, x in enumerate(layers)))
  shapes, _ = net.weight_shapes(transform.channels, transform.crop)
  if isinstance(seed, jax.Array):
    seed = np.asarray(jax.random.key_data(seed) if jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key)
                      else seed).ravel().tolist()
  rng = np.random.default_rng(seed)
  params = {name: (rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1])) if name.endswith(".kernel")
                   else np.zeros(shape)).astype(np.float32) for name, shape in sorted(shapes.items())}
  return build(net.layers, params, class_names, transform)


def _config_json(layers: Sequence[Layer], class_names: Sequence[str], transform: Transform,
                 info: Mapping[str, Any] | None = None) -> dict[str, Any]:
  inputs = {"resize": transform.resize, "crop": None if transform.crop is None else list(transform.crop),
            "method": transform.method, "grayscale": transform.grayscale, "mean": list(transform.mean),
            "std": list(transform.std)}
  out = {"format": FORMAT, "version": VERSION, "class_names": list(class_names), "input": inputs,
         "layers": [x.to_json() for x in layers]}
  if info:
    out["info"] = dict(info)
  return out


def save(folder: str | Path, classifier: Classifier, *, info: Mapping[str, Any] | None = None,
         extra_files: Mapping[str, Any] | None = None) -> Path:
  """Write classifier.json and classifier.safetensors (and `extra_files`, see hf_io.write_folder) in one step.

  Checked first as `load` checks it, so nothing is written for a classifier
  that would not load. Other files already in `folder` are kept.
  """
  if not isinstance(classifier.apply, Sequential):
    raise TypeError(f"only file classifiers (apply = file.Sequential) can be saved, not {classifier.apply!r}")
  config = _config_json(classifier.apply.layers, classifier.class_names, classifier.transform, info)
  tensors = {k: np.asarray(jax.device_get(v), np.float32) for k, v in classifier.params.items()}
  _check(config, tensors, Path(folder) / CONFIG_NAME, Path(folder) / WEIGHTS_NAME)
  hf_io.write_folder(folder, {CONFIG_NAME: config, WEIGHTS_NAME: hf_io.tensors(tensors), **(extra_files or {})})
  return Path(folder)
