"""MC-TI + CoOp: context vectors shared by all classes, learned on the shots in front of a phase's tokens.

The prompt of class k is "<ctx-0> ... <ctx-15> <cls-k>." with MC-TI's tokens frozen; only the M = 16 shared
context vectors [M, D] train, with CLIP's cross-entropy over the K classes (logit scale 100). MC-TI (Sec. 4.1)
says only that it learns "a unified context for each dataset with M = 16 context tokens"; the rest is CoOp's
(K. Zhou et al., Learning to Prompt for Vision-Language Models, IJCV 2022), as its code runs it:
configs/trainers/CoOp/rn50.yaml and trainers/coop.py of github.com/KaiyangZhou/CoOp, on Dassl.pytorch's
defaults (dassl/config/defaults.py, dassl/optim/lr_scheduler.py).

protocol="coop" (the default) follows CoOp:

| | CoOp (paper; code) | this module |
| --- | --- | --- |
| context | M = 16, shared, class last: "X ... X {class}." | the same; the class is the phase's token |
| context init | N(0, 0.02) | the same |
| optimiser | SGD, momentum 0.9, weight decay 5e-4 [1] | the same (add_decayed_weights, then sgd) |
| learning rate | 0.002, cosine over MAX_EPOCH, per epoch [2] | the same (`schedule`) |
| warm-up | epoch 0 at 1e-5, then the cosine from its start [2] | the same |
| epochs | 200 (rn50.yaml: 8-16 shots) [3] | `epochs`: 200 (eval.py: 50 on imagenet) |
| batch | 32, reshuffled per epoch, short last batch dropped [4] | the same; < 32 images: one batch of all |
| augmentation | random resized crop + horizontal flip [5] | the same draws, on the shot as held [6] |
| image features | CLIP's image tower, every batch | the same (frozen, no gradient) |
| kept | the last epoch's context | the same |
| logit scale | CLIP's exp(t) = 100 | `logit_scale`: 100 |

[1] Dassl's defaults: OPTIM.MOMENTUM 0.9, WEIGHT_DECAY 5e-4, no Nesterov or dampening.
[2] Dassl's ConstantWarmupScheduler (WARMUP_EPOCH 1, WARMUP_CONS_LR 1e-5) over CosineAnnealingLR(T_max=MAX_EPOCH),
    whose count restarts after the warm-up (WARMUP_RECOUNT): epoch e >= 1 runs at lr (1 + cos(pi (e - 1) / 200)) / 2.
[3] CoOp's scripts use 50 epochs for 1 shot and 100 for 2-4 (COOP.md), and 50 on ImageNet; MC-TI reports
    MC-TI + CoOp at 16 shots.
[4] Dassl's train loader: RandomSampler, drop_last when the split holds at least a batch.
[5] RandomResizedCrop(224, scale (0.08, 1), ratio (3/4, 4/3), bicubic) then RandomHorizontalFlip(0.5), on the raw
    image. `crop_scale` and `flip` set them (eval.py: flip = the preset's data.flip, so not on digits).
[6] The crop is drawn as torchvision draws it, on the shot the trainer holds (R x R, center-cropped from the
    image), and resampled with antialiased bicubic straight to CLIP's input size; at the crop's border the kernel
    reads the neighbouring pixels instead of clamping to the crop.

Randomness is seeded and does not depend on the device count: the context starts from PRNGKey(seed) (as the
cached path), epoch e's order is a permutation drawn from fold_in(key, e), and image i's crop and flip in epoch e
from fold_in(fold_in(key, e), i). A batch is encoded sharded over the cell's mesh, padded to a multiple of the
device count; the padding is dropped before the loss.

protocol="cached" is the fast path this module had before: `steps` full-batch AdamW steps (lr `lr`) on the cached,
un-augmented CLIP features of the shots (`Cell.shot_features`), prompt "X ... X <cls-k>" (methods/coop.py). It costs
no image encoding and is what MC-TI's "we extract image features beforehand" does for MC-TI itself, but it is not
CoOp's protocol.

On the tiny model (10 digits x 5 shots: one batch per epoch, 200 steps; about 20 s a cell on 2 CPU cores, the cached
path 10 s) CoOp's protocol is a poor fit: SGD at 0.002 leaves the loss near ln 10 (1.8-2.2 after 200 steps), and
crops down to 8% of a 16-px digit are rarely readable. Top-1 on the demo's cells (5-shot, seeds 1-3, 846 test
digits): MC-TI 68.2, MC-TI + CoOp 43.8 (no augmentation: 48.9), cached 64.4.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mcti_jax.classify import clip_head
from mcti_jax.errors import ConfigError
from mcti_jax.methods import coop
from mcti_jax.models import clip as clip_lib
from mcti_jax.runtime import parallel
from mcti_jax.tokens import placeholders as tok

PROTOCOLS = ("coop", "cached")


@dataclasses.dataclass(frozen=True)
class Evaluator:
  phase: str = "mcti"
  protocol: str = "coop"  # "coop": CoOp's training (see the module docstring); "cached": the fast path
  num_context: int = 16
  lr: float = 2e-3  # CoOp's SGD lr (coop), or the AdamW lr (cached)
  logit_scale: float = 100.0
  seed: int = 0
  # protocol="coop"
  epochs: int = 200
  batch_size: int = 32
  momentum: float = 0.9
  weight_decay: float = 5e-4
  warmup_epochs: int = 1
  warmup_lr: float = 1e-5
  crop_scale: tuple = (0.08, 1.0)  # RandomResizedCrop's area fraction; (1.0, 1.0) with flip=False: no augmentation
  flip: bool = True
  # cached: the number of full-batch AdamW steps (None: 200). coop: None runs every epoch; a number stops after that
  # many SGD steps, the schedule unchanged (a smoke test's cap).
  steps: int | None = None

  def __post_init__(self):
    if self.protocol not in PROTOCOLS:
      raise ConfigError(f"coop evaluator: protocol={self.protocol!r}; use one of {', '.join(PROTOCOLS)}")

  def run(self, cell, name: str):
    del name
    m = cell.models
    tokens = cell.result.tokens[self.phase]
    tokenizer, class_tokens = m.tokens_for(tokens.shape[1], cell.result.vector_counts)
    context_ids = coop.add_context_tokens(tokenizer, self.num_context)
    if self.protocol == "cached":
      cfg = coop.CoOpConfig(num_context=self.num_context, steps=200 if self.steps is None else self.steps,
                            lr=self.lr, logit_scale=self.logit_scale, seed=self.seed)
      template_ids = jnp.asarray(coop.context_template_ids(tokenizer, class_tokens, cfg.num_context))
      context, _ = coop.train_context(m.clip, tokens, template_ids, context_ids, cell.shot_features,
                                      first_id=m.first_id, pooling=m.pooling, cfg=cfg)
      info = {"protocol": f"cached features, {cfg.steps} full-batch AdamW steps, lr {cfg.lr:g}"}
    else:
      template = " ".join(f"<ctx-{i}>" for i in range(self.num_context)) + " {}."  # CoOp's "X X ... X {class}."
      template_ids = jnp.asarray(tok.template_ids(tokenizer, (template,), class_tokens))
      context, losses = train_context(m.clip, tokens, template_ids, context_ids, _shot_pixels(cell),
                                      first_id=m.first_id, pooling=m.pooling, mesh=m.mesh, ev=self)
      info = {"protocol": self.describe(), "coop_steps": len(losses),
              "coop_final_loss": losses[-1] if losses else None}
    text = coop.text_features(m.clip, tokens, template_ids, context_ids, context, first_id=m.first_id,
                              pooling=m.pooling)
    scores, labels, _ = cell.scored(clip_head.cosine_scores(cell.test_features, text))
    return scores, labels, info

  def describe(self) -> str:
    flip = " + horizontal flip" if self.flip else ""
    return (f"CoOp: SGD lr {self.lr:g} (momentum {self.momentum:g}, wd {self.weight_decay:g}), cosine over "
            f"{self.epochs} epochs, {self.warmup_epochs} warm-up epoch at {self.warmup_lr:g}, batch "
            f"{self.batch_size}, random resized crop {tuple(self.crop_scale)}{flip}")


def _shot_pixels(cell) -> np.ndarray:
  """uint8 [K, N, R, R, 3]: every class's shots, as the trainer read them."""
  shots = cell.result.shots
  if shots.num_classes != cell.result.num_classes:
    raise ValueError("the CoOp protocol needs every class's shot images, but this process holds only its own "
                     "classes' shots; run it in one process (without --distributed), or use protocol='cached'")
  return np.concatenate([pixels for _, pixels in shots.chunks()])


