"""Read and write Hugging Face checkpoint folders (config.json + safetensors).

Our Flax modules name their attributes exactly like the torch modules of
diffusers/transformers, so an NNX parameter path maps to a torch state-dict key
by joining it with dots and renaming the leaf (kernel/scale/embedding ->
weight). The only layout change is the kernel transpose:

  Linear  torch [out, in]           <-> flax [in, out]
  Conv2d  torch [out, in, kh, kw]   <-> flax [kh, kw, in, out]

Everything here is model-agnostic; a model-specific key rename (old names in
old checkpoints) is passed in as a `renames` function by the model's loader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from mcti_jax.errors import MctiError

# Flax leaf name -> torch leaf name.
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


class CheckpointError(MctiError):
  """A checkpoint folder, file or tensor is missing or does not fit the model."""


# ---------------------------------------------------------------- key mapping


def torch_key(path: tuple[Any, ...]) -> str:
  """('down_blocks', 0, 'resnets', 1, 'conv1', 'kernel') -> 'down_blocks.0.resnets.1.conv1.weight'."""
  *parents, leaf = (str(p) for p in path)
  return ".".join([*parents, _LEAF_TO_TORCH.get(leaf, leaf)])


def to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  return value


def from_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  return value


# ------------------------------------------------------------ files and folders


def resolve_folder(path_or_hub_id: str | os.PathLike, subfolder: str | None = None, *,
                   variant: str | None = None) -> Path:
  """A local folder as it is; otherwise a hub id, of which only the files the loaders read are downloaded.

  `hub_files` says which: for the repo root of a pipeline, model_index.json and the parts in SD_PARTS; the
  weights of `variant` (e.g. "fp16") when given. A local folder is not checked for the variant here; the
  loader that reads the weights is.
  """
  path = Path(path_or_hub_id).expanduser()
  if not path.exists():
    repo_id = str(path_or_hub_id)
    looks_like_hub_id = repo_id.count("/") == 1 and not repo_id.startswith((".", "/", "~"))
    if not looks_like_hub_id:
      raise CheckpointError(f"checkpoint folder {path} does not exist. Pass a local folder or a Hugging Face hub id "
                            "such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'.")
    path = _download(repo_id, subfolder, variant)
  if subfolder:
    path = path / subfolder
  if not path.is_dir():
    raise CheckpointError(f"{path} is not a folder. A diffusers pipeline folder has model_index.json and the "
                          "subfolders unet/, vae/, text_encoder/, tokenizer/, scheduler/.")
  return path


def _download(repo_id: str, subfolder: str | None, variant: str | None) -> Path:
  """List the repo's files, select what the loaders read (`hub_files`), download only those."""
  import huggingface_hub
  try:
    patterns = hub_files(_list_hub_files(repo_id), subfolder, variant, repo_id=repo_id)
    return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
  except CheckpointError:
    raise
  except Exception as e:  # no network, unknown repo, gated repo...
    # One line of the hub's error: its chain through httpx is ~100 lines that say only this.
    summary = next((line.strip() for line in str(e).splitlines() if line.strip()), "").rstrip(".")
    raise CheckpointError(f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: "
                          f"{summary}). Pass a local folder instead: download it where the hub is reachable "
                          f"(`hf download {repo_id} --local-dir DIR`; only its configs, tokenizer files and "
                          "safetensors weights are read) and pass DIR.") from None


def _list_hub_files(repo_id: str) -> list[str]:
  """The repo's file paths from the hub; offline, the listing that an earlier download cached (if any)."""
  import huggingface_hub
  try:
    return [s.rfilename for s in huggingface_hub.HfApi().model_info(repo_id).siblings]
  except Exception as error:
    if not hasattr(huggingface_hub, "get_cached_repo_tree"):  # older huggingface_hub: no cached listing
      raise
    try:
      return [f.path for f in huggingface_hub.get_cached_repo_tree(repo_id)]
    except Exception:
      raise error from None


