"""The Stable Diffusion UNet (diffusers' `UNet2DConditionModel`) in Flax NNX.

Covers the SD 1.x and SD 2.x configs: CrossAttnDownBlock2D / DownBlock2D down
blocks, a UNetMidBlock2DCrossAttn mid block, CrossAttnUpBlock2D / UpBlock2D up
blocks, conv (SD1) or linear (SD2) transformer projections. Attribute names
mirror the torch modules, so `hf_io` converts the weights generically.

Images are NHWC. A naming quirk of diffusers is kept: for these configs the
config field `attention_head_dim` holds the NUMBER of heads per block; the head
size is the block's channels divided by it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mcti_jax.models import attention, hf_io

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)


# ---------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """diffusers' UNet2DConditionModel config.json fields, verbatim, with diffusers' defaults."""
  sample_size: Any = None
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "DownBlock2D")
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
  only_cross_attention: bool | tuple[bool, ...] = False
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int | tuple[int, ...] = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1
  dropout: float = 0.0  # Dropout is the identity at inference (torch eval mode); never applied here.
  act_fn: str = "silu"
  norm_num_groups: int | None = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int | tuple[int, ...] = 1280
  transformer_layers_per_block: int | tuple[Any, ...] = 1
  reverse_transformer_layers_per_block: Any = None
  encoder_hid_dim: int | None = None
  encoder_hid_dim_type: str | None = None
  attention_head_dim: int | tuple[int, ...] = 8
  num_attention_heads: int | tuple[int, ...] | None = None
  dual_cross_attention: bool = False
  use_linear_projection: bool = False
  class_embed_type: str | None = None
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  num_class_embeds: int | None = None
  upcast_attention: bool = False
  resnet_time_scale_shift: str = "default"
  resnet_skip_time_act: bool = False  # Only read by block types we don't support.
  resnet_out_scale_factor: float = 1.0  # Only read by block types we don't support.
  time_embedding_type: str = "positional"
  time_embedding_dim: int | None = None
  time_embedding_act_fn: str | None = None
  timestep_post_act: str | None = None
  time_cond_proj_dim: int | None = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  projection_class_embeddings_input_dim: int | None = None
  attention_type: str = "default"
  class_embeddings_concat: bool = False
  mid_block_only_cross_attention: bool | None = None  # Only read by UNetMidBlock2DSimpleCrossAttn.
  cross_attention_norm: str | None = None  # Only read by block types we don't support.
  addition_embed_type_num_heads: int = 64

  @classmethod
  def from_hf(cls, d: dict[str, Any], source: str | os.PathLike = CONFIG_NAME) -> UNetConfig:
    """From a config.json dict; unknown and `_`-prefixed keys are ignored, unsupported values raise."""
    config = cls(**hf_io.config_fields(cls, d))
    config.check(source)
    return config

  def to_hf(self) -> dict[str, Any]:
    """The config.json that diffusers' UNet2DConditionModel.from_pretrained reads."""
    return {"_class_name": "UNet2DConditionModel", **hf_io.config_json(self)}

  def check(self, source: str | os.PathLike = "UNetConfig") -> None:
    """Raise `hf_io.unsupported` for any value this implementation does not cover."""
    n = len(self.down_block_types)

    def need(ok: bool, key: str, supported: str):
      if not ok:
        raise hf_io.unsupported(source, key, getattr(self, key), supported)

    need(all(t in DOWN_BLOCKS for t in self.down_block_types), "down_block_types", " / ".join(DOWN_BLOCKS))
    need(all(t in UP_BLOCKS for t in self.up_block_types), "up_block_types", " / ".join(UP_BLOCKS))
    need(len(self.up_block_types) == n, "up_block_types", f"as many as down_block_types ({n})")
    need(self.mid_block_type in MID_BLOCKS, "mid_block_type", " / ".join(MID_BLOCKS))
    need(len(self.block_out_channels) == n, "block_out_channels", f"one per down block ({n})")
    for key in ("layers_per_block", "attention_head_dim"):
      value = getattr(self, key)
      need(isinstance(value, int) or len(value) == n, key, f"an int or a list with one per down block ({n})")
    need(not any(_per_block(self.only_cross_attention, n)), "only_cross_attention", "false")
    need(self.act_fn in ("silu", "swish"), "act_fn", "silu")
    need(isinstance(self.norm_num_groups, int), "norm_num_groups", "an int")
    need(isinstance(self.cross_attention_dim, int), "cross_attention_dim", "an int")
    need(isinstance(self.transformer_layers_per_block, int) and self.transformer_layers_per_block >= 1,
         "transformer_layers_per_block", "an int >= 1")
    need(self.conv_in_kernel % 2 == 1, "conv_in_kernel", "an odd int")
    need(self.conv_out_kernel % 2 == 1, "conv_out_kernel", "an odd int")
    need(self.resnet_time_scale_shift == "default", "resnet_time_scale_shift", "'default'")
    need(self.time_embedding_type == "positional", "time_embedding_type", "'positional'")
    need(self.attention_type == "default", "attention_type", "'default'")
    need(not self.dual_cross_attention, "dual_cross_attention", "false")
    need(not self.class_embeddings_concat, "class_embeddings_concat", "false")
    for key in ("reverse_transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type",
                "num_attention_heads", "class_embed_type", "num_class_embeds", "addition_embed_type",
                "time_embedding_act_fn", "timestep_post_act", "time_cond_proj_dim"):
      need(getattr(self, key) is None, key, "null")

  # Per-block values, as diffusers expands them.
  @property
  def num_heads(self) -> tuple[int, ...]:
    return _per_block(self.attention_head_dim, len(self.down_block_types))

  @property
  def layers(self) -> tuple[int, ...]:
    return _per_block(self.layers_per_block, len(self.down_block_types))


