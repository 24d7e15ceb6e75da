"""The model card of the tiny checkpoint: what it saw, what it is, how it was trained (from the run's stats)."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from mcti_jax.tiny import checkpoints as tiny_checkpoints
from mcti_jax.tiny.captions import KNOWN_DIGITS


def _num_params(module) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(module))))


def model_card(models: tiny_checkpoints.TinyModels, stats: dict[str, Any]) -> str:
  """README.md of clip/ and sd/: data, split, models, settings, losses and times of the run in `stats`."""
  sched, sec, losses = stats["schedule"], stats["seconds"], stats["losses"]
  c = models.clip.config
  sizes = {"CLIP": _num_params(models.clip), "UNet": _num_params(models.sd.unet), "VAE": _num_params(models.sd.vae)}
  last = {phase: stats["curves"][phase][-1] for phase in stats["curves"]}
  return f"""# Tiny CLIP + latent diffusion model on sklearn digits (mcti-jax demo)

Made by `mcti pretrain-tiny --seed {stats['seed']}` (mcti_jax/tiny/, mcti_jax/configs/tiny_pretrain.py): our own JAX/Flax models,
saved in the Hugging Face layouts (`clip/`: transformers CLIPModel; `sd/`: diffusers
StableDiffusionPipeline whose text encoder is the CLIP text tower). Not a real model: a stand-in
for Stable Diffusion 1.x + CLIP that trains on CPU in minutes.

## Data and split
sklearn's `load_digits` (8x8, upsampled to 16x16 RGB); per digit a fixed random half is "pretrain",
the rest "heldout" (`mcti_jax.data.digits_split`). Pretraining saw ONLY the {stats['num_images']}
pretraining-half images of digits {', '.join(map(str, KNOWN_DIGITS))}, with captions that name them
("a photo of the digit three", the Textual Inversion templates with "three" or "digit three", ...),
each of the image's shape attributes (ink, width, vertical and horizontal skew, slant; the outer thirds
get words such as "bold", "narrow", "heavy at the top", "leaning left") added with probability
{sched['clip_attribute_p']}. Digits 5-9 never appeared: not as images, not as words (their words are in the
vocabulary, untrained).

## Models
- CLIP: ViT {c.vision_config.image_size}px / patch {c.vision_config.patch_size}, width {c.vision_config.hidden_size},
  {c.vision_config.num_hidden_layers} layers; text width {c.text_config.hidden_size}, {c.text_config.num_hidden_layers} layers,
  vocabulary {c.text_config.vocab_size}; projection {c.projection_dim}. {sizes['CLIP']:,} parameters.
- VAE: 16x16x3 -> {16 // models.sd.latent_scale}x{16 // models.sd.latent_scale}x{models.sd.vae.config.latent_channels} latents, scaling_factor {models.sd.vae.config.scaling_factor}. {sizes['VAE']:,} parameters.
- UNet: channels {models.sd.unet.config.block_out_channels}, cross-attention on the text tower's last hidden states.
  {sizes['UNet']:,} parameters. Scheduler: SD's scaled_linear betas 0.00085-0.012, 1000 steps, epsilon.

## Training (seed {stats['seed']})
- CLIP: {sched['clip_steps']} steps x {sched['clip_batch']} images, AdamW lr {sched['clip_lr']}; contrastive loss whose
  targets are all images a caption describes (digit and mentioned attributes), images shifted by up to
  {sched['max_shift']} px. Loss {losses['clip'][0]:.3f} -> {losses['clip'][1]:.3f}; final in-batch accuracy {last['clip']['acc']:.3f}.
- VAE: {sched['vae_steps']} steps x {sched['vae_batch']}, lr {sched['vae_lr']}, KL weight {sched['vae_kl']}.
  Loss {losses['vae'][0]:.3f} -> {losses['vae'][1]:.3f} (final reconstruction MSE {last['vae']['mse']:.4f} in [-1, 1]).
- UNet: {sched['unet_steps']} steps x {sched['unet_batch']}, lr {sched['unet_lr']}, captions without attributes,
  {sched['caption_dropout']:.0%} empty; centred images (no shifts: the digits it draws stay centred).
  Noise MSE {losses['unet'][0]:.3f} -> {losses['unet'][1]:.3f}.
- Time: CLIP {sec['clip']}s, VAE {sec['vae']}s, UNet {sec['unet']}s, total {sec['total']}s on
  {os.cpu_count()} CPU cores (load average {stats['load_average']:.1f} at the end, this run's own threads included).
"""