# Which files each loader reads: a diffusers pipeline reads these parts of it (pipeline.load_stable_diffusion).
SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
CONFIG_NAMES = ("model_index.json", "config.json", "scheduler_config.json")
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")  # diffusers, transformers
# transformers' CLIPTokenizer reads these where the folder has them (tokenizer.json: its fast backend).
TOKENIZER_NAMES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


def weights_names(weights_name: str, variant: str | None = None) -> tuple[str, str]:
  """The single file and the shard index of `weights_name`, named as diffusers/transformers name a variant.

  ('model.safetensors', 'fp16') -> ('model.fp16.safetensors', 'model.safetensors.index.fp16.json'); its shards
  are 'model.fp16-00001-of-00002.safetensors', ... (named in the index).
  """
  def add_variant(name: str) -> str:
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}" if variant else name
  return add_variant(weights_name), add_variant(f"{weights_name}.index.json")


def hub_files(files: Iterable[str], subfolder: str | None = None, variant: str | None = None, *,
              repo_id: str = "the hub repo") -> list[str]:
  """The files of a hub repo (`files`: every path, as the hub lists them) that the loaders read from `subfolder`.

  Why: a Stable Diffusion repo holds ~44 GB (single-file checkpoints, .bin/.ckpt pickles, fp16 and non_ema
  variants, a safety checker); the loaders read ~4 GB of it. The repo root of a pipeline (model_index.json)
  means the root and SD_PARTS; any other folder means itself. From each: its config, the tokenizer files it
  has, and beside a config.json one safetensors weights file (or a shard index and its shards), of `variant`
  when given. A variant the folder lacks, or weights only as pickles, is a CheckpointError naming what is there.
  """
  files = sorted(set(files))
  root = (subfolder or "").strip("/")
  folders = [root, *SD_PARTS] if not root and "model_index.json" in files else [root]
  selected = []
  for folder in folders:
    prefix = f"{folder}/" if folder else ""
    here = [f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]]
    names = [n for n in (*CONFIG_NAMES, *TOKENIZER_NAMES) if n in here]
    if "config.json" in here:
      names += _weights_files(here, f"{repo_id}/{prefix}", variant)
    if not names:
      raise CheckpointError(f"{repo_id}/{prefix} holds none of the files the loaders read "
                            f"({', '.join((*CONFIG_NAMES, *TOKENIZER_NAMES))}).")
    selected += [prefix + n for n in names]
  return selected


def _weights_files(here: list[str], where: str, variant: str | None) -> list[str]:
  for weights_name in WEIGHTS_NAMES:
    single, index = weights_names(weights_name, variant)
    if single in here:
      return [single]
    if index in here:
      shard = re.escape(single.rsplit(".", 1)[0]) + r"-\d+-of-\d+\.safetensors"
      return [index, *(n for n in here if re.fullmatch(shard, n))]
  present = [n for n in here if n.endswith(".safetensors")] or "none"
  if variant:
    raise CheckpointError(f"{where} has no weights of variant {variant!r} (its safetensors files: {present}). "
                          "Ask for a variant that is there, or none for the full-precision weights.")
  raise CheckpointError(f"{where} has no {' or '.join(WEIGHTS_NAMES)} (its safetensors files: {present}). Only "
                        "safetensors weights are read, never .bin/.ckpt pickles.")


def read_config(folder: Path, name: str = "config.json") -> dict[str, Any]:
  file = folder / name
  if not file.is_file():
    raise CheckpointError(f"{file} is missing: a Hugging Face model folder holds its {name} beside the weights.")
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{file} is not valid JSON: {e}") from e


def read_safetensors(folder: Path, weights_name: str, variant: str | None = None) -> tuple[dict[str, np.ndarray], Path]:
  """All tensors of `weights_name` (or its sharded index) as numpy arrays, and the file they came from."""
  from safetensors.numpy import load_file

  single_name, index_name = weights_names(weights_name, variant)
  single, index = folder / single_name, folder / index_name
  if single.is_file():
    files = [single]
  elif index.is_file():
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    files = [folder / s for s in shards]
  else:
    present = sorted(p.name for p in folder.glob("*.safetensors")) or "none"
    raise CheckpointError(f"{single} is missing (safetensors files in that folder: {present}). Only safetensors weights "
                          "are read; convert a .bin checkpoint with diffusers/transformers `save_pretrained` first.")
  tensors: dict[str, np.ndarray] = {}
  for f in files:
    try:
      tensors.update(_load_any_dtype(f, load_file))
    except Exception as e:
      raise CheckpointError(f"could not read {f}: {type(e).__name__}: {e}") from e
  return tensors, single if single.is_file() else index


