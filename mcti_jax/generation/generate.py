"""Images from prompts (with learned class tokens), on a mesh; PNGs. `mcti generate` is command.py.

  sd = pipeline.load_stable_diffusion("stable-diffusion-v1-5/stable-diffusion-v1-5")
  learned = LearnedTokens.from_export("runs/pets/export/mcti", sd.tokenizer, sd.text_width)
  images = generate(sd, ["a photo of a <cls-3> on the beach"], learned=learned, num_images_per_prompt=8)

The sampler itself (DDIM + classifier-free guidance, as diffusers) is the pure
core in `sampling.py`. Here it runs with the VAE decode as one jitted program,
the images split over the devices of a mesh. Image i starts from the noise of
`fold_in(key(seed), i)`, so results don't depend on the device count or the
batch size. MC-TI's generation metric is in `clip_similarity.py`.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mcti_jax.tokens import conditioning
from mcti_jax.runtime import parallel
from mcti_jax.generation import sampling
from mcti_jax.tokens import placeholders as tok
from mcti_jax.tokens.conditioning import LearnedTokens
from mcti_jax.models import hf_io
from mcti_jax.models import vae as vae_lib
from mcti_jax.models.frozen import Frozen, freeze

CLASS_PROMPT = "a photo of a {}"  # MC-TI's generation metric prompt


# ------------------------------------------------------------------ images on a mesh


def to_uint8(images) -> np.ndarray:
  """[0, 1] floats -> uint8, rounded (as diffusers' numpy_to_pil)."""
  return np.round(np.asarray(images, np.float32) * 255).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _sampler(mesh, use_cfg: bool, latent_shape: tuple[int, int, int]):
  """One jitted program: noise -> DDIM -> decode, the images split over the mesh."""

  def local(unet: Frozen, vae: Frozen, schedule, timesteps, context, uncond_context, indices, seed, guidance):
    latents = sampling.initial_latents(seed, indices, latent_shape)
    latents = sampling.denoise(unet.module, schedule, latents, context, uncond_context, timesteps, guidance,
                               use_cfg=use_cfg)
    return vae_lib.decode_images(vae.module, latents)

  axis = parallel.CLASS_AXIS  # the mesh's one axis; here it splits images
  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), P(), P(axis), P(), P(axis), P(), P()),
                          out_specs=P(axis), check_vma=False)
  return jax.jit(sharded)


def latent_shape(sd, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
  """(h, w, c) of the latents; the image size defaults to the UNet's sample_size x the VAE's scale."""
  scale = sd.latent_scale
  size = sd.unet.config.sample_size
  if isinstance(size, (tuple, list)):
    default_h, default_w = (int(s) * scale for s in size)
  else:
    default_h = default_w = None if size is None else int(size) * scale
  height, width = height or default_h, width or default_w
  if height is None or width is None:
    raise ValueError("the UNet config has no sample_size: pass height and width")
  if height % scale or width % scale:
    raise ValueError(f"height and width must be multiples of {scale} (the VAE's scale), not {height}x{width}")
  return height // scale, width // scale, sd.unet.config.in_channels


def generate(sd, prompts: list[str], *, learned: LearnedTokens | None = None, num_images_per_prompt: int = 1,
             steps: int = 50, guidance: float = 7.5, seed: int = 0, mesh=None, height: int | None = None,
             width: int | None = None, batch_size: int | None = None, output_type: str = "uint8") -> np.ndarray:
  """Images [len(prompts) * num_images_per_prompt, H, W, 3], prompt after prompt.

  output_type "uint8" (default) or "float" ([0, 1], before rounding).
  batch_size caps how many images run at once (rounded up to a multiple of
  the device count); the images don't depend on it.
  """
  if isinstance(prompts, str):
    prompts = [prompts]
  if not prompts or num_images_per_prompt < 1:
    raise ValueError("need at least one prompt and num_images_per_prompt >= 1")
  if output_type not in ("uint8", "float"):
    raise ValueError(f"output_type must be 'uint8' or 'float', not {output_type!r}")
  sampling.check_sampler(sd.schedule.config)
  mesh = mesh or parallel.make_mesh()
  shape = latent_shape(sd, height, width)
  timesteps = jnp.asarray(sampling.ddim_timesteps(sd.schedule.config, steps))

  text = freeze(sd.text_encoder)
  contexts = conditioning.encode_prompts(text, sd.tokenizer, list(prompts), learned)[0]
  uncond = conditioning.encode_prompts(text, sd.tokenizer, [""])[0]

  num_images = len(prompts) * num_images_per_prompt
  devices = mesh.devices.size
  chunk = -(-min(batch_size or num_images, num_images) // devices) * devices
  total = -(-num_images // chunk) * chunk
  prompt_of = np.repeat(np.arange(len(prompts)), num_images_per_prompt)
  prompt_of = np.concatenate([prompt_of, np.zeros(total - num_images, prompt_of.dtype)])

  replicated = parallel.replicated(mesh)
  unet, vae = jax.device_put((freeze(sd.unet), freeze(sd.vae)), replicated)
  schedule, timesteps, uncond = jax.device_put((sd.schedule, timesteps, uncond), replicated)
  sample = _sampler(mesh, guidance > 1, shape)
  out = []
  for start in range(0, total, chunk):
    indices = np.arange(start, start + chunk, dtype=np.int32)
    images = sample(unet, vae, schedule, timesteps, contexts[prompt_of[indices]], uncond, indices,
                    np.uint32(seed), np.float32(guidance))
    out.append(np.asarray(jax.device_get(images)))
  images = np.concatenate(out)[:num_images]
  return to_uint8(images) if output_type == "uint8" else images


def class_prompts(learned: LearnedTokens, template: str = CLASS_PROMPT) -> list[str]:
  """'a photo of a <cls-k>' for every class k."""
  template = tok.templates(template)[0]
  return [template.format(f"<cls-{k}>") for k in range(learned.class_tokens.num_classes)]


def generate_class_images(sd, learned: LearnedTokens, num_images: int, template: str = CLASS_PROMPT,
                          **kwargs) -> np.ndarray:
  """uint8 images [K, num_images, H, W, 3] of every class (the generation metric's input)."""
  images = generate(sd, class_prompts(learned, template), learned=learned, num_images_per_prompt=num_images,
                    **kwargs)
  return images.reshape(learned.class_tokens.num_classes, num_images, *images.shape[1:])


# ------------------------------------------------------------------ files


def png(image: np.ndarray) -> bytes:
  """uint8 image [H, W, 3] -> PNG file bytes (for hf_io.write_folder)."""
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def save_images(images: np.ndarray, folder: str | Path, prefix: str = "image") -> list[Path]:
  """Write uint8 images [B, H, W, 3] as <folder>/<prefix>_0000.png ...; each file appears whole or not at all."""
  names = [f"{prefix}_{i:04d}.png" for i in range(len(images))]
  hf_io.write_folder(folder, {name: png(image) for name, image in zip(names, images)})
  return [Path(folder) / name for name in names]
