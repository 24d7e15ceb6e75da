"""The Flax UNet against diffusers' UNet2DConditionModel (torch, float32) on the same weight files."""

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.models.embeddings import get_timestep_embedding as torch_timestep_embedding
from flax import nnx, traverse_util
from safetensors.numpy import load_file, save_file

from mcti_jax.models import hf_io
from mcti_jax.models import unet
from conftest import max_abs_diff

WEIGHTS = unet.WEIGHTS_NAME

# SD 1.x in miniature: int attention_head_dim (= heads), 1x1 conv projections.
SD1 = unet.UNetConfig(
    sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
    attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))

# SD 2.x in miniature: per-block heads, linear projections, upcast attention, wider context. Also two
# transformer layers per block, to exercise the block lists.
SD2 = unet.UNetConfig(
    sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=48,
    attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True, transformer_layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))

# The real config.json of stable-diffusion-v1-5 (unet/) and, with the SD2 changes, stable-diffusion-2-1.
SD15_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
SD21_JSON = {
    **SD15_JSON, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024, "dual_cross_attention": False, "num_class_embeds": None,
    "only_cross_attention": False, "resnet_time_scale_shift": "default", "sample_size": 96, "upcast_attention": True,
    "use_linear_projection": True, "class_embed_type": None}


# --------------------------------------------------------------------- helpers


def randomize(build, seed=0, small=()):
  """A module with random weights, filled in numpy (eager per-layer init compiles for seconds on CPU).

  Biases and norm scales get noise too, so zeros and ones can't hide a layout bug. Parameters whose torch key
  contains one of `small` are scaled by 1e-3.
  """
  graphdef, state = nnx.split(nnx.eval_shape(build))
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  for path, spec in flat.items():
    if path[-1] == "kernel":
      value = rng.normal(0, 1 / np.sqrt(np.prod(spec.shape[:-1])), spec.shape)
    elif path[-1] == "scale":
      value = 1 + rng.normal(0, 0.1, spec.shape)
    else:
      value = rng.normal(0, 0.1, spec.shape)
    if any(name in hf_io.torch_key(path) for name in small):
      value = 1e-3 * value
    flat[path] = jnp.asarray(value, spec.dtype)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  return nnx.merge(graphdef, state)


def random_unet(config, seed=0, **kwargs):
  return randomize(lambda: unet.UNet2DConditionModel(config, rngs=nnx.Rngs(0), **kwargs), seed)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x, t, context):
  return nnx.merge(graphdef, state)(x, t, context)


def run(model, x, t, context):
  """Jitted forward: one compile per config and input shapes (eager op-by-op dispatch is slow on CPU)."""
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef, state, jnp.asarray(x), jnp.asarray(t), jnp.asarray(context)), np.float32)


def run_torch(model, x, t, context):
  t = torch.from_numpy(np.asarray(t)) if isinstance(t, np.ndarray) else t
  with torch.no_grad():
    out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), t, torch.from_numpy(context)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def inputs(config, seed=0, batch=2, size=16, tokens=77):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, size, size, config.in_channels)).astype(np.float32)
  context = rng.normal(size=(batch, tokens, config.cross_attention_dim)).astype(np.float32)
  return x, context


def ours_and_torch(config, folder, seed=0):
  ours = random_unet(config, seed)
  unet.save_pretrained(ours, folder)
  return ours, TorchUNet.from_pretrained(str(folder)).eval()


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
  return ours_and_torch(SD1, tmp_path_factory.mktemp("sd1") / "unet")


# ---------------------------------------------------------------------- parity


@pytest.mark.slow
def test_sd1_like_matches_diffusers(sd1):
  ours, theirs = sd1
  x, context = inputs(SD1)
  t = np.array([3, 981])
  want = run_torch(theirs, x, t, context)
  assert max_abs_diff(run(ours, x, t, context), want) <= 1e-4
  assert np.abs(want).max() > 0.1  # a real signal, not a vanishing one


