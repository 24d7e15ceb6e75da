"""Pretraining of the embedded tiny CLIP + latent diffusion model on sklearn digits 0-4 (mcti_jax/tiny/).

  mcti pretrain-tiny                               # = --config tiny_pretrain; rewrites mcti_jax/assets/tiny
  mcti pretrain-tiny --quick --out /tmp/tiny       # = :quick; a smoke test, a useless model; CPU, about a minute
  mcti pretrain-tiny --config tiny_pretrain --clip-steps 100 --seed 1 --out /tmp/tiny

The full run took 17 minutes on 2 CPU cores (the committed checkpoint's
pretrain_stats.json holds the times, these settings and the loss curves).
Three phases, as the real models were made: CLIP (both towers, contrastive),
VAE (reconstruction + a small KL), UNet (epsilon prediction on the frozen
CLIP text tower's hidden states).
"""

import ml_collections

from mcti_jax.tiny import DEFAULT_OUT

PRESET_NAMES = ("full", "quick")


def get_config(arg: str = "full") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.out = str(DEFAULT_OUT)  # the checkpoint root: gets clip/, sd/ and pretrain_stats.json
  c.seed = 0
  c.clip_steps, c.clip_batch, c.clip_lr = 4000, 128, 2e-3
  c.clip_attribute_p = 0.2  # chance that a caption mentions each shape attribute of its image
  c.vae_steps, c.vae_batch, c.vae_lr = 600, 64, 2e-3
  c.vae_kl = 1e-4
  c.unet_steps, c.unet_batch, c.unet_lr = 4000, 32, 1e-3
  c.caption_dropout = 0.1  # empty captions, for classifier-free guidance
  c.max_shift = 2  # pixels of random translation, CLIP and VAE (augmentation)
  c.unet_max_shift = 0  # the same for the UNet: shifted samples would make it draw off-centre digits
  c.log_every = 50
  if arg == "quick":  # the losses fall, the model is no good
    c.clip_steps, c.clip_batch, c.vae_steps, c.vae_batch, c.unet_steps, c.unet_batch = 30, 32, 30, 16, 30, 16
    c.log_every = 5
  elif arg != "full":
    raise ValueError(f"unknown tiny_pretrain variant {arg!r}; use one of {', '.join(PRESET_NAMES)}")
  return c
