"""Tiny CLIP + Stable Diffusion checkpoints in the real Hugging Face layouts.

Real weights can't be downloaded here, so tests (with random weights) and the
demo (pretrained by `mcti pretrain-tiny`) use these. They are written by our
own savers and load through the same `from_pretrained` path as SD 1.5:

  <root>/clip/   transformers CLIPModel folder + tokenizer files
  <root>/sd/     diffusers StableDiffusionPipeline folder (unet, vae, text_encoder = the CLIP text tower, ...)

As in SD 1.x, the SD text encoder is the CLIP text tower itself (same
weights, no projection), so MC-TI's tokens live in one token space.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from flax import nnx

from mcti_jax.models import clip, hf_io, init, pipeline, schedule, tokenizer, unet, vae

RESOLUTION = 16  # pixels; the VAE halves it once -> 8x8x4 latents

# Words the tiny vocabulary learns whole (anything else still tokenizes, by characters).
WORDS = ("a photo of the digit zero one two three four five six seven eight nine "
         "rendering cropped clean dirty dark my cool close-up bright good rendition nice small weird large "
         "handwritten number picture an image "
         "thin bold narrow wide heavy at on top bottom left right leaning").split()


def clip_config(vocab_size: int, width: int = 32, layers: int = 2, heads: int = 4) -> clip.CLIPConfig:
  text = clip.CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                             num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                             hidden_act="quick_gelu", projection_dim=width, eos_token_id=vocab_size - 1,
                             bos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1)
  # 2x2 patches (64 per image): with 4x4 patches (16) CLIP-feat reached 90.6% on the known digits 0-4 of the
  # demo, with 2x2 93.0%, and MC-TI could not keep 90% there; the training step is no slower.
  vision = clip.CLIPVisionConfig(image_size=RESOLUTION, patch_size=2, hidden_size=width, intermediate_size=2 * width,
                                 num_hidden_layers=layers, num_attention_heads=heads, hidden_act="quick_gelu",
                                 projection_dim=width)
  return clip.CLIPConfig(text_config=text, vision_config=vision, projection_dim=width)


def unet_config(context_dim: int = 32) -> unet.UNetConfig:
  return unet.UNetConfig(sample_size=RESOLUTION // 2, block_out_channels=(32, 64), layers_per_block=1,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                         norm_num_groups=8, cross_attention_dim=context_dim)


def vae_config() -> vae.VAEConfig:
  return vae.VAEConfig(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                       sample_size=RESOLUTION, scaling_factor=0.5)


def scheduler_config() -> schedule.SchedulerConfig:
  """SD's training schedule (scaled_linear betas 0.00085 -> 0.012 over 1000 steps)."""
  return schedule.SchedulerConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@dataclasses.dataclass
class TinyModels:
  clip: clip.CLIPModel
  sd: pipeline.StableDiffusion


def load_tiny_tokenizer():
  """The tiny vocabulary, built from WORDS (deterministic)."""
  with tempfile.TemporaryDirectory() as d:
    tokenizer.write_tokenizer_folder(d, list(WORDS))
    return tokenizer.load_tokenizer(d)


def build(seed: int = 0) -> TinyModels:
  """Fresh random tiny models."""
  text_tokenizer = load_tiny_tokenizer()
  clip_model = init.create(lambda: clip.CLIPModel(clip_config(len(text_tokenizer)), rngs=nnx.Rngs(0)), seed)
  sd = pipeline.StableDiffusion(
      unet=init.create(lambda: unet.UNet2DConditionModel(unet_config(), rngs=nnx.Rngs(0)), seed + 1),
      vae=init.create(lambda: vae.AutoencoderKL(vae_config(), rngs=nnx.Rngs(0)), seed + 2),
      text_encoder=text_tower_of(clip_model), schedule=schedule.NoiseSchedule.from_config(scheduler_config()),
      tokenizer=text_tokenizer, source="tiny")
  return TinyModels(clip_model, sd)


def text_tower_of(clip_model: clip.CLIPModel) -> clip.CLIPTextModel:
  """SD's text encoder as the CLIP text tower (shared weights, no projection), as in SD 1.x."""
  text = nnx.eval_shape(lambda: clip.CLIPTextModel(clip_model.config.text_config, rngs=nnx.Rngs(0)))
  text.text_model = clip_model.text_model
  return text


def save(models: TinyModels, root: str | Path, card: str | None = None) -> Path:
  """Write <root>/clip and <root>/sd; both load with our loaders and with transformers/diffusers."""
  root = Path(root)
  models.sd.text_encoder = text_tower_of(models.clip)  # keep the shared tower in sync
  clip.save_pretrained(models.clip, root / "clip")
  tokenizer.write_tokenizer_folder(root / "clip", list(WORDS))
  pipeline.save_stable_diffusion(models.sd, root / "sd", save_tokenizer=False)
  tokenizer.write_tokenizer_folder(root / "sd" / "tokenizer", list(WORDS))
  if card:
    hf_io.write_folder(root / "clip", {"README.md": card.encode()})
    hf_io.write_folder(root / "sd", {"README.md": card.encode()})
  return root


def make_random_checkpoints(root: str | Path, seed: int = 0) -> Path:
  """Random tiny checkpoints (for tests)."""
  return save(build(seed), root)