@pytest.mark.slow
def test_odd_sample_size_matches_diffusers(sd1):
  # 9x9 downsamples to 5x5; the up path must resize back to 9x9 (diffusers' forwarded upsample_size).
  ours, theirs = sd1
  x, context = inputs(SD1, seed=1, size=9, tokens=5)
  t = np.array([500, 20])
  assert max_abs_diff(run(ours, x, t, context), run_torch(theirs, x, t, context)) <= 1e-4


@pytest.mark.slow
def test_sd2_like_matches_diffusers(tmp_path):
  ours, theirs = ours_and_torch(SD2, tmp_path / "unet", seed=1)
  assert [b.attentions[0].transformer_blocks[0].attn1.heads for b in ours.down_blocks] == [2, 4]
  x, context = inputs(SD2, seed=2, tokens=20)
  # A scalar float timestep broadcasts over the batch, as in diffusers.
  assert max_abs_diff(run(ours, x, 999.0, context), run_torch(theirs, x, 999.0, context)) <= 1e-4


@pytest.mark.slow
def test_other_supported_config_values_match_diffusers(tmp_path):
  # Every other knob we accept, away from its default: asymmetric downsample pad, mid-block output scale,
  # centered input, time embedding variants, kernel sizes, per-block layers, norm eps, dropout (inference: off).
  config = dataclasses.replace(
      SD1, downsample_padding=0, mid_block_scale_factor=1.41, center_input_sample=True, flip_sin_to_cos=False,
      freq_shift=1, time_embedding_dim=96, conv_in_kernel=1, conv_out_kernel=5, norm_eps=1e-3,
      layers_per_block=(1, 2), attention_head_dim=(2, 8), dropout=0.1, act_fn="swish")
  ours, theirs = ours_and_torch(config, tmp_path / "unet", seed=2)
  x, context = inputs(config, seed=4, size=11, tokens=5)
  t = np.array([3, 600])
  assert max_abs_diff(run(ours, x, t, context), run_torch(theirs, x, t, context)) <= 1e-4


@pytest.mark.slow
def test_norm_eps_match_diffusers_on_small_activations():
  # Activations of size ~1e-3 have a variance near the norms' eps, so a wrong eps shows (GroupNorm 1e-6 in
  # Transformer2DModel, LayerNorm 1e-5 in its blocks, the config's norm_eps in the resnets).
  from diffusers.models.resnet import ResnetBlock2D as TorchResnet
  from diffusers.models.transformers.transformer_2d import Transformer2DModel as TorchTransformer

  kw = dict(dtype=jnp.float32, param_dtype=jnp.float32)
  transformer = randomize(lambda: unet.Transformer2DModel(
      2, 16, 32, num_layers=1, groups=8, cross_attention_dim=24, use_linear_projection=False, upcast=False,
      rngs=nnx.Rngs(0), **kw), small=("proj_in", "to_out", "ff.net.2"))
  torch_transformer = TorchTransformer(2, 16, in_channels=32, norm_num_groups=8, cross_attention_dim=24).eval()
  resnet = randomize(lambda: unet.ResnetBlock2D(32, 64, 16, groups=8, eps=1e-5, rngs=nnx.Rngs(0), **kw),
                     small=("conv1", "time_emb"))
  torch_resnet = TorchResnet(in_channels=32, out_channels=64, temb_channels=16, eps=1e-5, groups=8).eval()
  for ours, theirs in ((transformer, torch_transformer), (resnet, torch_resnet)):
    weights = hf_io.state_to_torch(nnx.state(ours, nnx.Param))
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})

  rng = np.random.default_rng(0)
  x = 1e-3 * rng.normal(size=(2, 6, 6, 32)).astype(np.float32)
  context = rng.normal(size=(2, 5, 24)).astype(np.float32)
  temb = rng.normal(size=(2, 16)).astype(np.float32)
  x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2))
  with torch.no_grad():
    want_t = torch_transformer(x_torch, torch.from_numpy(context), return_dict=False)[0].numpy().transpose(0, 2, 3, 1)
    want_r = torch_resnet(x_torch, torch.from_numpy(temb)).numpy().transpose(0, 2, 3, 1)
  got_t, got_r = transformer(jnp.asarray(x), jnp.asarray(context)), resnet(jnp.asarray(x), jnp.asarray(temb))
  assert max_abs_diff(got_t, want_t) <= 1e-4 * np.abs(want_t).max()
  assert max_abs_diff(got_r, want_r) <= 1e-4 * np.abs(want_r).max()


