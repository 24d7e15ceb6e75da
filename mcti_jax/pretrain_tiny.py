"""`mcti pretrain-tiny`: pretrain the tiny CLIP + latent diffusion model on sklearn digits.

Real Stable Diffusion and CLIP weights can't ship with the project, so the demo
uses tiny models we pretrain here, recreating the paper's situation: the
models know digits 0-4 by name and never met digits 5-9 (not as images, not as
words). Three phases, as the real models were made:

  1. CLIP: both towers, contrastive loss on (image, caption) pairs of the
     pretraining half of digits 0-4. Captions name the digit and, now and
     then, shape attributes measured on the image ("a photo of the digit
     three bold leaning left"); a caption's targets are all images of the
     batch it describes (a batch holds many images of one digit). Without
     the attributes every feature collapses onto the five known digits and
     nothing, learned tokens included, can tell 5-9 apart; without random
     shifts of a few pixels 5-9 are at chance even for image features.
  2. VAE: reconstruction + a small KL, on the same images.
  3. UNet: epsilon prediction with SD's scaled_linear schedule, conditioned on
     the FROZEN CLIP text tower's last hidden states (SD's text encoder is
     the CLIP text tower), 10% empty captions for classifier-free guidance.

  stats = pretrain("runs/tiny", seed=0)   # then tiny's loaders read runs/tiny/{clip,sd}

The checkpoint is written into a temporary sibling folder and moved into
place at the end, so an interrupted run never leaves half a checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mcti_jax import data as D
from mcti_jax import tokens as tok
from mcti_jax.models import clip as clip_lib
from mcti_jax.models import tiny
from mcti_jax.models import tokenizer as tokenizer_lib
from mcti_jax.models.frozen import Frozen, freeze

DEFAULT_OUT = Path(__file__).resolve().parent / "assets" / "tiny"
STATS_NAME = "pretrain_stats.json"  # at the checkpoint root: settings, loss curves, times
KNOWN_DIGITS = (0, 1, 2, 3, 4)
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# How a digit is named in captions: the TI templates (the trainer's prompts) hold the name
# alone or as "digit <name>"; a few more phrasings on top.
# The CLIP phase tokenizes captions to this length, not 77: the text tower is causal and pools at
# the first EOS, so the pooled feature does not depend on later positions (exact, and much cheaper).
CLIP_TEXT_LENGTH = 32
_EXTRA_TEMPLATES = ("a photo of the digit {}", "the number {}", "a handwritten {}", "a picture of the digit {}",
                    "an image of the number {}", "a handwritten digit {}")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Steps, batch sizes and learning rates of the three phases."""
  clip_steps: int = 4000
  clip_batch: int = 128
  clip_lr: float = 2e-3
  clip_attribute_p: float = 0.2  # chance that a caption mentions each shape attribute of its image
  vae_steps: int = 600
  vae_batch: int = 64
  vae_lr: float = 2e-3
  vae_kl: float = 1e-4
  unet_steps: int = 4000
  unet_batch: int = 32
  unet_lr: float = 1e-3
  caption_dropout: float = 0.1
  max_shift: int = 2  # pixels of random translation, CLIP and VAE (augmentation)
  unet_max_shift: int = 0  # the same for the UNet: shifted samples would make it draw off-centre digits
  log_every: int = 50

  @classmethod
  def quick(cls) -> "Schedule":
    """A very short schedule (tests, smoke runs): the losses fall, the model is no good."""
    return cls(clip_steps=30, clip_batch=32, vae_steps=30, vae_batch=16, unet_steps=30, unet_batch=16, log_every=5)


# ---------------------------------------------------------------------------- data


def pretraining_data(digits: Sequence[int] = KNOWN_DIGITS) -> tuple[np.ndarray, np.ndarray]:
  """The pretraining half of sklearn digits of `digits` only: uint8 [N, 16, 16, 3], digit labels [N]."""
  images, labels = D.digits_images()
  positions = D.digits_split(labels)["pretrain"]
  positions = positions[np.isin(labels[positions], list(digits))]
  return images[positions], labels[positions]


def caption_templates() -> tuple[str, ...]:
  as_digit = [t.format("digit {}") for t in tok.TI_TEMPLATES]
  return tuple(dict.fromkeys([*tok.TI_TEMPLATES, *as_digit, *_EXTRA_TEMPLATES]))


def captions_of(digit: int) -> list[str]:
  return [t.format(NAMES[digit]) for t in caption_templates()]


