"""The Stable Diffusion VAE (diffusers' `AutoencoderKL`) in Flax NNX.

Images are NHWC in [-1, 1]. `encode` gives the mean and log-variance of the
latent Gaussian; `decode` maps latents back to images. Neither applies the
config's `scaling_factor` (0.18215 for SD 1.x) or `shift_factor`: the UNet
works on `encode_latents(vae, images, key)` (or `moments_to_latents` of cached
moments), and `unscale_latents` undoes the scaling before `decode`.

Attribute names mirror the torch modules (`encoder.down_blocks.0.resnets.1...`),
so `hf_io` converts the weights generically. Old checkpoints that name the
mid-block attention `query/key/value/proj_attn` load too (see `_new_attention_key`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mcti_jax.models import attention, hf_io

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

DOWN_BLOCKS = ("DownEncoderBlock2D",)
UP_BLOCKS = ("UpDecoderBlock2D",)
EPS = 1e-6  # diffusers hard-codes this eps for every GroupNorm of the VAE.
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance to this.

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch.nn.GELU() is the exact erf form.
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}


# ---------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """diffusers' AutoencoderKL config.json fields, verbatim, with diffusers' defaults."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: Any = 32  # Only used by diffusers' tiled decoding.
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None  # Used by some pipelines (SDXL refiners); not by us.
  latents_std: tuple[float, ...] | None = None
  force_upcast: bool = True  # A hint to pipelines to run the VAE in float32; we honour `dtype` as given.
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @classmethod
  def from_hf(cls, d: dict[str, Any], source: str | os.PathLike = CONFIG_NAME) -> VAEConfig:
    """From a config.json dict; unknown and `_`-prefixed keys are ignored, unsupported values raise."""
    config = cls(**hf_io.config_fields(cls, d))
    config.check(source)
    return config

  def to_hf(self) -> dict[str, Any]:
    """The config.json that diffusers' AutoencoderKL.from_pretrained reads."""
    return {"_class_name": "AutoencoderKL", **hf_io.config_json(self)}

  def check(self, source: str | os.PathLike = "VAEConfig") -> None:
    """Raise `hf_io.unsupported` for any value this implementation does not cover."""
    n = len(self.block_out_channels)

    def need(ok: bool, key: str, supported: str):
      if not ok:
        raise hf_io.unsupported(source, key, getattr(self, key), supported)

    need(all(t in DOWN_BLOCKS for t in self.down_block_types), "down_block_types", " / ".join(DOWN_BLOCKS))
    need(all(t in UP_BLOCKS for t in self.up_block_types), "up_block_types", " / ".join(UP_BLOCKS))
    need(len(self.down_block_types) == n, "down_block_types", f"one per block_out_channels entry ({n})")
    need(len(self.up_block_types) == n, "up_block_types", f"one per block_out_channels entry ({n})")
    need(self.act_fn in _ACTIVATIONS, "act_fn", " / ".join(_ACTIVATIONS))
    need(isinstance(self.layers_per_block, int) and self.layers_per_block >= 1, "layers_per_block", "an int >= 1")
    need(all(c % self.norm_num_groups == 0 for c in self.block_out_channels), "norm_num_groups",
         f"a divisor of every block_out_channels entry {self.block_out_channels}")



# --------------------------------------------------------------------- layers


class _Layers:
  """Builds layers with the model's dtype, param_dtype and rngs."""

  def __init__(self, dtype, param_dtype, rngs: nnx.Rngs):
    self.dtype, self.param_dtype, self.rngs = dtype, param_dtype, rngs

  def conv(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: Any = 1) -> nnx.Conv:
    return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=padding, dtype=self.dtype,
                    param_dtype=self.param_dtype, rngs=self.rngs)

  def norm(self, channels: int, groups: int) -> nnx.GroupNorm:
    # Two-pass variance: the decoder's activations are large enough for E[x^2] - E[x]^2 to lose digits.
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=EPS, use_fast_variance=False, dtype=self.dtype,
                         param_dtype=self.param_dtype, rngs=self.rngs)

  def linear(self, cin: int, cout: int) -> nnx.Linear:
    return nnx.Linear(cin, cout, dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs)