@pytest.mark.parametrize("flip,shift,dim", [(True, 0, 32), (False, 1, 32), (True, 1, 15)])
def test_timestep_embedding_matches_diffusers(flip, shift, dim):
  t = np.array([0, 1, 17, 500.5, 999], np.float32)
  want = torch_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
  got = unet.get_timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
  assert got.shape == want.shape
  assert max_abs_diff(got, want) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("config_json", [SD15_JSON, SD21_JSON], ids=["sd15", "sd21"])
def test_full_size_configs_give_diffusers_parameter_shapes(config_json):
  # Built abstractly on both sides (nnx.eval_shape, torch meta device): no memory, and every key and shape checked.
  config = unet.UNetConfig.from_hf(config_json)
  abstract = nnx.eval_shape(lambda: unet.UNet2DConditionModel(config, rngs=nnx.Rngs(0)))
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  ours = {hf_io.torch_key(p): hf_io.to_torch_layout(str(p[-1]), np.empty(v.shape, np.int8)).shape
          for p, v in flat.items()}
  with torch.device("meta"):
    theirs = TorchUNet.from_config({k: v for k, v in config_json.items() if not k.startswith("_")})
  assert ours == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


# ---------------------------------------------------------------- checkpoints


def test_torch_saved_folder_loads(tmp_path):
  torch.manual_seed(0)
  theirs = TorchUNet(**{k: v for k, v in SD1.to_hf().items() if not k.startswith("_")}).eval()
  with torch.no_grad():
    for p in theirs.parameters():
      p.add_(0.05 * torch.randn_like(p))
  theirs.save_pretrained(str(tmp_path / "pipe" / "unet"), safe_serialization=True)
  ours = unet.from_pretrained(tmp_path / "pipe")  # subfolder="unet" by default
  assert ours.config == SD1
  x, context = inputs(SD1, seed=3, tokens=8)
  t = np.array([7, 400])
  assert max_abs_diff(run(ours, x, t, context), run_torch(theirs, x, t, context)) <= 1e-4

  # The half-precision variant file, as published checkpoints ship it.
  theirs.half().save_pretrained(str(tmp_path / "pipe" / "unet"), safe_serialization=True, variant="fp16")
  ours16 = unet.from_pretrained(tmp_path / "pipe", variant="fp16")
  leaves = jax.tree.leaves(nnx.state(ours16))
  assert all(v.dtype == jnp.float32 for v in leaves)
  assert max_abs_diff(run(ours16, x, t, context), run_torch(theirs.float(), x, t, context)) <= 1e-4


@pytest.mark.slow
def test_saved_config_is_what_diffusers_writes(sd1, tmp_path):
  ours, theirs = sd1
  theirs.save_pretrained(str(tmp_path / "t"), safe_serialization=True)
  written = json.loads((tmp_path / "t" / "config.json").read_text())
  assert unet.UNetConfig.from_hf(written) == ours.config
  assert written["_class_name"] == ours.config.to_hf()["_class_name"]


def test_wrong_shape_tensor_names_file_and_key(tmp_path):
  unet.save_pretrained(random_unet(SD1), tmp_path)
  state = load_file(str(tmp_path / WEIGHTS))
  key = "down_blocks.0.attentions.0.proj_in.weight"
  state[key] = np.zeros((32, 16, 1, 1), np.float32)
  save_file(state, str(tmp_path / WEIGHTS))
  with pytest.raises(hf_io.CheckpointError, match=rf"{WEIGHTS}.*{key}.*shape"):
    unet.from_pretrained(tmp_path, subfolder=None)


def test_missing_tensor_and_file_name_them(tmp_path):
  unet.save_pretrained(random_unet(SD1), tmp_path)
  state = load_file(str(tmp_path / WEIGHTS))
  del state["mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight"]
  save_file(state, str(tmp_path / WEIGHTS))
  with pytest.raises(hf_io.CheckpointError, match=r"mid_block\.attentions\.0\.transformer_blocks\.0\.ff\.net\.2"):
    unet.from_pretrained(tmp_path, subfolder=None)
  with pytest.raises(hf_io.CheckpointError, match=r"diffusion_pytorch_model\.fp16\.safetensors"):
    unet.from_pretrained(tmp_path, subfolder=None, variant="fp16")


