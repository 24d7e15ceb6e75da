"""Whole checkpoints: a diffusers Stable Diffusion folder and a transformers CLIP folder.

  sd = load_stable_diffusion("stable-diffusion-v1-5/stable-diffusion-v1-5")  # or a local folder
  sd.unet, sd.vae, sd.text_encoder: NNX modules; sd.schedule; sd.tokenizer
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp

from mcti_jax.models import clip, hf_io, schedule, tokenizer, unet, vae

SD_PARTS = hf_io.SD_PARTS  # what a hub download of a pipeline fetches, too


@dataclasses.dataclass
class StableDiffusion:
  unet: unet.UNet2DConditionModel
  vae: vae.AutoencoderKL
  text_encoder: clip.CLIPTextModel
  schedule: schedule.NoiseSchedule
  tokenizer: Any
  source: str

  @property
  def scaling_factor(self) -> float:
    return float(self.vae.config.scaling_factor)

  @property
  def text_width(self) -> int:
    return self.text_encoder.config.hidden_size

  @property
  def latent_scale(self) -> int:
    """Pixels per latent cell (8 for SD)."""
    return 2 ** (len(self.vae.config.block_out_channels) - 1)


def dtype_of(name: str):
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  if name not in dtypes:
    raise ValueError(f"dtype {name!r} is not one of {sorted(dtypes)}")
  return dtypes[name]


def load_stable_diffusion(path_or_hub_id: str | os.PathLike, *, dtype: str = "float32",
                          param_dtype: str = "float32", remat: bool = False,
                          variant: str | None = None) -> StableDiffusion:
  """Load every part of a diffusers pipeline folder (model_index.json + subfolders).

  `variant` (e.g. "fp16") reads the weights files of that name (unet, vae, text_encoder), converted to
  `param_dtype`; a hub id then downloads only those. The text encoder pools at the tokenizer's EOS id (see the
  "Pooling trap" in clip.py).
  """
  folder = hf_io.resolve_folder(path_or_hub_id, variant=variant)
  index = hf_io.read_config(folder, "model_index.json")
  missing = [p for p in SD_PARTS if p not in index or not (folder / p).is_dir()]
  if missing:
    raise hf_io.CheckpointError(f"{folder} is not a complete Stable Diffusion folder: missing {missing}. "
                                f"Expected model_index.json and the subfolders {list(SD_PARTS)}.")
  kw = dict(dtype=dtype_of(dtype), param_dtype=dtype_of(param_dtype), variant=variant)
  text_tokenizer = tokenizer.load_tokenizer(folder, "tokenizer")
  return StableDiffusion(
      unet=unet.from_pretrained(folder, "unet", remat=remat, **kw),
      vae=vae.from_pretrained(folder, "vae", **kw),
      text_encoder=clip.text_from_pretrained(folder, "text_encoder", eos_token_id=text_tokenizer.eos_token_id, **kw),
      schedule=schedule.from_pretrained(folder, "scheduler"),
      tokenizer=text_tokenizer,
      source=str(path_or_hub_id),
  )


def load_clip(path_or_hub_id: str | os.PathLike, *, dtype: str = "float32", param_dtype: str = "float32"):
  """A full transformers CLIP folder: (CLIPModel with both towers and projections, its tokenizer).

  The text tower pools at the tokenizer's EOS id (see the "Pooling trap" in clip.py).
  """
  text_tokenizer = tokenizer.load_tokenizer(path_or_hub_id)
  model = clip.from_pretrained(path_or_hub_id, eos_token_id=text_tokenizer.eos_token_id, dtype=dtype_of(dtype),
                               param_dtype=dtype_of(param_dtype))
  if not isinstance(model, clip.CLIPModel):
    raise hf_io.CheckpointError(f"{path_or_hub_id} holds only one CLIP tower; MC-TI needs a full CLIP folder "
                                "(both towers and projections, e.g. openai/clip-vit-large-patch14).")
  return model, text_tokenizer


def save_stable_diffusion(sd: StableDiffusion, folder: str | os.PathLike, *, save_tokenizer: bool = True) -> None:
  """Write a diffusers pipeline folder that `StableDiffusionPipeline.from_pretrained` loads.

  With save_tokenizer=False the caller writes tokenizer/ itself (the tiny
  models write vocab.json/merges.txt, as real SD folders hold).
  """
  from pathlib import Path
  folder = Path(folder)
  unet.save_pretrained(sd.unet, folder / "unet")
  vae.save_pretrained(sd.vae, folder / "vae")
  clip.save_pretrained(sd.text_encoder, folder / "text_encoder")
  schedule.save_pretrained(sd.schedule, folder / "scheduler")
  if save_tokenizer:
    sd.tokenizer.save_pretrained(str(folder / "tokenizer"))
  hf_io.write_folder(folder, {"model_index.json": model_index()})


def model_index() -> dict[str, Any]:
  return {
      "_class_name": "StableDiffusionPipeline",
      "_diffusers_version": "0.31.0",
      "feature_extractor": [None, None],
      "requires_safety_checker": False,
      "safety_checker": [None, None],
      "scheduler": ["diffusers", "DDIMScheduler"],
      "text_encoder": ["transformers", "CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"],
  }