def _per_block(value, n: int) -> tuple:
  return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n



# ---------------------------------------------------------------- time embedding


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1, scale: float = 1,
                           max_period: int = 10000) -> jax.Array:
  """Sinusoidal embedding of [N] timesteps -> [N, embedding_dim] float32, as diffusers computes it."""
  half = embedding_dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
  emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = scale * emb
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if embedding_dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nnx.Module):

  def __init__(self, in_channels: int, time_embed_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.linear_1 = nnx.Linear(in_channels, time_embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_2 = nnx.Linear(time_embed_dim, time_embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


# ---------------------------------------------------------------------- layers


def _group_norm(channels, groups, eps, dtype, param_dtype, rngs):
  # Two-pass variance, like torch: E[x^2] - E[x]^2 loses precision on large activations.
  return nnx.GroupNorm(channels, num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)


def _layer_norm(dim, dtype, param_dtype, rngs):
  return nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _conv(cin, cout, kernel, dtype, param_dtype, rngs, stride=1, padding=None):
  pad = (kernel - 1) // 2 if padding is None else padding
  return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=pad, dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)


def _call(module, *args):
  return module(*args)


# Gradient checkpointing: recompute a block's activations in the backward pass.
_remat_call = nnx.remat(_call, graph_updates=False)


class ResnetBlock2D(nnx.Module):

  def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, groups: int, eps: float,
               output_scale_factor: float = 1.0, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = _group_norm(in_channels, groups, eps, **kw)
    self.conv1 = _conv(in_channels, out_channels, 3, **kw)
    self.time_emb_proj = nnx.Linear(temb_channels, out_channels, **kw)
    self.norm2 = _group_norm(out_channels, groups, eps, **kw)
    self.conv2 = _conv(out_channels, out_channels, 3, **kw)
    self.conv_shortcut = _conv(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None
    self.output_scale_factor = output_scale_factor

  def __call__(self, x, temb):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return (x + h) / self.output_scale_factor


class Attention(nnx.Module):
  """Multi-head attention; self-attention when `context` is None."""

  def __init__(self, query_dim: int, heads: int, dim_head: int, cross_attention_dim: int | None = None, *,
               upcast: bool = False, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    inner, kv_dim = heads * dim_head, cross_attention_dim or query_dim
    self.to_q = nnx.Linear(query_dim, inner, use_bias=False, **kw)
    self.to_k = nnx.Linear(kv_dim, inner, use_bias=False, **kw)
    self.to_v = nnx.Linear(kv_dim, inner, use_bias=False, **kw)
    self.to_out = nnx.List([nnx.Linear(inner, query_dim, **kw)])  # torch's to_out[1] is a param-free Dropout.
    self.heads, self.dim_head, self.upcast = heads, dim_head, upcast

  def __call__(self, x, context=None):
    context = x if context is None else context
    split = lambda y: y.reshape(*y.shape[:2], self.heads, self.dim_head)
    q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
    out_dtype = q.dtype
    if self.upcast:
      q, k, v = (y.astype(jnp.float32) for y in (q, k, v))
    out = attention.dot_product_attention(q, k, v).astype(out_dtype)
    return self.to_out[0](out.reshape(*out.shape[:2], -1))


class GEGLU(nnx.Module):

  def __init__(self, dim_in: int, dim_out: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.proj = nnx.Linear(dim_in, 2 * dim_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    h, gate = jnp.split(self.proj(x), 2, axis=-1)
    return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):

  def __init__(self, dim: int, mult: int = 4, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # net[1] is torch's param-free Dropout: a None placeholder keeps net[2] at key 'net.2'.
    self.net = nnx.List([GEGLU(dim, dim * mult, **kw), None, nnx.Linear(dim * mult, dim, **kw)])

  def __call__(self, x):
    return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):

  def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int, *, upcast: bool, dtype,
               param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = _layer_norm(dim, **kw)
    self.attn1 = Attention(dim, heads, dim_head, upcast=upcast, **kw)
    self.norm2 = _layer_norm(dim, **kw)
    self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim, upcast=upcast, **kw)
    self.norm3 = _layer_norm(dim, **kw)
    self.ff = FeedForward(dim, **kw)

  def __call__(self, x, context):
    x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context)
    return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
  """GroupNorm, project in, transformer blocks over the H*W tokens, project out, residual."""

  def __init__(self, heads: int, dim_head: int, channels: int, *, num_layers: int, groups: int,
               cross_attention_dim: int, use_linear_projection: bool, upcast: bool, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    inner = heads * dim_head
    self.norm = _group_norm(channels, groups, 1e-6, **kw)  # diffusers fixes eps=1e-6 here.
    proj = (lambda i, o: nnx.Linear(i, o, **kw)) if use_linear_projection else (lambda i, o: _conv(i, o, 1, **kw))
    self.proj_in = proj(channels, inner)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim, upcast=upcast, **kw)
        for _ in range(num_layers)])
    self.proj_out = proj(inner, channels)

  def __call__(self, x, context):
    b, h, w, c = x.shape
    # A 1x1 conv and a linear layer act the same on NHWC: both are a matmul over channels.
    y = self.proj_in(self.norm(x)).reshape(b, h * w, -1)
    for block in self.transformer_blocks:
      y = block(y, context)
    return self.proj_out(y.reshape(b, h, w, -1)) + x


class Downsample2D(nnx.Module):

  def __init__(self, channels: int, padding: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    # padding 0 means diffusers' asymmetric (0, 1) pad on the bottom and right.
    pad = ((0, 1), (0, 1)) if padding == 0 else padding
    self.conv = _conv(channels, channels, 3, dtype, param_dtype, rngs, stride=2, padding=pad)

  def __call__(self, x):
    return self.conv(x)


def upsample_nearest(x, size: Sequence[int] | None = None):
  """torch's F.interpolate(mode='nearest') on NHWC: 2x, or to `size` (H, W)."""
  if size is None or tuple(size) == (2 * x.shape[1], 2 * x.shape[2]):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  for axis, out in zip((1, 2), size):
    n = x.shape[axis]
    index = np.minimum(np.floor(np.arange(out) * np.float32(n / out)).astype(np.int32), n - 1)
    x = jnp.take(x, index, axis=axis)
  return x


class Upsample2D(nnx.Module):

  def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, dtype, param_dtype, rngs)

  def __call__(self, x, size=None):
    return self.conv(upsample_nearest(x, size))


# ---------------------------------------------------------------------- blocks


class DownBlock2D(nnx.Module):
  """diffusers' CrossAttnDownBlock2D (`attentions` set) or DownBlock2D (`attentions` None)."""

  def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, num_layers: int,
               add_downsample: bool, cross_attention: bool, heads: int, config: UNetConfig, remat: bool, dtype,
               param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels,
                      groups=config.norm_num_groups, eps=config.norm_eps, **kw) for i in range(num_layers)])
    self.attentions = nnx.List([_transformer(out_channels, heads, config, **kw)
                                for _ in range(num_layers)]) if cross_attention else None
    self.downsamplers = nnx.List([Downsample2D(out_channels, config.downsample_padding, **kw)
                                  ]) if add_downsample else None
    self.remat = remat

  def __call__(self, x, temb, context):
    outputs = []
    for i, resnet in enumerate(self.resnets):
      x = _run(resnet, self.remat, x, temb)
      if self.attentions is not None:
        x = _run(self.attentions[i], self.remat, x, context)
      outputs.append(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      outputs.append(x)
    return x, outputs


class UNetMidBlock2DCrossAttn(nnx.Module):

  def __init__(self, channels: int, temb_channels: int, *, heads: int, config: UNetConfig, remat: bool, dtype,
               param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([
        ResnetBlock2D(channels, channels, temb_channels, groups=config.norm_num_groups, eps=config.norm_eps,
                      output_scale_factor=config.mid_block_scale_factor, **kw) for _ in range(2)])
    self.attentions = nnx.List([_transformer(channels, heads, config, **kw)])
    self.remat = remat

  def __call__(self, x, temb, context):
    x = _run(self.resnets[0], self.remat, x, temb)
    x = _run(self.attentions[0], self.remat, x, context)
    return _run(self.resnets[1], self.remat, x, temb)


class UpBlock2D(nnx.Module):
  """diffusers' CrossAttnUpBlock2D (`attentions` set) or UpBlock2D (`attentions` None)."""

  def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int, *,
               num_layers: int, add_upsample: bool, cross_attention: bool, heads: int, config: UNetConfig,
               remat: bool, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    resnets = []
    for i in range(num_layers):
      skip = in_channels if i == num_layers - 1 else out_channels
      cin = prev_output_channel if i == 0 else out_channels
      resnets.append(ResnetBlock2D(cin + skip, out_channels, temb_channels, groups=config.norm_num_groups,
                                   eps=config.norm_eps, **kw))
    self.resnets = nnx.List(resnets)
    self.attentions = nnx.List([_transformer(out_channels, heads, config, **kw)
                                for _ in range(num_layers)]) if cross_attention else None
    self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)]) if add_upsample else None
    self.remat = remat

  def __call__(self, x, skips, temb, context, upsample_size=None):
    """`skips` are the down path's outputs for this block, consumed last first."""
    for i, resnet in enumerate(self.resnets):
      x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
      x = _run(resnet, self.remat, x, temb)
      if self.attentions is not None:
        x = _run(self.attentions[i], self.remat, x, context)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x, upsample_size)
    return x