@pytest.mark.parametrize("key,value", [
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("addition_embed_type", "text_time"),
    ("class_embed_type", "timestep"),
    ("time_cond_proj_dim", 256),
    ("resnet_time_scale_shift", "scale_shift"),
    ("encoder_hid_dim", 1024),
    ("dual_cross_attention", True),
    ("transformer_layers_per_block", [1, 2]),
])
def test_unsupported_config_names_file_and_key(tmp_path, key, value):
  config = {**SD1.to_hf(), key: value}
  (tmp_path / "unet").mkdir()
  (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf_io.CheckpointError, match=rf"config\.json: {key}="):
    unet.from_pretrained(tmp_path)


# ---------------------------------------------------------------- compute modes


def test_remat_gives_same_output_and_gradient():
  # One level (no down/upsampling) keeps the two gradient compiles short; every block kind is still there.
  config = dataclasses.replace(SD1, block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                               up_block_types=("CrossAttnUpBlock2D",))
  plain = random_unet(config, seed=4)
  state = nnx.state(plain)
  graphdefs = {remat: nnx.split(nnx.eval_shape(
      lambda: unet.UNet2DConditionModel(config, remat=remat, rngs=nnx.Rngs(0))))[0] for remat in (False, True)}
  x, context = inputs(config, seed=5, size=8, tokens=6)
  t = jnp.array([10, 700])
  weights = jnp.asarray(np.random.default_rng(6).normal(size=x.shape[:3] + (config.out_channels,)), jnp.float32)

  def loss(ctx, state, graphdef):
    out = nnx.merge(graphdef, state)(jnp.asarray(x), t, ctx)
    return jnp.sum(out * weights), out

  grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=2)
  (grad_plain, out_plain), (grad_remat, out_remat) = (grad(jnp.asarray(context), state, graphdefs[r])
                                                      for r in (False, True))
  assert max_abs_diff(out_remat, out_plain) <= 1e-6
  assert max_abs_diff(grad_remat, grad_plain) <= 1e-6 * max(1.0, float(jnp.abs(grad_plain).max()))
  assert float(jnp.abs(grad_plain).max()) > 0
  # The flag really checkpoints: the traced forward holds one remat region per resnet and transformer.
  jaxpr = str(jax.make_jaxpr(lambda c: nnx.merge(graphdefs[True], state)(jnp.asarray(x), t, c))(context))
  regions = len(re.findall(r"\b(?:remat\w*|checkpoint)\[", jaxpr))  # the primitive's name varies across jax versions
  assert regions == 2 + 3 + 4  # down: 1 resnet + 1 transformer, mid: 2 + 1, up: 2 + 2


def test_bfloat16_compute_runs_and_is_close():
  f32 = random_unet(SD1, seed=7)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: unet.UNet2DConditionModel(SD1, dtype=jnp.bfloat16,
                                                                            rngs=nnx.Rngs(0))))
  bf16 = nnx.merge(graphdef, nnx.state(f32))
  x, context = inputs(SD1, seed=8)
  t = np.array([50, 900])
  graphdef, state = nnx.split(bf16)
  got = _forward(graphdef, state, jnp.asarray(x), jnp.asarray(t), jnp.asarray(context))
  assert got.dtype == jnp.bfloat16
  got = np.asarray(got, np.float32)
  want = run(f32, x, t, context)
  assert np.all(np.isfinite(got))
  assert max_abs_diff(got, want) <= 0.05 * float(np.abs(want).max())
  # Same signal, not just the same size: strongly correlated with the float32 output.
  assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.999


def test_config_round_trips_through_hf_dict():
  for config in (SD1, SD2):
    assert unet.UNetConfig.from_hf(config.to_hf()) == config
  assert unet.UNetConfig.from_hf(SD21_JSON).num_heads == (5, 10, 20, 20)
  assert dataclasses.replace(SD1, dropout=0.1).to_hf()["dropout"] == 0.1
