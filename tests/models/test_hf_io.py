"""The generic torch <-> flax conversion, checked against torch layers directly."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from mcti_jax.models import hf_io
from conftest import max_abs_diff


class Net(nnx.Module):
  """Names mirror `TorchNet` below, so keys map one to one."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 5, (3, 3), padding=1, rngs=rngs)
    self.norm = nnx.GroupNorm(5, num_groups=5, epsilon=1e-5, rngs=rngs)
    self.proj = nnx.List([nnx.Linear(5, 4, rngs=rngs)])

  def __call__(self, x):  # x: NHWC
    return self.proj[0](self.norm(self.conv(x)).mean(axis=(1, 2)))


class TorchNet(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    self.norm = torch.nn.GroupNorm(5, 5, eps=1e-5)
    self.proj = torch.nn.ModuleList([torch.nn.Linear(5, 4)])

  def forward(self, x):  # x: NCHW
    return self.proj[0](self.norm(self.conv(x)).mean(dim=(2, 3)))


def _torch_net(tmp_path):
  torch.manual_seed(0)
  net = TorchNet().eval()
  with torch.no_grad():
    for p in net.parameters():
      p.add_(0.1 * torch.randn_like(p))
  save_file({k: v.numpy() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
  return net


def test_torch_key_names_the_torch_parameter():
  assert hf_io.torch_key(("down_blocks", 0, "resnets", 1, "conv1", "kernel")) == "down_blocks.0.resnets.1.conv1.weight"
  assert hf_io.torch_key(("final_layer_norm", "scale")) == "final_layer_norm.weight"
  assert hf_io.torch_key(("embeddings", "token_embedding", "embedding")) == "embeddings.token_embedding.weight"
  assert hf_io.torch_key(("embeddings", "class_embedding")) == "embeddings.class_embedding"


def test_torch_weights_load_and_give_torch_outputs(tmp_path):
  net = _torch_net(tmp_path)
  ours = hf_io.load_model(lambda: Net(nnx.Rngs(0)), tmp_path, "w.safetensors")
  x = np.random.default_rng(0).normal(size=(2, 3, 6, 7)).astype(np.float32)
  want = net(torch.from_numpy(x)).detach().numpy()
  got = ours(jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert max_abs_diff(got, want) < 1e-5


def test_saved_state_loads_into_torch(tmp_path):
  ours = Net(nnx.Rngs(3))
  hf_io.save_model(ours, tmp_path / "out", {"kind": "test"}, "w.safetensors")
  net = TorchNet()
  from safetensors.torch import load_file
  net.load_state_dict(load_file(str(tmp_path / "out" / "w.safetensors")))
  x = np.random.default_rng(1).normal(size=(2, 3, 5, 5)).astype(np.float32)
  assert max_abs_diff(ours(jnp.asarray(x.transpose(0, 2, 3, 1))), net(torch.from_numpy(x)).detach().numpy()) < 1e-5
  assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"kind": "test"}


def test_missing_tensor_names_file_and_key(tmp_path):
  _torch_net(tmp_path)
  from safetensors.numpy import load_file
  state = load_file(str(tmp_path / "w.safetensors"))
  del state["proj.0.bias"]
  save_file(state, str(tmp_path / "w.safetensors"))
  with pytest.raises(hf_io.CheckpointError, match=r"w\.safetensors.*proj\.0\.bias"):
    hf_io.load_model(lambda: Net(nnx.Rngs(0)), tmp_path, "w.safetensors")


def test_wrong_shape_names_file_key_and_both_shapes(tmp_path):
  _torch_net(tmp_path)
  from safetensors.numpy import load_file
  state = load_file(str(tmp_path / "w.safetensors"))
  state["proj.0.weight"] = np.zeros((4, 6), np.float32)
  save_file(state, str(tmp_path / "w.safetensors"))
  with pytest.raises(hf_io.CheckpointError, match=r"w\.safetensors.*'proj\.0\.weight'.*\(4, 6\).*\(4, 5\)"):
    hf_io.load_model(lambda: Net(nnx.Rngs(0)), tmp_path, "w.safetensors")


def test_missing_weights_file_lists_what_is_there(tmp_path):
  (tmp_path / "other.safetensors").write_bytes(b"")
  with pytest.raises(hf_io.CheckpointError, match=r"model\.safetensors is missing.*other\.safetensors"):
    hf_io.read_safetensors(tmp_path, "model.safetensors")


def test_bad_path_is_refused_with_a_hint(tmp_path):
  with pytest.raises(hf_io.CheckpointError, match="does not exist"):
    hf_io.resolve_folder(tmp_path / "nope")
  with pytest.raises(hf_io.CheckpointError, match="unet"):
    hf_io.resolve_folder(tmp_path, "unet")


def test_bfloat16_tensors_load(tmp_path):
  import ml_dtypes
  w = np.random.default_rng(0).normal(size=(4, 5)).astype(ml_dtypes.bfloat16)
  save_file({"proj.0.weight": w, "proj.0.bias": np.zeros(4, ml_dtypes.bfloat16)}, str(tmp_path / "w.safetensors"))
  state, _ = hf_io.read_safetensors(tmp_path, "w.safetensors")
  np.testing.assert_array_equal(state["proj.0.weight"].astype(np.float32), w.astype(np.float32))


def test_write_folder_is_atomic(tmp_path):
  hf_io.write_folder(tmp_path / "ckpt", {"config.json": {"a": 1}})

  class Boom(dict):
    def items(self):
      yield "config.json", {"a": 2}
      raise RuntimeError("disk full")

  with pytest.raises(RuntimeError):
    hf_io.write_folder(tmp_path / "ckpt", Boom())
  assert json.loads((tmp_path / "ckpt" / "config.json").read_text()) == {"a": 1}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