def _load_any_dtype(file: Path, load_file) -> dict[str, np.ndarray]:
  # numpy has no bfloat16; read those through the flax backend (ml_dtypes) instead.
  try:
    return load_file(file)
  except TypeError:
    from safetensors.flax import load_file as load_flax
    return {k: np.asarray(v) for k, v in load_flax(file).items()}


@contextlib.contextmanager
def staged_folder(folder: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
  """Yield an empty temporary sibling of `folder` to write into; when the block ends normally, move it into place.

  The one way this project writes files so that a crash never leaves a
  half-written one. A new `folder` appears in one rename. Otherwise each
  staged file replaces its namesake (others in `folder` are kept), unless
  `replace`: then the staged folder takes the old one's place whole (a crash
  leaves the old folder, or for an instant none, never a mix). If the block
  raises, nothing moves and the staging folder is removed. Folders get the
  permissions the umask gives, as any other new folder.
  """
  folder = Path(folder)
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
  os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700: others on a shared machine could not read it
  try:
    yield tmp
    if replace and folder.exists():
      old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
      folder.rename(old / folder.name)
      tmp.rename(folder)
      shutil.rmtree(old, ignore_errors=True)
      return
    if not folder.exists():
      tmp.rename(folder)
      return
    for staged in sorted(p for p in tmp.rglob("*") if not p.is_dir()):
      target = folder / staged.relative_to(tmp)
      target.parent.mkdir(parents=True, exist_ok=True)
      os.replace(staged, target)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def write_folder(folder: str | os.PathLike, files: Mapping[str, bytes | dict | Mapping[str, np.ndarray]], *,
                 replace: bool = False) -> None:
  """Write files into `folder` so that a crash never leaves a half-written file (see `staged_folder`).

  A value is bytes (written as is), `tensors(...)` (safetensors) or any
  JSON-able dict. Existing files not named here are kept, unless `replace`:
  then `folder` holds exactly these files afterwards.
  """
  with staged_folder(folder, replace=replace) as tmp:
    for name, content in files.items():
      target = tmp / name
      target.parent.mkdir(parents=True, exist_ok=True)
      if isinstance(content, bytes):
        target.write_bytes(content)
      elif isinstance(content, Mapping) and "__tensors__" in content:
        save_safetensors(target, content["__tensors__"])
      else:
        target.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def save_safetensors(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  """Write a safetensors file with the mode the umask gives.

  safetensors' save_file creates its file 0600, so on a shared machine others could read the manifest beside
  it but not load the tokens; every safetensors file this project writes goes through here. Atomicity is
  write_folder's: it writes into a staged folder and moves that into place whole.
  """
  from safetensors.numpy import save_file

  arrays = {k: np.require(v, requirements="C") for k, v in arrays.items()}  # keeps 0-d
  save_file(arrays, str(path), metadata={"format": "pt"})
  os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
  """The process's umask, read without setting it where Linux says it (setting it races other threads' files)."""
  try:
    with open("/proc/self/status") as status:
      for line in status:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0)
  os.umask(mask)
  return mask


def tensors(state_dict: Mapping[str, np.ndarray]) -> dict:
  """Mark a torch-layout state dict to be written as safetensors by `write_folder`."""
  return {"__tensors__": state_dict}


# -------------------------------------------------------------- state <-> torch


def state_to_torch(state: nnx.State, dtype: Any = np.float32) -> dict[str, np.ndarray]:
  """Our parameters as a torch-layout state dict of numpy arrays."""
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  out = {}
  for path, value in flat.items():
    value = np.asarray(jax.device_get(value)).astype(dtype)
    out[torch_key(path)] = to_torch_layout(str(path[-1]), value)
  return out


def torch_to_state(abstract_state: nnx.State, state_dict: Mapping[str, np.ndarray], source: str | os.PathLike,
                   *, prefix: str = "", renames: Callable[[str], str] | None = None,
                   dtype: Any = None) -> nnx.State:
  """Fill an abstract NNX state (from `nnx.eval_shape`) with tensors of a torch state dict.

  `prefix` is prepended to every key (e.g. 'text_model.'), `renames` maps a
  checkpoint key to the name we use (for old key names). Missing keys and shape
  mismatches raise a `CheckpointError` naming `source` and the key.
  """
  if renames is not None:
    state_dict = {renames(k): v for k, v in state_dict.items()}
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(abstract_state))
  filled, missing = {}, []
  for path, spec in flat.items():
    key = prefix + torch_key(path)
    if key not in state_dict:
      missing.append(key)
      continue
    value = from_torch_layout(str(path[-1]), np.asarray(state_dict[key]))
    if value.shape != tuple(spec.shape):
      torch_shape = np.asarray(state_dict[key]).shape
      raise CheckpointError(f"{source}: tensor {key!r} has shape {torch_shape}, but the model built from its config "
                            f"expects {to_torch_layout(str(path[-1]), np.empty(spec.shape)).shape}. Check that the "
                            "config.json beside it belongs to these weights.")
    filled[path] = jnp.asarray(value, dtype=dtype or spec.dtype)
  if missing:
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise CheckpointError(f"{source}: {len(missing)} tensors the model needs are missing: {shown}. "
                          "Is this the right checkpoint (and subfolder) for this model?")
  nnx.replace_by_pure_dict(abstract_state, traverse_util.unflatten_dict(filled))
  return abstract_state