# ------------------------------------------------------------------ the schedule


def batches_per_epoch(num_images: int, batch_size: int) -> tuple[int, int]:
  """(batch, batches per epoch) as Dassl's loader: drop the last short batch when there are at least `batch_size`
  images; fewer make one batch of all."""
  if num_images < batch_size:
    return num_images, 1
  return batch_size, num_images // batch_size


def schedule(lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: int = 1, warmup_lr: float = 1e-5):
  """CoOp's learning rate at optimiser step t (an optax schedule), constant within an epoch e = t // steps_per_epoch:

    e <  warmup_epochs:  warmup_lr
    e >= warmup_epochs:  lr * (1 + cos(pi * (e - warmup_epochs) / epochs)) / 2

  Dassl's ConstantWarmupScheduler over CosineAnnealingLR(T_max=epochs), the cosine's count restarting after the
  warm-up (WARMUP_RECOUNT=True), both stepped once per epoch.
  """
  def lr_at(step):
    epoch = step // steps_per_epoch
    cosine = 0.5 * lr * (1.0 + jnp.cos(jnp.pi * (epoch - warmup_epochs) / epochs))
    return jnp.where(epoch < warmup_epochs, warmup_lr, cosine)
  return lr_at


# ------------------------------------------------------------------ augmentation


