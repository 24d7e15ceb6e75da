"""CLIP text and vision towers in Flax NNX, loading transformers/diffusers checkpoints.

Attribute names mirror transformers' CLIP modules, so parameter paths map to
torch keys one to one (see hf_io.py):

  CLIPTextModel    text_model.{embeddings,encoder,final_layer_norm}, [text_projection]
                   (an SD `text_encoder/` folder; with the projection it is
                   transformers' CLIPTextModelWithProjection)
  CLIPVisionModel  vision_model.{embeddings,pre_layrnorm,encoder,post_layernorm}, [visual_projection]
  CLIPModel        both towers, text_projection, visual_projection, logit_scale
                   (a transformers CLIP folder such as openai/clip-vit-large-patch14)

The text towers of CLIPTextModel and CLIPModel have the same keys, so either
tower can be loaded alone from a full CLIP folder (`text_from_pretrained`,
`vision_from_pretrained`).

Pooling trap. CLIP pools the text at the EOS token. transformers does it in two
ways, chosen by `config.eos_token_id`: when it is 2 (the legacy, wrong value
still found in the SD1.x text_encoder config) it pools at `input_ids.argmax(-1)`,
i.e. at the largest id, which is EOS only as long as no added token (id > EOS)
is in the prompt; otherwise it pools at the first `input_ids == eos_token_id`.
We take the rule as an argument: `pooling="eos"` (default) pools at the first
real EOS, `pooling="argmax"` reproduces the legacy rule (as the official MC-TI
code, run on SD1.x, gets it). The real EOS id cannot be read off a legacy
config: `vocab_size - 1` is <|endoftext|> only until the vocabulary is resized
for added tokens, as diffusers' textual_inversion.py does when it saves a
pipeline (the config keeps eos_token_id 2, <|endoftext|> keeps its id). So the
text transformer holds the id it pools at (`eos_token_id`, a static attribute):
the checkpoint's tokenizer's EOS when the loader is given it (pipeline.py's
loaders always do; it wins over the config, as it is what made the ids), else a
non-legacy `config.eos_token_id`, else none, and `pooling="eos"` then raises
asking for the tokenizer. An `eos_token_id` argument to a call overrides it.
Placeholder tokens do not resize our embedding table (their vectors come in
through `inputs_embeds`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mcti_jax.models import attention, hf_io

WEIGHTS_NAME = "model.safetensors"
LEGACY_EOS_TOKEN_ID = 2  # transformers pools at argmax(input_ids) for this value
POOLINGS = ("eos", "argmax")
_ACTIVATIONS = ("quick_gelu", "gelu")

# CLIP image normalisation (OpenAI's values; transformers' OPENAI_CLIP_MEAN/STD).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------- configs


def _from_hf(cls, d: dict[str, Any], source):
  """`cls` from the keys of `d` it has; a value we do not implement raises, naming file and key."""
  kw = hf_io.config_fields(cls, d)
  for key in ("image_size", "patch_size", "eos_token_id"):
    if key in kw and (not isinstance(kw[key], int) or isinstance(kw[key], bool)):
      raise hf_io.unsupported(source, key, kw[key], "a single int")
  config = cls(**kw)
  if config.hidden_act not in _ACTIVATIONS:
    raise hf_io.unsupported(source, "hidden_act", config.hidden_act, ", ".join(_ACTIVATIONS))
  if config.hidden_size % config.num_attention_heads:
    raise hf_io.unsupported(source, "num_attention_heads", config.num_attention_heads,
                            f"a divisor of hidden_size={config.hidden_size}")
  return config


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """transformers' `CLIPTextConfig` fields we use, with its defaults (ViT-B/32's text tower)."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"  # OpenAI CLIP / SD1; "gelu" for OpenCLIP / SD2
  layer_norm_eps: float = 1e-5
  pad_token_id: int | None = 1
  bos_token_id: int | None = 49406
  eos_token_id: int = 49407  # 2 in legacy configs (SD1.x): see the module docstring

  @classmethod
  def from_hf(cls, d: dict[str, Any], source: str | os.PathLike = "config.json") -> "CLIPTextConfig":
    return _from_hf(cls, d, source)

  def to_hf(self, architecture: str = "CLIPTextModel") -> dict[str, Any]:
    return {**dataclasses.asdict(self), "architectures": [architecture], "model_type": "clip_text_model"}

  @property
  def transformers_pooling(self) -> str:
    """The pooling transformers applies to this config ('argmax' for the legacy eos_token_id=2)."""
    return "argmax" if self.eos_token_id == LEGACY_EOS_TOKEN_ID else "eos"


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """transformers' `CLIPVisionConfig` fields we use, with its defaults (ViT-B/32)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @classmethod
  def from_hf(cls, d: dict[str, Any], source: str | os.PathLike = "config.json") -> "CLIPVisionConfig":
    return _from_hf(cls, d, source)

  def to_hf(self, architecture: str = "CLIPVisionModel") -> dict[str, Any]:
    return {**dataclasses.asdict(self), "architectures": [architecture], "model_type": "clip_vision_model"}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """transformers' `CLIPConfig`: both towers and the shared projection size."""
  text_config: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
  vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  @classmethod
  def from_hf(cls, d: dict[str, Any], source: str | os.PathLike = "config.json") -> "CLIPConfig":
    text, vision = dict(d.get("text_config") or {}), dict(d.get("vision_config") or {})
    # Old configs (e.g. openai/clip-vit-large-patch14) also carry partial
    # `*_config_dict`s; transformers completes them with the defaults and lets
    # them override `*_config` (so the legacy eos_token_id=2 there becomes 49407).
    if d.get("text_config_dict"):
      text.update(dataclasses.asdict(CLIPTextConfig.from_hf(d["text_config_dict"], source)))
    if d.get("vision_config_dict"):
      vision.update(dataclasses.asdict(CLIPVisionConfig.from_hf(d["vision_config_dict"], source)))
    kw = {k: d[k] for k in ("projection_dim", "logit_scale_init_value") if k in d}
    return cls(CLIPTextConfig.from_hf(text, source), CLIPVisionConfig.from_hf(vision, source), **kw)

  def to_hf(self) -> dict[str, Any]:
    def sub(config):
      return {k: v for k, v in config.to_hf().items() if k != "architectures"}
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "text_config": sub(self.text_config), "vision_config": sub(self.vision_config)}

  def tower_configs(self) -> tuple[CLIPTextConfig, CLIPVisionConfig]:
    """The tower configs with the projection size of the full model (what CLIPModel's projections use)."""
    return (dataclasses.replace(self.text_config, projection_dim=self.projection_dim),
            dataclasses.replace(self.vision_config, projection_dim=self.projection_dim))