def config_fields(cls, d: Mapping[str, Any]) -> dict[str, Any]:
  """The fields of the config dataclass `cls` that `d` (a config.json) holds; lists become tuples (hashable).

  Keys we don't model (and `_`-prefixed ones) are ignored.
  """
  def tuples(v):
    return tuple(tuples(x) for x in v) if isinstance(v, (list, tuple)) else v
  names = {f.name for f in dataclasses.fields(cls)}
  return {k: tuples(v) for k, v in d.items() if k in names}


def config_json(config) -> dict[str, Any]:
  """A config dataclass as config.json fields (tuples back to lists)."""
  def lists(v):
    return [lists(x) for x in v] if isinstance(v, (list, tuple)) else v
  return {k: lists(v) for k, v in dataclasses.asdict(config).items()}


def unsupported(source: str | os.PathLike, key: str, value: Any, supported: str) -> CheckpointError:
  """An error for a config value we don't implement, naming the file and the key."""
  return CheckpointError(f"{source}: {key}={value!r} is not supported (supported: {supported}).")


# ------------------------------------------------------------ whole models


def load_model(build: Callable[[], nnx.Module], folder: Path, weights_name: str, *, prefix: str = "",
               renames: Callable[[str], str] | None = None, param_dtype: Any = None,
               variant: str | None = None) -> nnx.Module:
  """Build a module's shapes without allocating (`nnx.eval_shape`) and fill them from safetensors."""
  graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
  state_dict, file = read_safetensors(folder, weights_name, variant)
  state = torch_to_state(abstract_state, state_dict, file, prefix=prefix, renames=renames, dtype=param_dtype)
  return nnx.merge(graphdef, state)


def save_model(model: nnx.Module, folder: str | os.PathLike, config: dict[str, Any], weights_name: str,
               *, prefix: str = "", extra_files: Mapping[str, Any] | None = None) -> None:
  """Write `config.json` and the weights in torch layout, so diffusers/transformers load the folder."""
  state_dict = {prefix + k: v for k, v in state_to_torch(nnx.state(model, nnx.Param)).items()}
  write_folder(folder, {"config.json": config, weights_name: tensors(state_dict), **(extra_files or {})})