def _transformer(channels: int, heads: int, config: UNetConfig, **kw) -> Transformer2DModel:
  return Transformer2DModel(heads, channels // heads, channels, num_layers=config.transformer_layers_per_block,
                            groups=config.norm_num_groups, cross_attention_dim=config.cross_attention_dim,
                            use_linear_projection=config.use_linear_projection, upcast=config.upcast_attention,
                            **kw)


def _run(module, remat: bool, *args):
  return _remat_call(module, *args) if remat else module(*args)


# ----------------------------------------------------------------------- model


class UNet2DConditionModel(nnx.Module):
  """Noise prediction eps(x_t, t, text) of Stable Diffusion; NHWC in and out."""

  def __init__(self, config: UNetConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
               rngs: nnx.Rngs):
    config.check()
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    blocks = dict(config=config, remat=remat, **kw)
    channels, heads, layers = config.block_out_channels, config.num_heads, config.layers
    n = len(channels)
    time_dim = config.time_embedding_dim or 4 * channels[0]
    self.config, self.dtype = config, dtype

    self.conv_in = _conv(config.in_channels, channels[0], config.conv_in_kernel, **kw)
    self.time_embedding = TimestepEmbedding(channels[0], time_dim, **kw)

    down, cout = [], channels[0]
    for i, kind in enumerate(config.down_block_types):
      cin, cout = cout, channels[i]
      down.append(DownBlock2D(cin, cout, time_dim, num_layers=layers[i], add_downsample=i < n - 1,
                              cross_attention=kind == "CrossAttnDownBlock2D", heads=heads[i], **blocks))
    self.down_blocks = nnx.List(down)

    self.mid_block = UNetMidBlock2DCrossAttn(channels[-1], time_dim, heads=heads[-1], **blocks)

    up, rchannels, rheads, rlayers = [], channels[::-1], heads[::-1], layers[::-1]
    cout = rchannels[0]
    for i, kind in enumerate(config.up_block_types):
      prev, cout, cin = cout, rchannels[i], rchannels[min(i + 1, n - 1)]
      up.append(UpBlock2D(cin, prev, cout, time_dim, num_layers=rlayers[i] + 1, add_upsample=i < n - 1,
                          cross_attention=kind == "CrossAttnUpBlock2D", heads=rheads[i], **blocks))
    self.up_blocks = nnx.List(up)

    self.conv_norm_out = _group_norm(channels[0], config.norm_num_groups, config.norm_eps, **kw)
    self.conv_out = _conv(channels[0], config.out_channels, config.conv_out_kernel, **kw)

  def __call__(self, sample: jax.Array, timesteps: jax.Array | int | float,
               encoder_hidden_states: jax.Array) -> jax.Array:
    """sample [B, H, W, in_channels], timesteps [B] or scalar, encoder_hidden_states [B, S, cross_attention_dim]
    -> [B, H, W, out_channels] in the compute dtype."""
    config = self.config
    x = sample.astype(self.dtype)
    if config.center_input_sample:
      x = 2 * x - 1.0
    t = jnp.broadcast_to(jnp.ravel(jnp.asarray(timesteps)), (x.shape[0],))
    t_emb = get_timestep_embedding(t, config.block_out_channels[0], config.flip_sin_to_cos, config.freq_shift)
    temb = self.time_embedding(t_emb.astype(self.dtype))
    context = encoder_hidden_states.astype(self.dtype)

    x = self.conv_in(x)
    skips = [x]
    for block in self.down_blocks:
      x, outputs = block(x, temb, context)
      skips += outputs

    x = self.mid_block(x, temb, context)

    for block in self.up_blocks:
      n = len(block.resnets)
      skips, block_skips = skips[:-n], skips[-n:]
      # Upsample to the next skip's size: 2x, or what an odd input size needs (diffusers' upsample_size).
      size = skips[-1].shape[1:3] if skips else None
      x = block(x, block_skips, temb, context, size)

    x = jax.nn.silu(self.conv_norm_out(x))
    return self.conv_out(x)


# ------------------------------------------------------------------------- I/O


def from_pretrained(path_or_hub_id: str | os.PathLike, subfolder: str | None = "unet", *, dtype=jnp.float32,
                    param_dtype=jnp.float32, variant: str | None = None,
                    remat: bool = False) -> UNet2DConditionModel:
  """Load a diffusers UNet folder (config.json + diffusion_pytorch_model[.variant].safetensors)."""
  folder = hf_io.resolve_folder(path_or_hub_id, subfolder, variant=variant)
  config = UNetConfig.from_hf(hf_io.read_config(folder, CONFIG_NAME), folder / CONFIG_NAME)
  build = lambda: UNet2DConditionModel(config, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0))
  return hf_io.load_model(build, folder, WEIGHTS_NAME, param_dtype=param_dtype, variant=variant)


def save_pretrained(model: UNet2DConditionModel, folder: str | os.PathLike) -> None:
  """Write a folder that diffusers' UNet2DConditionModel.from_pretrained loads (float32 weights)."""
  hf_io.save_model(model, folder, model.config.to_hf(), WEIGHTS_NAME)