def caption_ids(tokenizer, digits: Sequence[int]) -> np.ndarray:
  """Token ids [len(digits), T, 77] of every caption of every digit."""
  return np.stack([tokenizer_lib.encode(tokenizer, captions_of(d)) for d in digits])


# Shape attributes, measured on an image's ink around its own centroid (so shifts don't change them) and
# cut at the terciles of the pretraining images: (words for the low third, words for the high third).
ATTRIBUTES = (
    ("ink", "thin", "bold"),
    ("width", "narrow", "wide"),
    ("skew_y", "heavy at the bottom", "heavy at the top"),  # y grows downwards: a tail below = mass on top
    ("skew_x", "heavy on the right", "heavy on the left"),
    ("slant", "leaning right", "leaning left"),  # cov(x, y) > 0: the bottom sits right of the top
)


def shape_measures(images: np.ndarray) -> np.ndarray:
  """[N, len(ATTRIBUTES)] ink, width, vertical and horizontal skew, slant of uint8 images [N, H, W, 3]."""
  w = images[..., 0].astype(np.float64) / 255.0
  h, wd = w.shape[1:]
  ys, xs = np.mgrid[0:h, 0:wd].astype(np.float64)
  mass = w.sum((1, 2)) + 1e-6
  mean = lambda f: (w * f).sum((1, 2)) / mass  # noqa: E731
  cy, cx = mean(ys), mean(xs)
  dy, dx = ys - cy[:, None, None], xs - cx[:, None, None]
  vy, vx = mean(dy ** 2) + 1e-6, mean(dx ** 2) + 1e-6
  return np.stack([mass, np.sqrt(vx), mean(dy ** 3) / vy ** 1.5, mean(dx ** 3) / vx ** 1.5, mean(dx * dy) / vy], -1)


def attribute_levels(measures: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """0 (low third), 1 (middle), 2 (high third) of each measure, by the terciles of `reference`."""
  cuts = np.quantile(reference, [1 / 3, 2 / 3], axis=0)  # [2, A]
  return (measures > cuts[0]).astype(np.int32) + (measures > cuts[1]).astype(np.int32)


def attribute_caption(template: str, digit: int, levels: np.ndarray, mention: np.ndarray) -> str:
  """A caption naming the digit and the mentioned non-middle attributes, e.g. 'a photo of a three bold leaning left'."""
  words = [ATTRIBUTES[a][1 + levels[a] // 2] for a in np.flatnonzero(mention & (levels != 1))]
  return " ".join([template.format(NAMES[digit]), *words])


def shift_images(key, images, max_shift: int):
  """Random translation by up to `max_shift` pixels (zero = black background fill), per image."""
  if max_shift == 0:
    return images
  b, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
  offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
  crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, image.shape[-1]))  # noqa: E731
  return jax.vmap(crop)(padded, offsets)


# ---------------------------------------------------------------------------- training helpers


def _normalize(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _soft_cross_entropy(logits, targets):
  return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def _make_step(loss_fn: Callable, optimizer: optax.GradientTransformation):
  """A jitted AdamW step on the params of an NNX graphdef: (params, opt_state, *args) -> (..., loss)."""

  @jax.jit
  def step(params, opt_state, *args):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *args)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux

  return step


def _optimizer(lr: float, steps: int, weight_decay: float = 1e-4) -> optax.GradientTransformation:
  warmup = max(1, min(100, steps // 10))
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.05)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))


def _train_loop(name: str, step, params, opt_state, steps: int, make_args: Callable[[int], tuple],
                log_every: int, progress: bool) -> tuple[Any, list[dict[str, float]], float]:
  """Run `steps` steps; returns (params, logged rows, seconds)."""
  from tqdm.auto import tqdm
  rows, pending, t0 = [], [], time.time()
  bar = tqdm(total=steps, desc=name, unit="step", dynamic_ncols=True, disable=not progress)
  for s in range(steps):
    params, opt_state, loss, aux = step(params, opt_state, *make_args(s))
    pending.append((loss, aux))
    if (s + 1) % log_every == 0 or s + 1 == steps:
      values = jax.device_get(pending)
      row = {"step": s + 1, "loss": float(np.mean([v[0] for v in values]))}
      for k in values[0][1]:
        row[k] = float(np.mean([v[1][k] for v in values]))
      rows.append(row)
      bar.set_postfix({k: f"{v:.4f}" for k, v in row.items() if k != "step"})
      pending = []
    bar.update(1)
  bar.close()
  jax.block_until_ready(params)
  return params, rows, time.time() - t0