def crop_box(key, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10):
  """torchvision's RandomResizedCrop.get_params: (top, left, crop height, crop width) as int32 scalars.

  Up to `attempts` draws of an area fraction in `scale` and a log-uniform aspect ratio in `ratio`; the first that
  fits is taken, at a uniform position; if none fits, the central crop of the image's aspect clamped to `ratio`.
  """
  k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
  area = height * width
  target = area * jax.random.uniform(k_area, (attempts,), minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(k_ratio, (attempts,), minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
  w = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  top = jnp.floor(jax.random.uniform(k_top, (attempts,)) * (height - h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_left, (attempts,)) * (width - w + 1)).astype(jnp.int32)
  first = jnp.argmax(fits)
  in_ratio = width / height
  if in_ratio < min(ratio):
    fw, fh = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    fw, fh = int(round(height * max(ratio))), height
  else:
    fw, fh = width, height
  fallback = jnp.asarray([(height - fh) // 2, (width - fw) // 2, fh, fw], jnp.int32)
  drawn = jnp.stack([top[first], left[first], h[first], w[first]])
  return tuple(jnp.where(fits.any(), drawn, fallback))


def draw(key, height: int, width: int, scale=(0.08, 1.0)):
  """One image's augmentation: int32 [5] (top, left, crop height, crop width, flipped 0/1)."""
  k_crop, k_flip = jax.random.split(key)
  flipped = (jax.random.uniform(k_flip) < 0.5).astype(jnp.int32)  # torchvision: torch.rand(1) < p
  return jnp.stack([*crop_box(k_crop, height, width, scale), flipped])


def augment(key, image, size: int, scale=(0.08, 1.0), flip: bool = True):
  """One image uint8 [R, R', 3] -> float [size, size, 3] in [0, 1]: a random resized crop (bicubic, antialiased),
  then a horizontal flip with probability 1/2 (`draw`)."""
  top, left, h, w, flipped = draw(key, image.shape[0], image.shape[1], scale)
  s = jnp.stack([size / h, size / w]).astype(jnp.float32)
  out = jax.image.scale_and_translate(image.astype(jnp.float32) / 255.0, (size, size, 3), (0, 1), s,
                                      -jnp.stack([top, left]) * s, method="bicubic", antialias=True)
  if flip:
    out = jnp.where(flipped == 1, out[:, ::-1], out)
  return jnp.clip(out, 0.0, 1.0)


def image_keys(key, epoch, indices):
  """[B] keys: image i's in epoch e is fold_in(fold_in(key, e), i), whatever batch or device it sits in."""
  epoch_key = jax.random.fold_in(key, epoch)
  return jax.vmap(lambda i: jax.random.fold_in(epoch_key, i))(indices)


def augment_batch(key, epoch, images, indices, size: int, scale=(0.08, 1.0), flip: bool = True):
  """images uint8 [B, R, R', 3], the shots at positions `indices` [B] -> float [B, size, size, 3] (`image_keys`)."""
  return jax.vmap(lambda k, x: augment(k, x, size, scale, flip))(image_keys(key, epoch, indices), images)


@functools.partial(jax.jit, static_argnames=("size", "scale", "flip"))
def _encode_augmented(clip, key, epoch, images, indices, *, size, scale, flip):
  return clip_lib.image_features(clip.module, augment_batch(key, epoch, images, indices, size, scale, flip))


# ------------------------------------------------------------------ training


def train_context(clip, tokens, template_ids, context_ids, shots, *, first_id: int, pooling: str, mesh,
                  ev: Evaluator) -> tuple[np.ndarray, list[float]]:
  """CoOp's training of the shared context [M, D] on the shot images uint8 [K, N, R, R, 3]; (context, loss curve)."""
  tokens = jnp.asarray(tokens)
  num_classes, num_shots = shots.shape[:2]
  images = shots.reshape(num_classes * num_shots, *shots.shape[2:])
  labels = np.repeat(np.arange(num_classes), num_shots)
  batch, per_epoch = batches_per_epoch(len(images), ev.batch_size)
  total = ev.epochs * per_epoch if ev.steps is None else min(ev.steps, ev.epochs * per_epoch)
  n = mesh.devices.size
  padded = -(-batch // n) * n
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.CLASS_AXIS))
  config = getattr(clip.module.config, "vision_config", clip.module.config)
  encode = functools.partial(_encode_augmented, size=config.image_size, scale=tuple(map(float, ev.crop_scale)),
                             flip=ev.flip)

  key = jax.random.PRNGKey(ev.seed)
  context = 0.02 * jax.random.normal(key, (len(context_ids), tokens.shape[-1]))  # as methods/coop.py
  order_key, augment_key = jax.random.split(jax.random.fold_in(key, 1))
  optimizer = optax.chain(optax.add_decayed_weights(ev.weight_decay),
                          optax.sgd(schedule(ev.lr, ev.epochs, per_epoch, ev.warmup_epochs, ev.warmup_lr),
                                    momentum=ev.momentum))

  def loss_fn(context, features, batch_labels):
    text = clip_head.class_text_features(clip, tokens, template_ids, first_id=first_id, pooling=pooling,
                                         shared_ids=jnp.asarray(context_ids), shared_vectors=context)
    features = features / jnp.linalg.norm(features, axis=-1, keepdims=True)
    logits = ev.logit_scale * features @ text.T
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels).mean()

  @jax.jit
  def step(context, opt_state, features, batch_labels):
    loss, grads = jax.value_and_grad(loss_fn)(context, features, batch_labels)
    updates, opt_state = optimizer.update(grads, opt_state, context)
    return optax.apply_updates(context, updates), opt_state, loss

  opt_state, losses = optimizer.init(context), []
  for epoch in range(ev.epochs):
    order = np.asarray(jax.random.permutation(jax.random.fold_in(order_key, epoch), len(images)))
    for b in range(per_epoch):
      if len(losses) == total:
        return np.asarray(context), losses
      idx = order[b * batch:(b + 1) * batch]
      idx = np.concatenate([idx, np.repeat(idx[:1], padded - batch)])
      features = encode(clip, augment_key, epoch, jax.device_put(images[idx], sharding),
                        jax.device_put(idx.astype(np.int32), sharding))
      context, opt_state, loss = step(context, opt_state, features[:batch], jnp.asarray(labels[idx[:batch]]))
      losses.append(float(loss))
  return np.asarray(context), losses
