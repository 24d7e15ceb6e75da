"""Our AutoencoderKL against diffusers' on the same weight files."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from flax import nnx, traverse_util
from safetensors.numpy import load_file, save_file

from mcti_jax.models import hf_io, vae
from conftest import max_abs_diff

TINY = vae.VAEConfig(
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=32,
)
TOL = 1e-4


def _ours(config=TINY, seed=0):
  """Random weights drawn in numpy: building eagerly compiles one initializer per shape (~10 s on 2 cores).

  Kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.05^2), biases ~ N(0, 0.05^2): no zero
  bias or unit scale can hide a layout bug (what conftest.perturb_params is for).
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: vae.AutoencoderKL(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  values = {}
  for path, spec in traverse_util.flatten_dict(nnx.to_pure_dict(state)).items():
    noise = rng.normal(size=spec.shape).astype(np.float32)
    if path[-1] == "kernel":
      values[path] = jnp.asarray(noise / np.sqrt(np.prod(spec.shape[:-1])))
    else:
      values[path] = jnp.asarray((1.0 if path[-1] == "scale" else 0.0) + 0.05 * noise)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
  return nnx.merge(graphdef, state)


def _torch(folder):
  return TorchAutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32, low_cpu_mem_usage=False).eval()


def _images(seed=0, batch=2, size=32):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _torch_encode(model, images):
  with torch.no_grad():
    dist = model.encode(_nchw(images)).latent_dist
  return _nhwc(dist.mean), _nhwc(dist.logvar)


def _torch_decode(model, latents):
  with torch.no_grad():
    return _nhwc(model.decode(_nchw(latents)).sample)


def _encode(model, images):
  """One compiled call (eager NNX would compile op by op, which is slower on CPU)."""
  graphdef, params = nnx.split(model)
  return jax.jit(lambda p, x: nnx.merge(graphdef, p).encode(x))(params, jnp.asarray(images))


def _decode(model, latents):
  graphdef, params = nnx.split(model)
  return jax.jit(lambda p, z: nnx.merge(graphdef, p).decode(z))(params, jnp.asarray(latents))


def _assert_same_outputs(ours, theirs, seed=0):
  images = _images(seed)
  mean, logvar = _encode(ours, images)
  t_mean, t_logvar = _torch_encode(theirs, images)
  assert mean.shape == t_mean.shape == (2, 16, 16, 4)
  assert max_abs_diff(mean, t_mean) <= TOL
  assert max_abs_diff(logvar, t_logvar) <= TOL
  latents = np.random.default_rng(seed + 1).normal(size=(2, 16, 16, 4)).astype(np.float32)
  decoded, t_decoded = _decode(ours, latents), _torch_decode(theirs, latents)
  assert decoded.shape == t_decoded.shape == (2, 32, 32, 3)
  assert max_abs_diff(decoded, t_decoded) <= TOL
  return max_abs_diff(mean, t_mean), max_abs_diff(logvar, t_logvar), max_abs_diff(decoded, t_decoded)


def test_ours_saved_then_loaded_by_diffusers_gives_the_same_outputs(tmp_path):
  ours = _ours()
  vae.save_pretrained(ours, tmp_path / "vae")
  diffs = _assert_same_outputs(ours, _torch(tmp_path / "vae"))
  print("max abs diff mean/logvar/decoded:", diffs)


@pytest.mark.slow
def test_torch_saved_then_loaded_by_us_gives_the_same_outputs(tmp_path):
  torch.manual_seed(0)
  theirs = TorchAutoencoderKL(**{k: v for k, v in TINY.to_hf().items() if not k.startswith("_")}).eval()
  with torch.no_grad():
    for p in theirs.parameters():
      p.add_(0.05 * torch.randn_like(p))
  theirs.save_pretrained(str(tmp_path / "pipe" / "vae"), safe_serialization=True)
  ours = vae.from_pretrained(tmp_path / "pipe")  # subfolder="vae" by default
  assert ours.config == TINY
  _assert_same_outputs(ours, theirs, seed=1)


@pytest.mark.slow
def test_variants_without_attention_and_quant_convs(tmp_path):
  config = vae.VAEConfig(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, norm_num_groups=4,
                         latent_channels=3, act_fn="gelu", mid_block_add_attention=False, use_quant_conv=False,
                         use_post_quant_conv=False)
  ours = _ours(config, seed=3)
  vae.save_pretrained(ours, tmp_path)
  theirs = _torch(tmp_path)
  images = _images(2, batch=1, size=16)
  mean, logvar = _encode(ours, images)
  t_mean, t_logvar = _torch_encode(theirs, images)
  assert max_abs_diff(mean, t_mean) <= TOL and max_abs_diff(logvar, t_logvar) <= TOL
  latents = np.random.default_rng(4).normal(size=(1, 4, 4, 3)).astype(np.float32)
  assert max_abs_diff(_decode(ours, latents), _torch_decode(theirs, latents)) <= TOL