# ---------------------------------------------------------------------------- phases


def train_clip(model: clip_lib.CLIPModel, tokenizer, images: np.ndarray, digits: np.ndarray, sched: Schedule,
               seed: int, progress: bool = True):
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
  optimizer = _optimizer(sched.clip_lr, sched.clip_steps)
  size = model.config.vision_config.image_size
  images_f = jnp.asarray(images, jnp.float32) / 255.0
  measures = shape_measures(images)
  levels = attribute_levels(measures, measures)  # terciles of the pretraining images themselves
  templates = caption_templates()
  eos = tokenizer.eos_token_id

  def loss_fn(params, batch, captions, targets, key):
    m = nnx.merge(graphdef, params)
    pixels = clip_lib.preprocess(shift_images(key, images_f[batch], sched.max_shift), size)
    image = _normalize(m.get_image_features(pixels))
    text = _normalize(m.get_text_features(captions))
    logits = jnp.exp(jnp.minimum(m.logit_scale[...], np.log(100.0))) * image @ text.T
    image_targets = targets / targets.sum(-1, keepdims=True)
    text_targets = targets.T / targets.T.sum(-1, keepdims=True)
    loss = 0.5 * (_soft_cross_entropy(logits, image_targets) + _soft_cross_entropy(logits.T, text_targets))
    y = digits_j[batch]
    accuracy = jnp.mean(y[jnp.argmax(logits, -1)] == y)  # the best caption names the right digit
    return loss, {"acc": accuracy, "scale": jnp.exp(m.logit_scale[...])}

  digits_j = jnp.asarray(digits)
  step = _make_step(loss_fn, optimizer)
  rng = np.random.default_rng([seed, 1])
  key = jax.random.PRNGKey(seed)

  def make_args(s):
    batch = rng.choice(len(images), sched.clip_batch, replace=False)
    mention = rng.random((len(batch), len(ATTRIBUTES))) < sched.clip_attribute_p
    texts = [attribute_caption(templates[rng.integers(len(templates))], digits[i], levels[i], mention[j])
             for j, i in enumerate(batch)]
    ids = tokenizer_lib.encode(tokenizer, texts, max_length=CLIP_TEXT_LENGTH)
    if not np.all(ids[:, -2] == eos):  # else some caption was cut (truncation keeps a final EOS)
      raise ValueError(f"a caption is longer than CLIP_TEXT_LENGTH={CLIP_TEXT_LENGTH} tokens: {texts}")
    # Caption j describes image i if the digit matches and so does every attribute caption j mentions.
    agree = (levels[batch][:, None, :] == levels[batch][None, :, :]) | ~(mention & (levels[batch] != 1))[None]
    targets = (digits[batch][:, None] == digits[batch][None, :]) & agree.all(-1)
    return jnp.asarray(batch), jnp.asarray(ids), jnp.asarray(targets, jnp.float32), jax.random.fold_in(key, s)

  params, rows, seconds = _train_loop("clip", step, params, optimizer.init(params), sched.clip_steps, make_args,
                                      sched.log_every, progress)
  return nnx.merge(graphdef, params), rows, seconds


def train_vae(model, images: np.ndarray, sched: Schedule, seed: int, progress: bool = True):
  """Reconstruction (L2 + L1 in [-1, 1]) + a small KL to N(0, 1)."""
  graphdef, params = nnx.split(model)
  optimizer = _optimizer(sched.vae_lr, sched.vae_steps)
  images_f = D.to_model_range(jnp.asarray(images))

  def loss_fn(params, batch, key):
    m = nnx.merge(graphdef, params)
    k_shift, k_sample = jax.random.split(key)
    x = shift_images(k_shift, images_f[batch] + 1.0, sched.max_shift) - 1.0  # shift with background -1
    mean, logvar = m.encode(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_sample, mean.shape)
    recon = m.decode(z)
    mse = jnp.mean((recon - x) ** 2)
    l1 = jnp.mean(jnp.abs(recon - x))
    kl = 0.5 * jnp.mean(jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1))
    return mse + l1 + sched.vae_kl * kl, {"mse": mse, "kl": kl}

  step = _make_step(loss_fn, optimizer)
  rng = np.random.default_rng([seed, 2])
  key = jax.random.PRNGKey(seed + 1)

  def make_args(s):
    return jnp.asarray(rng.choice(len(images), sched.vae_batch, replace=False)), jax.random.fold_in(key, s)

  params, rows, seconds = _train_loop("vae", step, params, optimizer.init(params), sched.vae_steps, make_args,
                                      sched.log_every, progress)
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
      shifted = _translate(x, dy, dx)
      parts = [encode(frozen, shifted[i:i + batch]) for i in range(0, len(images), batch)]
      means.append(np.concatenate([np.asarray(p[0]) for p in parts]))
      logvars.append(np.concatenate([np.asarray(p[1]) for p in parts]))
  return np.stack(means), np.stack(logvars)


