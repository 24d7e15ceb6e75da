"""The DDPM noise schedule of a diffusers pipeline (`scheduler/scheduler_config.json`).

Training only needs alphas_cumprod (abar_t): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
and every diffusers scheduler class (PNDM, DDIM, DDPM, Euler...) builds it the
same way from the same config fields. `NoiseSchedule` is a pytree (the array is
a leaf, the config static), so it passes into `jax.jit` as an argument and its
methods are pure functions of (x, t).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mcti_jax.models import hf_io

CONFIG_NAME = "scheduler_config.json"

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Defaults that differ from DDPM/DDIM's for the classes that lack (or change) a field,
# so that a config.json without the key means what its `_class_name` means by it.
_NO_CLIP_LINSPACE = {"clip_sample": False, "timestep_spacing": "linspace"}
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "PNDMScheduler": {"set_alpha_to_one": False, "clip_sample": False},
    "EulerDiscreteScheduler": _NO_CLIP_LINSPACE,
    "EulerAncestralDiscreteScheduler": _NO_CLIP_LINSPACE,
    "LMSDiscreteScheduler": _NO_CLIP_LINSPACE,
    "DPMSolverMultistepScheduler": _NO_CLIP_LINSPACE,
}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """scheduler_config.json fields, verbatim, with the defaults of diffusers' DDPMScheduler/DDIMScheduler.

  Only the first block defines the training schedule; the rest are kept for
  samplers (DDIM) and written back by `to_hf`.
  """
  num_train_timesteps: int = 1000
  beta_start: float = 0.0001
  beta_end: float = 0.02
  beta_schedule: str = "linear"
  trained_betas: tuple[float, ...] | None = None
  rescale_betas_zero_snr: bool = False
  prediction_type: str = "epsilon"
  # Sampling only.
  variance_type: str = "fixed_small"
  clip_sample: bool = True
  clip_sample_range: float = 1.0
  thresholding: bool = False
  dynamic_thresholding_ratio: float = 0.995
  sample_max_value: float = 1.0
  set_alpha_to_one: bool = True
  steps_offset: int = 0
  timestep_spacing: str = "leading"
  skip_prk_steps: bool = False  # PNDMScheduler only.

  @classmethod
  def from_hf(cls, d: dict[str, Any], source: str | os.PathLike = CONFIG_NAME) -> SchedulerConfig:
    """From a scheduler_config.json dict; unknown and `_`-prefixed keys are ignored, unsupported values raise."""
    values = dict(_CLASS_DEFAULTS.get(d.get("_class_name", ""), {}))
    values.update(hf_io.config_fields(cls, d))
    config = cls(**values)
    config.check(source)
    return config

  def to_hf(self, class_name: str = "DDPMScheduler") -> dict[str, Any]:
    """The scheduler_config.json that diffusers' DDPMScheduler/DDIMScheduler.from_pretrained reads."""
    return {"_class_name": class_name, **hf_io.config_json(self)}

  def check(self, source: str | os.PathLike = "SchedulerConfig") -> None:
    """Raise `hf_io.unsupported` for any value this implementation does not cover."""
    if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
      raise hf_io.unsupported(source, "beta_schedule", self.beta_schedule, " / ".join(BETA_SCHEDULES))
    if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
      raise hf_io.unsupported(source, "trained_betas", f"<{len(self.trained_betas)} values>",
                              f"num_train_timesteps={self.num_train_timesteps} values")
    if self.prediction_type not in PREDICTION_TYPES:
      raise hf_io.unsupported(source, "prediction_type", self.prediction_type, " / ".join(PREDICTION_TYPES))


def betas(config: SchedulerConfig) -> np.ndarray:
  """The [num_train_timesteps] float32 betas, as diffusers' schedulers compute them."""
  n, start, end = config.num_train_timesteps, config.beta_start, config.beta_end
  if config.trained_betas is not None:
    b = np.asarray(config.trained_betas, np.float64)
  elif config.beta_schedule == "linear":
    b = np.linspace(start, end, n, dtype=np.float64)
  elif config.beta_schedule == "scaled_linear":  # Latent diffusion's: linear in sqrt(beta).
    b = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
  elif config.beta_schedule == "squaredcos_cap_v2":  # Improved DDPM's cosine abar, betas capped at 0.999.
    abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    b = np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)])
  elif config.beta_schedule == "sigmoid":
    b = 1 / (1 + np.exp(-np.linspace(-6, 6, n))) * (end - start) + start
  else:
    raise hf_io.unsupported("SchedulerConfig", "beta_schedule", config.beta_schedule, " / ".join(BETA_SCHEDULES))
  b = b.astype(np.float32)
  if config.rescale_betas_zero_snr:
    b = _rescale_zero_terminal_snr(b)
  return b