class ResnetBlock2D(nnx.Module):
  """diffusers' ResnetBlock2D without a time embedding (temb_channels=None)."""

  def __init__(self, cin: int, cout: int, groups: int, act: Callable, make: _Layers):
    self.act = act
    self.norm1 = make.norm(cin, groups)
    self.conv1 = make.conv(cin, cout)
    self.norm2 = make.norm(cout, groups)
    self.conv2 = make.conv(cout, cout)
    self.conv_shortcut = make.conv(cin, cout, kernel=1, padding=0) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(self.act(self.norm1(x)))
    h = self.conv2(self.act(self.norm2(h)))  # Dropout is the identity at inference.
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class Attention(nnx.Module):
  """The mid block's single-head self-attention over all pixels, with a residual."""

  def __init__(self, channels: int, groups: int, make: _Layers):
    self.group_norm = make.norm(channels, groups)
    self.to_q = make.linear(channels, channels)
    self.to_k = make.linear(channels, channels)
    self.to_v = make.linear(channels, channels)
    self.to_out = nnx.List([make.linear(channels, channels)])  # to_out.1 is a Dropout in torch.

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    tokens = self.group_norm(x).reshape(b, h * w, 1, c)  # [B, T, heads=1, head_dim=C]
    q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
    out = attention.dot_product_attention(q, k, v)  # scale 1/sqrt(C); softmax in float32
    out = self.to_out[0](out.reshape(b, h * w, c)).reshape(b, h, w, c)
    return out + x


class Downsample2D(nnx.Module):
  """Stride-2 3x3 conv after padding one zero row/column at the bottom/right (diffusers' padding=0 case)."""

  def __init__(self, channels: int, make: _Layers):
    self.conv = make.conv(channels, channels, stride=2, padding=((0, 1), (0, 1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample2D(nnx.Module):
  """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

  def __init__(self, channels: int, make: _Layers):
    self.conv = make.conv(channels, channels)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownEncoderBlock2D(nnx.Module):

  def __init__(self, cin: int, cout: int, num_layers: int, add_downsample: bool, groups: int, act: Callable,
               make: _Layers):
    self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, act, make)
                             for i in range(num_layers)])
    self.downsamplers = nnx.List([Downsample2D(cout, make)]) if add_downsample else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
    return x


class UpDecoderBlock2D(nnx.Module):

  def __init__(self, cin: int, cout: int, num_layers: int, add_upsample: bool, groups: int, act: Callable,
               make: _Layers):
    self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, act, make)
                             for i in range(num_layers)])
    self.upsamplers = nnx.List([Upsample2D(cout, make)]) if add_upsample else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x


class UNetMidBlock2D(nnx.Module):
  """resnet, (attention), resnet: diffusers' UNetMidBlock2D with num_layers=1 and no time embedding."""

  def __init__(self, channels: int, add_attention: bool, groups: int, act: Callable, make: _Layers):
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups, act, make) for _ in range(2)])
    self.attentions = nnx.List([Attention(channels, groups, make)]) if add_attention else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    if self.attentions is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class Encoder(nnx.Module):
  """Image [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * latent_channels] (before quant_conv)."""

  def __init__(self, config: VAEConfig, act: Callable, make: _Layers):
    channels, groups = config.block_out_channels, config.norm_num_groups
    self.conv_in = make.conv(config.in_channels, channels[0])
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block,
                           add_downsample=i < len(channels) - 1, groups=groups, act=act, make=make)
        for i in range(len(channels))
    ])
    self.mid_block = UNetMidBlock2D(channels[-1], config.mid_block_add_attention, groups, act, make)
    self.conv_norm_out = make.norm(channels[-1], groups)
    self.conv_out = make.conv(channels[-1], 2 * config.latent_channels)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))  # SiLU whatever act_fn is, as in diffusers.


class Decoder(nnx.Module):
  """Latent [B, h, w, latent_channels] -> image [B, h*f, w*f, out_channels]. Up blocks run the channels reversed."""

  def __init__(self, config: VAEConfig, act: Callable, make: _Layers):
    channels, groups = config.block_out_channels, config.norm_num_groups
    reversed_channels = tuple(reversed(channels))
    self.conv_in = make.conv(config.latent_channels, channels[-1])
    self.mid_block = UNetMidBlock2D(channels[-1], config.mid_block_add_attention, groups, act, make)
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(reversed_channels[max(i - 1, 0)], reversed_channels[i], config.layers_per_block + 1,
                         add_upsample=i < len(channels) - 1, groups=groups, act=act, make=make)
        for i in range(len(channels))
    ])
    self.conv_norm_out = make.norm(channels[0], groups)
    self.conv_out = make.conv(channels[0], config.out_channels)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))  # SiLU whatever act_fn is, as in diffusers.


# ---------------------------------------------------------------------- model