def _translate(x, dy: int, dx: int):
  """Shift images [B, H, W, C] by (dy, dx) pixels, filling with zeros."""
  h, w = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0)))
  return padded[:, abs(dy) - dy:abs(dy) - dy + h, abs(dx) - dx:abs(dx) - dx + w]


def train_unet(unet_model, schedule, scaling_factor: float, latent_mean: np.ndarray, latent_logvar: np.ndarray,
               labels: np.ndarray, captions: np.ndarray, empty: np.ndarray, sched: Schedule, seed: int,
               progress: bool = True):
  """Epsilon prediction on VAE latents [S, N, h, w, c] (S shifted copies of N images).

  captions [C, T, 77, D] are the text tower's last hidden states of the T
  captions of each class, empty [77, D] those of the empty prompt "".
  """
  graphdef, params = nnx.split(unet_model)
  optimizer = _optimizer(sched.unet_lr, sched.unet_steps)
  latent_mean, latent_logvar = jnp.asarray(latent_mean), jnp.asarray(latent_logvar)
  captions, empty, labels_j = jnp.asarray(captions), jnp.asarray(empty), jnp.asarray(labels)
  num_t = schedule.num_train_timesteps

  def loss_fn(params, batch, key):
    m = nnx.merge(graphdef, params)
    k_shift, k_latent, k_t, k_noise, k_cap, k_drop = jax.random.split(key, 6)
    shift = jax.random.randint(k_shift, batch.shape, 0, latent_mean.shape[0])
    mean, logvar = latent_mean[shift, batch], latent_logvar[shift, batch]
    x0 = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_latent, mean.shape)) * scaling_factor
    t = jax.random.randint(k_t, batch.shape, 0, num_t)
    noise = jax.random.normal(k_noise, x0.shape)
    x_t = schedule.add_noise(x0, noise, t)
    which = jax.random.randint(k_cap, batch.shape, 0, captions.shape[1])
    context = captions[labels_j[batch], which]
    drop = jax.random.uniform(k_drop, batch.shape) < sched.caption_dropout
    context = jnp.where(drop[:, None, None], empty[None], context)
    mse = jnp.mean((m(x_t, t, context) - noise) ** 2)
    return mse, {}

  step = _make_step(loss_fn, optimizer)
  rng = np.random.default_rng([seed, 3])
  key = jax.random.PRNGKey(seed + 2)

  def make_args(s):
    return jnp.asarray(rng.choice(len(labels), sched.unet_batch, replace=False)), jax.random.fold_in(key, s)

  params, rows, seconds = _train_loop("unet", step, params, optimizer.init(params), sched.unet_steps, make_args,
                                      sched.log_every, progress)
  return nnx.merge(graphdef, params), rows, seconds


# ---------------------------------------------------------------------------- the whole run


