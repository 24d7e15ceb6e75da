"""Pure DDIM + classifier-free guidance: (UNet, schedule, noise, conditioning) -> latents.

  latents = sampling.sample(freeze(sd.unet), sd.schedule, noise, context, uncond, 7.5, num_steps=50)

The same timesteps, update and guidance as diffusers' `StableDiffusionPipeline`
with a `DDIMScheduler` (eta = 0): uncond + g * (cond - uncond), "" as the
unconditional prompt, guidance only when g > 1. No devices, no files, no
decoding: every function here is pure, so it can be jitted, sharded and
differentiated (jax.grad through the loop, e.g. w.r.t. the conditioning);
`generate.py` runs it on a mesh and writes the images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mcti_jax.models import hf_io
from mcti_jax.models.frozen import Frozen
from mcti_jax.models.schedule import NoiseSchedule, SchedulerConfig

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def ddim_timesteps(config: SchedulerConfig, num_steps: int) -> np.ndarray:
  """The descending int32 timesteps [num_steps] of diffusers' `DDIMScheduler.set_timesteps`."""
  n = config.num_train_timesteps
  if not 1 <= num_steps <= n:
    raise ValueError(f"steps must be in 1..{n} (the schedule's num_train_timesteps), not {num_steps}")
  if config.timestep_spacing == "leading":  # SD's: multiples of n // steps, shifted by steps_offset
    t = np.arange(num_steps)[::-1] * (n // num_steps) + config.steps_offset
  elif config.timestep_spacing == "trailing":
    t = np.round(np.arange(n, 0, -n / num_steps)) - 1
  elif config.timestep_spacing == "linspace":
    t = np.linspace(0, n - 1, num_steps).round()[::-1]
  else:
    raise hf_io.unsupported("scheduler_config.json", "timestep_spacing", config.timestep_spacing,
                            " / ".join(TIMESTEP_SPACINGS))
  return np.asarray(t, np.int32)


def check_sampler(config: SchedulerConfig) -> None:
  """Refuse the scheduler options that DDIM here does not implement."""
  if config.thresholding:
    raise hf_io.unsupported("scheduler_config.json", "thresholding", True, "false (pixel-space models only)")
  if config.timestep_spacing not in TIMESTEP_SPACINGS:
    raise hf_io.unsupported("scheduler_config.json", "timestep_spacing", config.timestep_spacing,
                            " / ".join(TIMESTEP_SPACINGS))


def ddim_step(schedule: NoiseSchedule, model_output: jax.Array, timestep, sample: jax.Array,
              num_steps: int) -> jax.Array:
  """x_t -> x_{t - n // num_steps}, deterministic DDIM (diffusers' `DDIMScheduler.step` with eta = 0).

  The step before the first train timestep lands on `final_alpha_cumprod`
  (1, or abar_0 when the config's `set_alpha_to_one` is false).
  """
  config = schedule.config
  prev = timestep - config.num_train_timesteps // num_steps
  abar_prev = jnp.where(prev >= 0, schedule.alphas_cumprod[jnp.maximum(prev, 0)], schedule.final_alpha_cumprod)
  x0, eps = schedule.predict_x0_and_eps(model_output, sample, timestep)
  if config.clip_sample:
    x0 = jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range)
  abar_prev = abar_prev.astype(sample.dtype)
  return jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1 - abar_prev) * eps


def guide(uncond: jax.Array, cond: jax.Array, guidance) -> jax.Array:
  """Classifier-free guidance: uncond + g * (cond - uncond)."""
  return uncond + guidance * (cond - uncond)


def initial_latents(seed, indices: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
  """N(0, 1) latents [len(indices), *shape]; image i draws from fold_in(key(seed), i)."""
  key = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))(indices)


def denoise(unet, schedule: NoiseSchedule, latents: jax.Array, context: jax.Array, uncond_context: jax.Array,
            timesteps: jax.Array, guidance, *, use_cfg: bool, grad_last_step_only: bool = False) -> jax.Array:
  """Run DDIM over `timesteps` [T] from `latents` [B, h, w, c] with the UNet module `unet`.

  context [B, S, D] conditions each image; uncond_context [1, S, D] is the
  encoded "" prompt. Without CFG (use_cfg=False) only the conditional
  prediction is used, as diffusers does for guidance <= 1. With
  grad_last_step_only the first T - 1 steps see the latents, the
  conditioning and the guidance through `stop_gradient`: gradients flow
  through the last step alone (same values, a backward pass of one step).
  """
  num_steps = timesteps.shape[0]
  batch = latents.shape[0]

  def conditioning(context, uncond_context):  # [2B, S, D] with CFG: the "" prompt's rows, then the prompts'
    if not use_cfg:
      return context
    uncond = jnp.broadcast_to(uncond_context, (batch, *uncond_context.shape[1:])).astype(context.dtype)
    return jnp.concatenate([uncond, context])

  def step(i, x, both, guidance):
    t = timesteps[i]
    if use_cfg:
      out = unet(jnp.concatenate([x, x]), t, both).astype(jnp.float32)
      pred = guide(out[:batch], out[batch:], guidance)
    else:
      pred = unet(x, t, both).astype(jnp.float32)
    return ddim_step(schedule, pred, t, x, num_steps)

  x = latents.astype(jnp.float32)
  both = conditioning(context, uncond_context)
  if not grad_last_step_only:
    return jax.lax.fori_loop(0, num_steps, lambda i, x: step(i, x, both, guidance), x)
  x, fixed_both, fixed_guidance = jax.lax.stop_gradient((x, both, guidance))
  x = jax.lax.fori_loop(0, num_steps - 1, lambda i, x: step(i, x, fixed_both, fixed_guidance), x)
  return step(num_steps - 1, x, both, guidance)


def sample(unet: Frozen, schedule: NoiseSchedule, noise: jax.Array, context: jax.Array, uncond_context: jax.Array,
           guidance, num_steps: int, *, use_cfg: bool = True, grad_last_step_only: bool = False) -> jax.Array:
  """Latents [B, h, w, c] from noise [B, h, w, c] after `num_steps` DDIM steps (pure; jit and differentiate it).

  unet is the frozen UNet pytree; num_steps, use_cfg and grad_last_step_only
  are static. See `denoise` for the rest.
  """
  check_sampler(schedule.config)
  timesteps = jnp.asarray(ddim_timesteps(schedule.config, num_steps))
  return denoise(unet.module, schedule, noise, context, uncond_context, timesteps, guidance, use_cfg=use_cfg,
                 grad_last_step_only=grad_last_step_only)