class AutoencoderKL(nnx.Module):
  """The KL autoencoder of Stable Diffusion. `__call__`, `encode` and `decode` are pure.

  Outputs are float32 whatever the compute `dtype`: latents get cached and
  images get saved, and both are small next to the activations.
  """

  def __init__(self, config: VAEConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    config.check()
    self.config = config
    act = _ACTIVATIONS[config.act_fn]
    make = _Layers(dtype, param_dtype, rngs)
    self.encoder = Encoder(config, act, make)
    self.decoder = Decoder(config, act, make)
    latent = config.latent_channels
    self.quant_conv = make.conv(2 * latent, 2 * latent, kernel=1, padding=0) if config.use_quant_conv else None
    self.post_quant_conv = make.conv(latent, latent, kernel=1, padding=0) if config.use_post_quant_conv else None

  @property
  def scaling_factor(self) -> float:
    """Multiply sampled latents by this (after subtracting `shift_factor`) before the UNet sees them."""
    return self.config.scaling_factor

  @property
  def shift_factor(self) -> float:
    return self.config.shift_factor or 0.0

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images [B, H, W, C] in [-1, 1] -> (mean, logvar) [B, H/f, W/f, latent_channels], float32.

    logvar is clipped to [-30, 20] as diffusers does. Unscaled: see `scale_latents`.
    """
    moments = self.encoder(images)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, latents: jax.Array) -> jax.Array:
    """Unscaled latents [B, h, w, latent_channels] -> images [B, h*f, w*f, C] (about [-1, 1]), float32."""
    if self.post_quant_conv is not None:
      latents = self.post_quant_conv(latents)
    return self.decoder(latents).astype(jnp.float32)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Reconstruction through the posterior mean (diffusers' forward with sample_posterior=False)."""
    mean, _ = self.encode(images)
    return self.decode(mean)


# ----------------------------------------------------------------- pure helpers


def sample_latent(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
  """A draw of the latent Gaussian: mean + exp(logvar / 2) * N(0, 1) (diffusers' `latent_dist.sample()`)."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)


def scale_latents(latents: jax.Array, config: VAEConfig) -> jax.Array:
  """VAE latents -> the UNet's latent space: (z - shift_factor) * scaling_factor."""
  if config.shift_factor:  # None or 0 for SD 1.x: no subtraction at all (keeps old results bit for bit)
    latents = latents - config.shift_factor
  return latents * config.scaling_factor


def moments_to_latents(mean: jax.Array, logvar: jax.Array, config: VAEConfig, key: jax.Array | None = None
                       ) -> jax.Array:
  """The UNet's x0 from the VAE's (mean, logvar): (sample - shift_factor) * scaling_factor, as diffusers.

  sample is a draw of the latent Gaussian with `key`, or its mean without.
  With shift_factor 0/None this is exactly
  (mean + exp(0.5 * logvar) * normal(key, mean.shape)) * scaling_factor.
  `config` is a VAEConfig (or anything with scaling_factor and shift_factor).
  """
  sample = mean if key is None else sample_latent(mean, logvar, key)
  return scale_latents(sample, config)


def encode_latents(vae: AutoencoderKL, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
  """Images [B, H, W, C] in [-1, 1] -> the UNet's x0 [B, h, w, c]: `encode`, then `moments_to_latents`."""
  mean, logvar = vae.encode(images)
  return moments_to_latents(mean, logvar, vae.config, key)


def unscale_latents(latents: jax.Array, config: VAEConfig) -> jax.Array:
  """The inverse of `scale_latents`, applied before `decode`."""
  return latents / config.scaling_factor + (config.shift_factor or 0.0)


def decode_images(vae: AutoencoderKL, latents: jax.Array) -> jax.Array:
  """The UNet's latents -> images in [0, 1] (float32), as diffusers' pipeline + image processor."""
  images = vae.decode(unscale_latents(latents, vae.config))
  return jnp.clip(images / 2 + 0.5, 0.0, 1.0)


# ------------------------------------------------------------ loading and saving

# Old diffusers checkpoints (the deprecated AttentionBlock) name the mid-block
# attention's linears query/key/value/proj_attn; the tensors have the same
# [C, C] shapes, so only the key changes (as in diffusers' _fix_state_dict_keys_on_load).
_OLD_ATTENTION_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_OLD_TO_NEW = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _new_attention_key(key: str) -> str:
  match = _OLD_ATTENTION_KEY.match(key)
  if match is None:
    return key
  path, old, leaf = match.groups()
  return f"{path}.{_OLD_TO_NEW[old]}.{leaf}"


def from_pretrained(path_or_hub_id: str | os.PathLike, subfolder: str | None = "vae", *, dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32, variant: str | None = None) -> AutoencoderKL:
  """Our AutoencoderKL from a diffusers folder (a pipeline folder with subfolder='vae', or a VAE folder with None).

  `variant` (e.g. "fp16") reads diffusion_pytorch_model.<variant>.safetensors.
  """
  folder = hf_io.resolve_folder(path_or_hub_id, subfolder, variant=variant)
  config = VAEConfig.from_hf(hf_io.read_config(folder, CONFIG_NAME), folder / CONFIG_NAME)
  build = lambda: AutoencoderKL(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  return hf_io.load_model(build, folder, WEIGHTS_NAME, renames=_new_attention_key, param_dtype=param_dtype,
                          variant=variant)


def save_pretrained(model: AutoencoderKL, folder: str | os.PathLike) -> None:
  """Write config.json + diffusion_pytorch_model.safetensors that diffusers' AutoencoderKL loads."""
  hf_io.save_model(model, folder, model.config.to_hf(), WEIGHTS_NAME)