def pretrain(out_dir: str | os.PathLike = DEFAULT_OUT, seed: int = 0, schedule: Schedule | None = None,
             progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Pretrain tiny CLIP, VAE and UNet on digits 0-4 and write `out_dir`/{clip,sd} atomically.

  Returns {"losses": {phase: [first, last]}, "seconds": {phase: s}, "curves": ..., "out": path}.
  """
  sched = schedule or Schedule()
  out = Path(out_dir)
  t_start = time.time()
  images, labels = pretraining_data()
  tokenizer = tiny.load_tiny_tokenizer()
  ids = caption_ids(tokenizer, KNOWN_DIGITS)
  class_of = np.searchsorted(np.asarray(KNOWN_DIGITS), labels)  # digit -> row of `ids`
  models = tiny.build(seed)
  log(f"pretraining on {len(images)} images of digits {KNOWN_DIGITS} "
      f"({ids.shape[1]} captions per digit), seed {seed}; {jax.device_count()} device(s), "
      f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

  seconds, curves = {}, {}
  models.clip, curves["clip"], seconds["clip"] = train_clip(models.clip, tokenizer, images, labels, sched, seed,
                                                            progress)
  log(f"clip: {seconds['clip']:.0f}s")
  models.sd.text_encoder = tiny.text_tower_of(models.clip)
  vae_model, curves["vae"], seconds["vae"] = train_vae(models.sd.vae, images, sched, seed, progress)
  scaling = 1.0 / latent_std(vae_model, images)
  vae_model.config = dataclasses.replace(vae_model.config, scaling_factor=round(scaling, 5))
  models.sd.vae = vae_model
  log(f"vae: {seconds['vae']:.0f}s, scaling_factor {vae_model.config.scaling_factor}")

  t0 = time.time()
  text_encoder = freeze(models.sd.text_encoder)
  caption_states = text_states(text_encoder, ids)
  empty_state = text_states(text_encoder, tokenizer_lib.encode(tokenizer, [""]))[0]
  latent_mean, latent_logvar = shifted_latents(vae_model, images, sched.unet_max_shift)
  seconds["encode"] = time.time() - t0
  models.sd.unet, curves["unet"], seconds["unet"] = train_unet(
      models.sd.unet, models.sd.schedule, vae_model.config.scaling_factor, latent_mean, latent_logvar, class_of,
      caption_states, empty_state, sched, seed, progress)
  log(f"unet: {seconds['unet']:.0f}s")

  seconds["total"] = time.time() - t_start
  losses = {phase: [rows[0]["loss"], rows[-1]["loss"]] for phase, rows in curves.items()}
  stats = {"seed": seed, "schedule": dataclasses.asdict(sched), "losses": losses, "curves": curves,
           "seconds": {k: round(v, 1) for k, v in seconds.items()}, "num_images": len(images),
           "load_average": os.getloadavg()[0], "out": str(out)}
  _write_atomically(models, out, model_card(models, stats), stats)
  log(f"wrote {out} in {seconds['total']:.0f}s")
  return stats


def _write_atomically(models: tiny.TinyModels, out: Path, card: str, stats: dict[str, Any]) -> None:
  """Save into a temporary sibling folder, then swap it in: never a half-written checkpoint at `out`."""
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    tiny.save(models, tmp, card=card)
    (tmp / STATS_NAME).write_text(json.dumps(stats, indent=1) + "\n")
    tmp.chmod(0o755)
    if out.exists():
      old = out.with_name(f".{out.name}.old")
      shutil.rmtree(old, ignore_errors=True)
      out.rename(old)
      tmp.rename(out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      tmp.rename(out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _num_params(module) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(module))))


def model_card(models: tiny.TinyModels, stats: dict[str, Any]) -> str:
  sched, sec, losses = stats["schedule"], stats["seconds"], stats["losses"]
  c = models.clip.config
  sizes = {"CLIP": _num_params(models.clip), "UNet": _num_params(models.sd.unet), "VAE": _num_params(models.sd.vae)}
  last = {phase: stats["curves"][phase][-1] for phase in stats["curves"]}
  return f"""# Tiny CLIP + latent diffusion model on sklearn digits (mcti-jax demo)

Made by `mcti pretrain-tiny --seed {stats['seed']}` (mcti_jax/pretrain_tiny.py): our own JAX/Flax models,
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


# ---------------------------------------------------------------------------- command line


def pretrain_main(argv: Sequence[str] | None = None) -> int:
  """`mcti pretrain-tiny [--out DIR] [--seed N] [--quick] [--clip-steps N ...]`."""
  defaults = Schedule()
  parser = argparse.ArgumentParser(prog="mcti pretrain-tiny", description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=str(DEFAULT_OUT), help="checkpoint root (gets clip/ and sd/)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true", help="a very short schedule (smoke test; useless model)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  for name in ("clip_steps", "vae_steps", "unet_steps"):
    parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                        help=f"default {getattr(defaults, name)}")
  args = parser.parse_args(argv)
  sched = Schedule.quick() if args.quick else defaults
  overrides = {k: getattr(args, k) for k in ("clip_steps", "vae_steps", "unet_steps") if getattr(args, k) is not None}
  sched = dataclasses.replace(sched, **overrides)
  stats = pretrain(args.out, seed=args.seed, schedule=sched, progress=not args.no_progress)
  print(json.dumps({"losses": stats["losses"], "seconds": stats["seconds"]}, indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(pretrain_main())
