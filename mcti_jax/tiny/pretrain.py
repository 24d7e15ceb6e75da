"""Pretrain the tiny CLIP, VAE and UNet on digits 0-4, as the real models were made (mcti_jax/configs/tiny_pretrain.py).

  1. CLIP: both towers, contrastive loss on (image, caption) pairs of the
     pretraining half of digits 0-4 (see `captions`); a caption's targets are
     all images of the batch it describes (a batch holds many images of one
     digit). Images shift by a few pixels (see `data`).
  2. VAE: reconstruction + a small KL, on the same images.
  3. UNet: epsilon prediction with SD's scaled_linear schedule, conditioned on
     the FROZEN CLIP text tower's last hidden states (SD's text encoder is
     the CLIP text tower), 10% empty captions for classifier-free guidance.

  stats = pretrain(tiny_pretrain.get_config("quick"))   # then tiny's loaders read config.out/{clip,sd}

The checkpoint is staged beside `config.out` and swapped in at the end, so an
interrupted run never leaves half a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mcti_jax import data as D
from mcti_jax.models import clip as clip_lib
from mcti_jax.models import hf_io
from mcti_jax.models import tokenizer as tokenizer_lib
from mcti_jax.models import vae as vae_lib
from mcti_jax.models.frozen import Frozen, freeze
from mcti_jax.tiny import card, trainer
from mcti_jax.tiny import checkpoints as tiny_checkpoints
from mcti_jax.tiny.captions import (ATTRIBUTES, CLIP_TEXT_LENGTH, KNOWN_DIGITS, attribute_caption, attribute_levels,
                                    caption_ids, caption_templates, shape_measures)
from mcti_jax.tiny.data import pretraining_data, shift_images, translate

STATS_NAME = "pretrain_stats.json"  # at the checkpoint root: settings, loss curves, times
# Config fields that are the run's settings rather than its schedule.
_RUN_FIELDS = ("out", "seed")


# ---------------------------------------------------------------------------- phases


def train_clip(model: clip_lib.CLIPModel, tokenizer, images: np.ndarray, digits: np.ndarray, cfg, seed: int,
               progress: bool = True):
  """Contrastive training of both towers on (image, caption) pairs.

  A caption names the image's digit in a random template and, with
  probability `clip_attribute_p` each, its non-middle shape attributes. It is
  a right answer for every image of the batch it describes (same digit, same
  level of each attribute it mentions), and back: class- and attribute-aware
  soft targets. The attributes give both towers more to say than five names
  (without them every feature collapses onto the 4-simplex of the five
  known digits, and a learned token cannot point anywhere else).
  """
  graphdef, params = nnx.split(model)
  optimizer = trainer.optimizer(cfg.clip_lr, cfg.clip_steps)
  images_f = jnp.asarray(images, jnp.float32) / 255.0
  measures = shape_measures(images)
  levels = attribute_levels(measures, measures)  # terciles of the pretraining images themselves
  templates = caption_templates()
  eos = tokenizer.eos_token_id
  digits_j = jnp.asarray(digits)

  def loss_fn(params, batch, captions, targets, key):
    m = nnx.merge(graphdef, params)
    image = trainer.normalize(clip_lib.image_features(m, shift_images(key, images_f[batch], cfg.max_shift)))
    text = trainer.normalize(m.get_text_features(captions))
    logits = jnp.exp(jnp.minimum(m.logit_scale[...], np.log(100.0))) * image @ text.T
    image_targets = targets / targets.sum(-1, keepdims=True)
    text_targets = targets.T / targets.T.sum(-1, keepdims=True)
    loss = 0.5 * (trainer.soft_cross_entropy(logits, image_targets) +
                  trainer.soft_cross_entropy(logits.T, text_targets))
    y = digits_j[batch]
    accuracy = jnp.mean(y[jnp.argmax(logits, -1)] == y)  # the best caption names the right digit
    return loss, {"acc": accuracy, "scale": jnp.exp(m.logit_scale[...])}

  step = trainer.make_step(loss_fn, optimizer)
  rng = np.random.default_rng([seed, 1])
  key = jax.random.PRNGKey(seed)

  def make_args(s):
    batch = rng.choice(len(images), cfg.clip_batch, replace=False)
    mention = rng.random((len(batch), len(ATTRIBUTES))) < cfg.clip_attribute_p
    texts = [attribute_caption(templates[rng.integers(len(templates))], digits[i], levels[i], mention[j])
             for j, i in enumerate(batch)]
    ids = tokenizer_lib.encode(tokenizer, texts, max_length=CLIP_TEXT_LENGTH)
    if not np.all(ids[:, -2] == eos):  # else some caption was cut (truncation keeps a final EOS)
      raise ValueError(f"a caption is longer than CLIP_TEXT_LENGTH={CLIP_TEXT_LENGTH} tokens: {texts}")
    # Caption j describes image i if the digit matches and so does every attribute caption j mentions.
    agree = (levels[batch][:, None, :] == levels[batch][None, :, :]) | ~(mention & (levels[batch] != 1))[None]
    targets = (digits[batch][:, None] == digits[batch][None, :]) & agree.all(-1)
    return jnp.asarray(batch), jnp.asarray(ids), jnp.asarray(targets, jnp.float32), jax.random.fold_in(key, s)

  params, rows, seconds = trainer.train_loop("clip", step, params, optimizer.init(params), cfg.clip_steps,
                                             make_args, cfg.log_every, progress)
  return nnx.merge(graphdef, params), rows, seconds


def train_vae(model: vae_lib.AutoencoderKL, images: np.ndarray, cfg, seed: int, progress: bool = True):
  """Reconstruction (L2 + L1 in [-1, 1]) + a small KL to N(0, 1)."""
  graphdef, params = nnx.split(model)
  optimizer = trainer.optimizer(cfg.vae_lr, cfg.vae_steps)
  images_f = D.to_model_range(jnp.asarray(images))

  def loss_fn(params, batch, key):
    m = nnx.merge(graphdef, params)
    k_shift, k_sample = jax.random.split(key)
    x = shift_images(k_shift, images_f[batch] + 1.0, cfg.max_shift) - 1.0  # shift with background -1
    mean, logvar = m.encode(x)
    recon = m.decode(vae_lib.sample_latent(mean, logvar, k_sample))
    mse = jnp.mean((recon - x) ** 2)
    l1 = jnp.mean(jnp.abs(recon - x))
    kl = 0.5 * jnp.mean(jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1))
    return mse + l1 + cfg.vae_kl * kl, {"mse": mse, "kl": kl}

  step = trainer.make_step(loss_fn, optimizer)
  rng = np.random.default_rng([seed, 2])
  key = jax.random.PRNGKey(seed + 1)

  def make_args(s):
    return jnp.asarray(rng.choice(len(images), cfg.vae_batch, replace=False)), jax.random.fold_in(key, s)

  params, rows, seconds = trainer.train_loop("vae", step, params, optimizer.init(params), cfg.vae_steps, make_args,
                                             cfg.log_every, progress)
  return nnx.merge(graphdef, params), rows, seconds


def latent_std(vae_model, images: np.ndarray) -> float:
  """Std of the VAE latent means; SD's scaling_factor is 1 / this (0.18215 for SD's VAE)."""
  mean, _ = jax.jit(lambda x: vae_model.encode(D.to_model_range(x)))(jnp.asarray(images))
  return float(jnp.std(mean))


def text_states(text_encoder: Frozen, ids: np.ndarray, batch: int = 256) -> np.ndarray:
  """Last hidden states of the frozen text tower for token ids [..., 77] -> [..., 77, D]."""
  flat = ids.reshape(-1, ids.shape[-1])
  encode = jax.jit(lambda te, x: te.module(x)[0])
  out = np.concatenate([np.asarray(encode(text_encoder, jnp.asarray(flat[i:i + batch])))
                        for i in range(0, len(flat), batch)])
  return out.reshape(*ids.shape, -1)


def shifted_latents(vae_model, images: np.ndarray, max_shift: int, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
  """VAE (mean, logvar) of every image under every shift in [-max_shift, max_shift]^2: [S, N, h, w, c] each.

  The VAE is frozen while the UNet trains, so its encodings are computed once
  (the UNet's shift augmentation picks one of them).
  """
  x = D.to_model_range(jnp.asarray(images)) + 1.0  # background 0 for the zero padding of shifts
  encode = jax.jit(lambda v, x: v.module.encode(x - 1.0))
  frozen = freeze(vae_model)
  means, logvars = [], []
  for dy in range(-max_shift, max_shift + 1):
    for dx in range(-max_shift, max_shift + 1):
      shifted = translate(x, dy, dx)
      parts = [encode(frozen, shifted[i:i + batch]) for i in range(0, len(images), batch)]
      means.append(np.concatenate([np.asarray(p[0]) for p in parts]))
      logvars.append(np.concatenate([np.asarray(p[1]) for p in parts]))
  return np.stack(means), np.stack(logvars)


def train_unet(unet_model, schedule, vae_config: vae_lib.VAEConfig, latent_mean: np.ndarray,
               latent_logvar: np.ndarray, labels: np.ndarray, captions: np.ndarray, empty: np.ndarray, cfg,
               seed: int, progress: bool = True):
  """Epsilon prediction on VAE latents [S, N, h, w, c] (S shifted copies of N images).

  captions [C, T, 77, D] are the text tower's last hidden states of the T
  captions of each class, empty [77, D] those of the empty prompt "".
  """
  graphdef, params = nnx.split(unet_model)
  optimizer = trainer.optimizer(cfg.unet_lr, cfg.unet_steps)
  latent_mean, latent_logvar = jnp.asarray(latent_mean), jnp.asarray(latent_logvar)
  captions, empty, labels_j = jnp.asarray(captions), jnp.asarray(empty), jnp.asarray(labels)
  num_t = schedule.num_train_timesteps

  def loss_fn(params, batch, key):
    m = nnx.merge(graphdef, params)
    k_shift, k_latent, k_t, k_noise, k_cap, k_drop = jax.random.split(key, 6)
    shift = jax.random.randint(k_shift, batch.shape, 0, latent_mean.shape[0])
    x0 = vae_lib.moments_to_latents(latent_mean[shift, batch], latent_logvar[shift, batch], vae_config, k_latent)
    t = jax.random.randint(k_t, batch.shape, 0, num_t)
    noise = jax.random.normal(k_noise, x0.shape)
    x_t = schedule.add_noise(x0, noise, t)
    which = jax.random.randint(k_cap, batch.shape, 0, captions.shape[1])
    context = captions[labels_j[batch], which]
    drop = jax.random.uniform(k_drop, batch.shape) < cfg.caption_dropout
    context = jnp.where(drop[:, None, None], empty[None], context)
    mse = jnp.mean((m(x_t, t, context) - noise) ** 2)
    return mse, {}

  step = trainer.make_step(loss_fn, optimizer)
  rng = np.random.default_rng([seed, 3])
  key = jax.random.PRNGKey(seed + 2)

  def make_args(s):
    return jnp.asarray(rng.choice(len(labels), cfg.unet_batch, replace=False)), jax.random.fold_in(key, s)

  params, rows, seconds = trainer.train_loop("unet", step, params, optimizer.init(params), cfg.unet_steps,
                                             make_args, cfg.log_every, progress)
  return nnx.merge(graphdef, params), rows, seconds


# ---------------------------------------------------------------------------- the whole run


def pretrain(config, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Pretrain tiny CLIP, VAE and UNet on digits 0-4 and write `config.out`/{clip,sd} atomically.

  config: mcti_jax/configs/tiny_pretrain.py's fields. Returns {"losses": {phase: [first, last]},
  "seconds": {phase: s}, "curves": ..., "schedule": ..., "out": path}.
  """
  seed, out = config.seed, Path(config.out)
  t_start = time.time()
  images, labels = pretraining_data()
  tokenizer = tiny_checkpoints.load_tiny_tokenizer()
  ids = caption_ids(tokenizer, KNOWN_DIGITS)
  class_of = np.searchsorted(np.asarray(KNOWN_DIGITS), labels)  # digit -> row of `ids`
  models = tiny_checkpoints.build(seed)
  log(f"pretraining on {len(images)} images of digits {KNOWN_DIGITS} "
      f"({ids.shape[1]} captions per digit), seed {seed}; {jax.device_count()} device(s), "
      f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

  seconds, curves = {}, {}
  models.clip, curves["clip"], seconds["clip"] = train_clip(models.clip, tokenizer, images, labels, config, seed,
                                                            progress)
  log(f"clip: {seconds['clip']:.0f}s")
  models.sd.text_encoder = tiny_checkpoints.text_tower_of(models.clip)
  vae_model, curves["vae"], seconds["vae"] = train_vae(models.sd.vae, images, config, seed, progress)
  scaling = 1.0 / latent_std(vae_model, images)
  vae_model.config = dataclasses.replace(vae_model.config, scaling_factor=round(scaling, 5))
  models.sd.vae = vae_model
  log(f"vae: {seconds['vae']:.0f}s, scaling_factor {vae_model.config.scaling_factor}")

  t0 = time.time()
  text_encoder = freeze(models.sd.text_encoder)
  caption_states = text_states(text_encoder, ids)
  empty_state = text_states(text_encoder, tokenizer_lib.encode(tokenizer, [""]))[0]
  latent_mean, latent_logvar = shifted_latents(vae_model, images, config.unet_max_shift)
  seconds["encode"] = time.time() - t0
  models.sd.unet, curves["unet"], seconds["unet"] = train_unet(
      models.sd.unet, models.sd.schedule, vae_model.config, latent_mean, latent_logvar, class_of, caption_states,
      empty_state, config, seed, progress)
  log(f"unet: {seconds['unet']:.0f}s")

  seconds["total"] = time.time() - t_start
  losses = {phase: [rows[0]["loss"], rows[-1]["loss"]] for phase, rows in curves.items()}
  schedule = {k: v for k, v in config.items() if k not in _RUN_FIELDS}
  stats = {"seed": seed, "schedule": schedule, "losses": losses, "curves": curves,
           "seconds": {k: round(v, 1) for k, v in seconds.items()}, "num_images": len(images),
           "load_average": os.getloadavg()[0], "out": str(out)}
  _write_atomically(models, out, card.model_card(models, stats), stats)
  log(f"wrote {out} in {seconds['total']:.0f}s")
  return stats


def _write_atomically(models: tiny_checkpoints.TinyModels, out: Path, card_text: str, stats: dict[str, Any]) -> None:
  """Stage the whole checkpoint, then swap it in (`hf_io.staged_folder`): never a half-written one at `out`."""
  with hf_io.staged_folder(out, replace=True) as staged:
    tiny_checkpoints.save(models, staged, card=card_text)
    (staged / STATS_NAME).write_text(json.dumps(stats, indent=1) + "\n")