def _rescale_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
  """Shift and scale sqrt(abar) so the last step is pure noise (arXiv:2305.08891, Algorithm 1)."""
  sqrt_abar = np.sqrt(np.cumprod(1.0 - b.astype(np.float64)))
  first, last = sqrt_abar[0], sqrt_abar[-1]
  abar = ((sqrt_abar - last) * first / (first - last)) ** 2
  alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
  return (1.0 - alphas).astype(np.float32)


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
  """abar_t = prod_{s<=t} (1 - beta_s), float32 (products taken in float64, like torch's CPU cumprod)."""
  alphas = np.float32(1.0) - betas(config)  # float32, as diffusers
  return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


@struct.dataclass
class NoiseSchedule:
  """abar_t [num_train_timesteps] and the config. Methods take t as an int array that broadcasts
  against x from the left: t [B] with x [B, H, W, C], or a scalar t with any x."""
  alphas_cumprod: jax.Array
  config: SchedulerConfig = struct.field(pytree_node=False)

  @classmethod
  def from_config(cls, config: SchedulerConfig) -> NoiseSchedule:
    return cls(jnp.asarray(alphas_cumprod(config), jnp.float32), config)

  @property
  def num_train_timesteps(self) -> int:
    return self.config.num_train_timesteps

  @property
  def prediction_type(self) -> str:
    return self.config.prediction_type

  @property
  def final_alpha_cumprod(self) -> jax.Array:
    """abar of the step "before" t=0, which DDIM steps to last: 1 or abar_0 (config.set_alpha_to_one)."""
    return jnp.ones((), jnp.float32) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

  def _coefficients(self, t: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sqrt(abar_t), sqrt(1 - abar_t), shaped to broadcast against x, in x's dtype (as diffusers)."""
    t = jnp.asarray(t)
    abar = self.alphas_cumprod[t].reshape(t.shape + (1,) * (x.ndim - t.ndim))
    return jnp.sqrt(abar).astype(x.dtype), jnp.sqrt(1.0 - abar).astype(x.dtype)

  def add_noise(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    a, s = self._coefficients(t, x0)
    return a * x0 + s * noise

  def velocity(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (diffusers' get_velocity)."""
    a, s = self._coefficients(t, x0)
    return a * noise - s * x0

  def training_target(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What the UNet is trained to output at x_t: noise, v or x0, by config.prediction_type."""
    if self.config.prediction_type == "epsilon":
      return noise
    if self.config.prediction_type == "v_prediction":
      return self.velocity(x0, noise, t)
    return x0

  def predict_x0_and_eps(self, model_output: jax.Array, x_t: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The (x0, noise) pair that the model output implies at x_t (the first half of a DDIM step)."""
    a, s = self._coefficients(t, x_t)
    if self.config.prediction_type == "epsilon":
      eps = model_output
      return (x_t - s * eps) / a, eps
    if self.config.prediction_type == "v_prediction":
      return a * x_t - s * model_output, a * model_output + s * x_t
    x0 = model_output
    return x0, (x_t - a * x0) / s

  def to_hf(self, class_name: str = "DDPMScheduler") -> dict[str, Any]:
    return self.config.to_hf(class_name)


def from_pretrained(path_or_hub_id: str | os.PathLike, subfolder: str | None = "scheduler") -> NoiseSchedule:
  """The schedule of a pipeline folder (subfolder='scheduler') or of a folder holding scheduler_config.json."""
  folder = hf_io.resolve_folder(path_or_hub_id, subfolder)
  config = SchedulerConfig.from_hf(hf_io.read_config(folder, CONFIG_NAME), folder / CONFIG_NAME)
  return NoiseSchedule.from_config(config)


def save_pretrained(schedule: NoiseSchedule | SchedulerConfig, folder: str | os.PathLike,
                    class_name: str = "DDPMScheduler") -> None:
  """Write scheduler_config.json, loadable by diffusers' DDPMScheduler/DDIMScheduler.from_pretrained."""
  config = schedule.config if isinstance(schedule, NoiseSchedule) else schedule
  hf_io.write_folder(folder, {CONFIG_NAME: config.to_hf(class_name)})