# --------------------------------------------------------------------- layers


def _activation(name: str, x: jax.Array) -> jax.Array:
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  return jax.nn.gelu(x, approximate=False)  # transformers' "gelu" is the exact (erf) one


class CLIPAttention(nnx.Module):

  def __init__(self, hidden_size: int, num_heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.num_heads = num_heads
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.k_proj = nnx.Linear(hidden_size, hidden_size, **kw)
    self.v_proj = nnx.Linear(hidden_size, hidden_size, **kw)
    self.q_proj = nnx.Linear(hidden_size, hidden_size, **kw)
    self.out_proj = nnx.Linear(hidden_size, hidden_size, **kw)

  def __call__(self, x: jax.Array, *, causal: bool) -> jax.Array:
    b, t, d = x.shape
    heads = (b, t, self.num_heads, d // self.num_heads)
    q, k, v = (proj(x).reshape(heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
    out = attention.dot_product_attention(q, k, v, is_causal=causal)  # scale: head_dim ** -0.5, as CLIP
    return self.out_proj(out.reshape(b, t, d))


class CLIPMLP(nnx.Module):

  def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, *, dtype, param_dtype, rngs):
    self.hidden_act = hidden_act
    self.fc1 = nnx.Linear(hidden_size, intermediate_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = nnx.Linear(intermediate_size, hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(_activation(self.hidden_act, self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, config: CLIPTextConfig | CLIPVisionConfig, *, dtype, param_dtype, rngs):
    d, eps = config.hidden_size, config.layer_norm_eps
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = CLIPAttention(d, config.num_attention_heads, **kw)
    self.layer_norm1 = nnx.LayerNorm(d, epsilon=eps, **kw)
    self.mlp = CLIPMLP(d, config.intermediate_size, config.hidden_act, **kw)
    self.layer_norm2 = nnx.LayerNorm(d, epsilon=eps, **kw)

  def __call__(self, x: jax.Array, *, causal: bool) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), causal=causal)
    return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):

  def __init__(self, config: CLIPTextConfig | CLIPVisionConfig, *, dtype, param_dtype, rngs):
    self.layers = nnx.List([CLIPEncoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                            for _ in range(config.num_hidden_layers)])

  def __call__(self, x: jax.Array, *, causal: bool) -> jax.Array:
    for layer in self.layers:
      x = layer(x, causal=causal)
    return x


# --------------------------------------------------------------------- text


class CLIPTextEmbeddings(nnx.Module):

  def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.token_embedding = nnx.Embed(config.vocab_size, config.hidden_size, **kw)
    self.position_embedding = nnx.Embed(config.max_position_embeddings, config.hidden_size, **kw)


def pooling_eos_token_id(config: CLIPTextConfig, tokenizer_eos_token_id: int | None = None) -> int | None:
  """The id `pooling="eos"` looks for: the tokenizer's EOS, else a non-legacy config's, else None (unknown).

  The tokenizer wins over the config because it made the ids; a legacy config's
  2 says nothing (see the module docstring).
  """
  if tokenizer_eos_token_id is not None:
    return int(tokenizer_eos_token_id)
  return None if config.eos_token_id == LEGACY_EOS_TOKEN_ID else config.eos_token_id


class CLIPTextTransformer(nnx.Module):
  """The causal text transformer; pooled output = final-normed hidden state at EOS.

  `eos_token_id` is the tokenizer's id of <|endoftext|>; it is kept as a static
  int (part of the graphdef, so it survives nnx.split/merge, Frozen and jit).
  """

  def __init__(self, config: CLIPTextConfig, *, eos_token_id: int | None = None, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.eos_token_id = pooling_eos_token_id(config, eos_token_id)
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embeddings = CLIPTextEmbeddings(config, **kw)
    self.encoder = CLIPEncoder(config, **kw)
    self.final_layer_norm = nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, **kw)

  def __call__(self, input_ids: jax.Array, *, inputs_embeds: jax.Array | None = None, pooling: str = "eos",
               eos_token_id: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Token ids [B, L] -> (last hidden state [B, L, D], pooled [B, D]).

    `inputs_embeds` [B, L, D] replaces the token-embedding lookup (position
    embeddings are still added); `input_ids` are then only used to find the
    pooling position, so they may hold placeholder ids outside the embedding
    table (a lookup of such an id without `inputs_embeds` gives NaN).
    No padding mask, as transformers without an attention_mask and SD.
    """
    if pooling not in POOLINGS:
      raise ValueError(f"pooling={pooling!r}; expected one of {POOLINGS} (see the clip.py docstring)")
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    length = input_ids.shape[1]
    if length > self.config.max_position_embeddings:
      raise ValueError(f"sequence length {length} exceeds "
                       f"max_position_embeddings={self.config.max_position_embeddings}")
    if inputs_embeds is None:
      x = self.embeddings.token_embedding(input_ids)
    else:
      if inputs_embeds.shape != (*input_ids.shape, self.config.hidden_size):
        want = (*input_ids.shape, self.config.hidden_size)
        raise ValueError(f"inputs_embeds has shape {inputs_embeds.shape}, expected {want}")
      x = inputs_embeds.astype(self.dtype)
    x = x + self.embeddings.position_embedding(jnp.arange(length))
    x = self.final_layer_norm(self.encoder(x, causal=True))
    if pooling == "argmax":
      index = jnp.argmax(input_ids, axis=-1)  # first position of the largest id
    else:
      eos = self.eos_token_id if eos_token_id is None else eos_token_id
      if eos is None:
        raise hf_io.CheckpointError(
            "pooling='eos' needs the id of <|endoftext|>, but this text encoder's config has the legacy "
            f"eos_token_id={LEGACY_EOS_TOKEN_ID}, which is not it (and vocab_size - 1 is not it either once the "
            "vocabulary was resized for added tokens). Load the model with its tokenizer "
            "(pipeline.load_stable_diffusion or pipeline.load_clip), or pass eos_token_id=tokenizer.eos_token_id "
            "to clip.text_from_pretrained / clip.from_pretrained / the model's constructor.")
      index = jnp.argmax(input_ids == eos, axis=-1)  # first EOS (0 if there is none, as transformers)
    pooled = jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]
    return x, pooled


class CLIPTextModel(nnx.Module):
  """An SD `text_encoder/`: transformers' CLIPTextModel, or ...WithProjection with `with_projection=True`."""

  def __init__(self, config: CLIPTextConfig, *, with_projection: bool = False, eos_token_id: int | None = None,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.text_model = CLIPTextTransformer(config, eos_token_id=eos_token_id, dtype=dtype, param_dtype=param_dtype,
                                          rngs=rngs)
    self.text_projection = (nnx.Linear(config.hidden_size, config.projection_dim, use_bias=False, dtype=dtype,
                                       param_dtype=param_dtype, rngs=rngs) if with_projection else None)

  def __call__(self, input_ids, *, inputs_embeds=None, pooling: str = "eos", eos_token_id: int | None = None):
    """(last hidden state [B, L, D], pooled [B, D]); see `CLIPTextTransformer.__call__`."""
    return self.text_model(input_ids, inputs_embeds=inputs_embeds, pooling=pooling, eos_token_id=eos_token_id)

  def get_text_features(self, input_ids, *, inputs_embeds=None, pooling: str = "eos",
                        eos_token_id: int | None = None) -> jax.Array:
    """The projected pooled feature [B, projection_dim] (transformers' `text_embeds`)."""
    if self.text_projection is None:
      raise ValueError("this CLIPTextModel has no text_projection (an SD1/SD2 text_encoder); build or load it with "
                       "the projection (CLIPTextModelWithProjection or a full CLIP folder)")
    _, pooled = self(input_ids, inputs_embeds=inputs_embeds, pooling=pooling, eos_token_id=eos_token_id)
    return self.text_projection(pooled)


def same_text_tower(text_encoder: CLIPTextModel, clip: CLIPModel) -> bool:
  """Whether `clip`'s text tower IS `text_encoder`: the same computation, pooling id and weights (by content hash).

  SD 1.x's text encoder is CLIP ViT-L/14's text tower. Then the CLIP text
  feature of a prompt is the text encoder's pooled output times CLIP's
  text_projection, and MC-TI need not run the transformer twice. Only the
  config fields that change the computation are compared (SD 1.5's config
  has the legacy bos/eos ids 0/2, CLIP's may not; both pool at the
  tokenizer's EOS, which `eos_token_id` holds); the hash covers the shapes.
  """
  from mcti_jax.models.frozen import content_hash
  a, b = text_encoder.text_model, clip.text_model
  computation = lambda c: (c.num_attention_heads, c.hidden_act, c.layer_norm_eps)  # noqa: E731
  if computation(a.config) != computation(b.config) or a.eos_token_id != b.eos_token_id:
    return False
  return content_hash(nnx.state(a)) == content_hash(nnx.state(b))


# --------------------------------------------------------------------- vision


class CLIPVisionEmbeddings(nnx.Module):

  def __init__(self, config: CLIPVisionConfig, *, dtype, param_dtype, rngs):
    d, p = config.hidden_size, config.patch_size
    self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,), param_dtype))
    self.patch_embedding = nnx.Conv(config.num_channels, d, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    num_positions = (config.image_size // p) ** 2 + 1
    self.position_embedding = nnx.Embed(num_positions, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class CLIPVisionTransformer(nnx.Module):
  """ViT: [class token, patches] + positions -> pre-norm -> encoder; pooled = post-normed class token."""

  def __init__(self, config: CLIPVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embeddings = CLIPVisionEmbeddings(config, **kw)
    self.pre_layrnorm = nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, **kw)  # sic, HF's name
    self.encoder = CLIPEncoder(config, **kw)
    self.post_layernorm = nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, **kw)

  def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """CLIP-normalised images NHWC [B, S, S, C] -> (last hidden state [B, 1 + patches, D], pooled [B, D])."""
    b, h, w, _ = pixel_values.shape
    s = self.config.image_size
    if (h, w) != (s, s):
      raise ValueError(f"images are {h}x{w} but this CLIP vision model takes {s}x{s}; use clip.preprocess(images, {s})")
    patches = self.embeddings.patch_embedding(pixel_values.astype(self.dtype))
    patches = patches.reshape(b, -1, self.config.hidden_size)  # row-major over the grid, as torch's flatten(2)
    cls = jnp.broadcast_to(self.embeddings.class_embedding[...].astype(self.dtype), (b, 1, self.config.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1)
    x = x + self.embeddings.position_embedding(jnp.arange(x.shape[1]))
    x = self.encoder(self.pre_layrnorm(x), causal=False)
    return x, self.post_layernorm(x[:, 0])


class CLIPVisionModel(nnx.Module):
  """transformers' CLIPVisionModel, or ...WithProjection with `with_projection=True`."""

  def __init__(self, config: CLIPVisionConfig, *, with_projection: bool = False, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.vision_model = CLIPVisionTransformer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.visual_projection = (nnx.Linear(config.hidden_size, config.projection_dim, use_bias=False, dtype=dtype,
                                         param_dtype=param_dtype, rngs=rngs) if with_projection else None)

  def __call__(self, pixel_values):
    return self.vision_model(pixel_values)

  def get_image_features(self, pixel_values) -> jax.Array:
    if self.visual_projection is None:
      raise ValueError("this CLIPVisionModel has no visual_projection; load it from a full CLIP folder or a "
                       "CLIPVisionModelWithProjection folder")
    return self.visual_projection(self.vision_model(pixel_values)[1])


# --------------------------------------------------------------------- full CLIP


class CLIPModel(nnx.Module):
  """Both towers and their projections into the shared embedding space."""

  def __init__(self, config: CLIPConfig, *, eos_token_id: int | None = None, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    text, vision = config.text_config, config.vision_config
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.text_model = CLIPTextTransformer(text, eos_token_id=eos_token_id, **kw)
    self.vision_model = CLIPVisionTransformer(vision, **kw)
    self.visual_projection = nnx.Linear(vision.hidden_size, config.projection_dim, use_bias=False, **kw)
    self.text_projection = nnx.Linear(text.hidden_size, config.projection_dim, use_bias=False, **kw)
    self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, param_dtype))

  def get_text_features(self, input_ids, *, inputs_embeds=None, pooling: str = "eos",
                        eos_token_id: int | None = None) -> jax.Array:
    _, pooled = self.text_model(input_ids, inputs_embeds=inputs_embeds, pooling=pooling, eos_token_id=eos_token_id)
    return self.text_projection(pooled)

  def get_image_features(self, pixel_values) -> jax.Array:
    return self.visual_projection(self.vision_model(pixel_values)[1])

  def __call__(self, input_ids, pixel_values, *, inputs_embeds=None, pooling: str = "eos",
               eos_token_id: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(logits_per_image [B_img, B_txt], logits_per_text [B_txt, B_img]): scaled cosine similarities."""
    text = self.get_text_features(input_ids, inputs_embeds=inputs_embeds, pooling=pooling, eos_token_id=eos_token_id)
    image = self.get_image_features(pixel_values)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    logits_per_text = jnp.exp(self.logit_scale[...]).astype(text.dtype) * text @ image.T
    return logits_per_text.T, logits_per_text


# --------------------------------------------------------------------- preprocessing


def preprocess(images: jax.Array | np.ndarray, image_size: int, *, mean=OPENAI_CLIP_MEAN,
               std=OPENAI_CLIP_STD) -> jax.Array:
  """Images NHWC (uint8 in [0, 255] or float in [0, 1]) -> CLIP input [B, S, S, 3] (pure jnp, jit-able).

  As transformers' CLIPImageProcessor: resize the shorter side to `image_size`
  (the longer to int(S * long / short)), center crop S x S (top-left offset
  floor((size - S) / 2)), then (x - mean) / std. The difference is the resize:
  ours is `jax.image.resize(method="bicubic", antialias=True)` (Keys cubic
  a = -0.5, widened when downsampling, as PIL) on floats, while the processor
  resizes uint8 images and rounds the result to uint8, with PIL's bicubic
  (its PIL backend, a = -0.5) or torch's (its torchvision backend, a = -0.75).
  Resized images therefore differ by about 1e-2 in normalised units (a few
  uint8 levels) from the processor's; images whose shorter side already equals
  S are not resized and match it exactly.
  """
  images = jnp.asarray(images)
  x = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images.astype(jnp.float32)
  b, h, w, c = x.shape
  short, long = min(h, w), max(h, w)
  new_long = int(image_size * long / short)
  new_h, new_w = (image_size, new_long) if h <= w else (new_long, image_size)
  if (new_h, new_w) != (h, w):
    x = jax.image.resize(x, (b, new_h, new_w, c), method="bicubic", antialias=True)
  top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
  x = x[:, top:top + image_size, left:left + image_size]
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def image_features(model: CLIPModel | CLIPVisionModel, images: jax.Array | np.ndarray) -> jax.Array:
  """Images NHWC (uint8, or floats in [0, 1]) -> projected CLIP image features [B, P], not normalised.

  `preprocess` to the model's input size, then `get_image_features`: the one
  way every caller encodes images (pure jnp; jit it with the model frozen).
  """
  config = getattr(model.config, "vision_config", model.config)
  return model.get_image_features(preprocess(images, config.image_size))


# --------------------------------------------------------------------- loading and saving

_TEXT_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")
_VISION_ROOTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")


def _add_prefix(prefix: str, roots: tuple[str, ...]):
  """transformers 5 saves a bare CLIPTextModel/CLIPVisionModel without the 'text_model.'/'vision_model.' prefix."""
  return lambda key: prefix + key if key.startswith(roots) else key


def _read(path_or_hub_id, subfolder, variant=None) -> tuple[Any, dict[str, Any], Any]:
  folder = hf_io.resolve_folder(path_or_hub_id, subfolder, variant=variant)
  d = hf_io.read_config(folder)
  return folder, d, folder / "config.json"


def _kind(d: dict[str, Any], source) -> str:
  """'full', 'text' or 'vision' from a config.json."""
  architectures = d.get("architectures") or []
  model_type = d.get("model_type")
  if "text_config" in d or "vision_config" in d or model_type == "clip" or "CLIPModel" in architectures:
    return "full"
  if model_type == "clip_text_model" or any(a.startswith("CLIPTextModel") for a in architectures):
    return "text"
  if model_type == "clip_vision_model" or any(a.startswith("CLIPVisionModel") for a in architectures):
    return "vision"
  raise hf_io.unsupported(source, "architectures", architectures or model_type,
                          "CLIPModel, CLIPTextModel(WithProjection), CLIPVisionModel(WithProjection)")


# Per tower: its index in CLIPConfig.tower_configs(), config and model classes, the architecture name
# that means "with projection", and the key prefix of its weights.
_TOWERS = {
    "text": (0, CLIPTextConfig, CLIPTextModel, "CLIPTextModelWithProjection", "text_model.", _TEXT_ROOTS),
    "vision": (1, CLIPVisionConfig, CLIPVisionModel, "CLIPVisionModelWithProjection", "vision_model.",
               _VISION_ROOTS),
}


def _tower_from_pretrained(tower: str, path_or_hub_id, subfolder, dtype, param_dtype, variant=None, **model_kw):
  index, config_cls, model_cls, with_projection_name, prefix, roots = _TOWERS[tower]
  folder, d, source = _read(path_or_hub_id, subfolder, variant)
  kind = _kind(d, source)
  if kind == "full":
    config, with_projection = CLIPConfig.from_hf(d, source).tower_configs()[index], True
  elif kind == tower:
    config = config_cls.from_hf(d, source)
    with_projection = with_projection_name in (d.get("architectures") or [])
  else:
    raise hf_io.CheckpointError(f"{source} describes a CLIP {kind} model; it has no {tower} tower")

  def build():
    return model_cls(config, with_projection=with_projection, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0),
                     **model_kw)

  return hf_io.load_model(build, folder, WEIGHTS_NAME, renames=_add_prefix(prefix, roots), param_dtype=param_dtype,
                          variant=variant)


def text_from_pretrained(path_or_hub_id: str | os.PathLike, subfolder: str | None = None, *,
                         eos_token_id: int | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
                         variant: str | None = None) -> CLIPTextModel:
  """The text tower from an SD `text_encoder/` folder or (with its projection) from a full CLIP folder.

  Pass the checkpoint tokenizer's `eos_token_id`: a legacy config (eos_token_id 2) does not say it (module docstring).
  `variant` (e.g. "fp16") reads model.<variant>.safetensors.
  """
  return _tower_from_pretrained("text", path_or_hub_id, subfolder, dtype, param_dtype, variant,
                                eos_token_id=eos_token_id)


def vision_from_pretrained(path_or_hub_id: str | os.PathLike, subfolder: str | None = None, *, dtype=jnp.float32,
                           param_dtype=jnp.float32) -> CLIPVisionModel:
  """The vision tower from a CLIPVisionModel(WithProjection) folder or (with its projection) a full CLIP folder."""
  return _tower_from_pretrained("vision", path_or_hub_id, subfolder, dtype, param_dtype)


def from_pretrained(path_or_hub_id: str | os.PathLike, subfolder: str | None = None, *,
                    eos_token_id: int | None = None, dtype=jnp.float32,
                    param_dtype=jnp.float32) -> CLIPModel | CLIPTextModel | CLIPVisionModel:
  """Whatever the folder holds: a full CLIP folder -> CLIPModel, an SD text_encoder/ -> CLIPTextModel, ...

  `eos_token_id` (the tokenizer's) is for the text tower, as in `text_from_pretrained`.
  """
  folder, d, source = _read(path_or_hub_id, subfolder)
  kind = _kind(d, source)
  if kind == "text":
    return text_from_pretrained(folder, eos_token_id=eos_token_id, dtype=dtype, param_dtype=param_dtype)
  if kind == "vision":
    return vision_from_pretrained(folder, dtype=dtype, param_dtype=param_dtype)
  config = CLIPConfig.from_hf(d, source)
  def build():
    return CLIPModel(config, eos_token_id=eos_token_id, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  return hf_io.load_model(build, folder, WEIGHTS_NAME, param_dtype=param_dtype)


def save_pretrained(model: CLIPModel | CLIPTextModel | CLIPVisionModel, folder: str | os.PathLike) -> None:
  """A folder transformers loads (CLIPModel / CLIPTextModel(WithProjection) / CLIPVisionModel(WithProjection)).

  Keys keep the 'text_model.'/'vision_model.' prefix, as in SD's text_encoder
  folders; transformers 4 and 5 both load that.
  """
  if isinstance(model, CLIPModel):
    config = model.config.to_hf()
  elif isinstance(model, CLIPTextModel):
    with_projection = model.text_projection is not None
    config = model.config.to_hf("CLIPTextModelWithProjection" if with_projection else "CLIPTextModel")
  elif isinstance(model, CLIPVisionModel):
    with_projection = model.visual_projection is not None
    config = model.config.to_hf("CLIPVisionModelWithProjection" if with_projection else "CLIPVisionModel")
  else:
    raise TypeError(f"save_pretrained takes a CLIPModel, CLIPTextModel or CLIPVisionModel, got {type(model).__name__}")
  hf_io.save_model(model, folder, config, WEIGHTS_NAME)