def test_old_attention_names_load_and_match(tmp_path):
  ours = _ours()
  vae.save_pretrained(ours, tmp_path / "new")
  tensors = load_file(str(tmp_path / "new" / vae.WEIGHTS_NAME))
  old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  renamed = {}
  for key, value in tensors.items():
    for new, old in old_names.items():
      key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
    renamed[key] = value
  assert sum(".proj_attn." in k for k in renamed) == 4  # weight and bias, encoder and decoder
  (tmp_path / "old").mkdir()
  save_file(renamed, str(tmp_path / "old" / vae.WEIGHTS_NAME))
  (tmp_path / "old" / vae.CONFIG_NAME).write_text((tmp_path / "new" / vae.CONFIG_NAME).read_text())

  loaded = vae.from_pretrained(tmp_path / "old", subfolder=None)
  for a, b in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(nnx.state(ours))):
    np.testing.assert_array_equal(a, b)
  _assert_same_outputs(loaded, _torch(tmp_path / "old"))  # diffusers renames the same way


def test_bfloat16_compute_runs_and_stays_close(tmp_path):
  ours = _ours()
  vae.save_pretrained(ours, tmp_path)
  low = vae.from_pretrained(tmp_path, subfolder=None, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  images = jnp.asarray(_images())
  mean, _ = _encode(low, images)
  assert mean.dtype == jnp.float32 and low.encoder.conv_in.kernel.dtype == jnp.bfloat16
  ref_mean, _ = _encode(ours, images)
  assert max_abs_diff(mean, ref_mean) < 0.1 * float(jnp.max(jnp.abs(ref_mean)))


def test_latent_helpers():
  mean = jnp.full((2, 3, 3, 4), 0.5)
  logvar = jnp.full((2, 3, 3, 4), np.log(4.0))
  key = jax.random.key(0)
  draw = vae.sample_latent(mean, logvar, key)
  np.testing.assert_allclose(draw, 0.5 + 2.0 * jax.random.normal(key, mean.shape), rtol=1e-6)
  config = vae.VAEConfig(scaling_factor=0.5, shift_factor=0.1)
  np.testing.assert_allclose(vae.scale_latents(draw, config), (draw - 0.1) * 0.5, rtol=1e-6)
  np.testing.assert_allclose(vae.unscale_latents(vae.scale_latents(draw, config), config), draw, atol=1e-6)
  assert nnx.eval_shape(lambda: vae.AutoencoderKL(TINY, rngs=nnx.Rngs(0))).scaling_factor == 0.18215


def test_moments_to_latents_is_diffusers_and_bit_identical_to_the_old_trainer():
  rng = np.random.default_rng(0)
  mean, logvar = (jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32) for _ in range(2))
  key = jax.random.key(1)
  sd1 = vae.VAEConfig(scaling_factor=0.18215)  # shift_factor None, as SD 1.x
  old = jax.jit(lambda m, lv, k: (m + jnp.exp(0.5 * lv) * jax.random.normal(k, m.shape)) * 0.18215)
  new = jax.jit(lambda m, lv, k: vae.moments_to_latents(m, lv, sd1, k))
  np.testing.assert_array_equal(new(mean, logvar, key), old(mean, logvar, key))
  shifted = vae.VAEConfig(scaling_factor=0.5, shift_factor=0.1)
  np.testing.assert_allclose(vae.moments_to_latents(mean, logvar, shifted), (mean - 0.1) * 0.5, rtol=1e-6)
  draw = vae.sample_latent(mean, logvar, key)
  np.testing.assert_allclose(vae.moments_to_latents(mean, logvar, shifted, key), (draw - 0.1) * 0.5, rtol=1e-6)


# ---------------------------------------------------------------------- errors


def test_missing_folder_and_files_are_named(tmp_path):
  with pytest.raises(hf_io.CheckpointError, match="does not exist"):
    vae.from_pretrained(tmp_path / "nowhere")
  (tmp_path / "vae").mkdir()
  with pytest.raises(hf_io.CheckpointError, match=r"vae/config\.json is missing"):
    vae.from_pretrained(tmp_path)
  (tmp_path / "vae" / "config.json").write_text(json.dumps(TINY.to_hf()))
  with pytest.raises(hf_io.CheckpointError, match=r"diffusion_pytorch_model\.safetensors is missing"):
    vae.from_pretrained(tmp_path)


def test_missing_and_misshapen_tensors_are_named(tmp_path):
  vae.save_pretrained(_ours(), tmp_path)
  file = tmp_path / vae.WEIGHTS_NAME
  tensors = load_file(str(file))
  key = "decoder.mid_block.attentions.0.to_k.weight"
  save_file({k: v for k, v in tensors.items() if k != key}, str(file))
  with pytest.raises(hf_io.CheckpointError, match=rf"{vae.WEIGHTS_NAME}.*missing.*{key}"):
    vae.from_pretrained(tmp_path, subfolder=None)
  save_file({**tensors, key: np.zeros((32, 16), np.float32)}, str(file))
  with pytest.raises(hf_io.CheckpointError, match=rf"{vae.WEIGHTS_NAME}.*{key}.*shape"):
    vae.from_pretrained(tmp_path, subfolder=None)


@pytest.mark.parametrize("key, value", [("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
                                        ("up_block_types", ["UpDecoderBlock2D"]),
                                        ("act_fn", "tanh")])
def test_unsupported_config_values_name_file_and_key(tmp_path, key, value):
  (tmp_path / "config.json").write_text(json.dumps({**TINY.to_hf(), key: value}))
  with pytest.raises(hf_io.CheckpointError, match=rf"config\.json: {key}=.*not supported"):
    vae.from_pretrained(tmp_path, subfolder=None)
