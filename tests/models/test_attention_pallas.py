"""The Pallas TPU flash kernel, interpreted on the CPU, against XLA's attention: outputs and gradients, padding, causal.

Interpreted kernels take seconds to compile, so the shapes are the smallest that still take the paths that matter:
several 128-blocks (the online softmax), padded lengths (masked keys), a head size over 128, causal, a vmap.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from mcti_jax.models import attention, init, unet
from mcti_jax.tiny import checkpoints as tiny_checkpoints
from conftest import max_abs_diff

TOL = 1e-5  # relative to the largest reference value; the kernel agrees to ~1e-6, a mask or scale bug to ~1e-1
QUICK = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}  # ~20% less compile time


def output_and_grads(attend, q, k, v, vmapped):
  """attend(q, k, v) and the gradients of a random projection of it w.r.t. q, k, v; vmapped over axis 0 or not."""
  weights = normal(*q.shape, seed=9)
  attend = jax.vmap(attend) if vmapped else attend

  def out_and_vjp(q, k, v):
    out, pullback = jax.vjp(attend, q, k, v)
    return out, pullback(weights)

  return jax.jit(out_and_vjp, compiler_options=QUICK)(q, k, v)


def assert_close(got, want):
  assert got.shape == want.shape
  assert max_abs_diff(got, want) <= TOL * float(jnp.abs(want).max())


def normal(*shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)  # numpy: no compile


@pytest.mark.parametrize("shape_q, shape_kv, causal, vmapped", [
    # Fits the blocks: two 128-blocks each way, causal (the upper-right block is skipped). Vmapped, as the train
    # step vmaps the UNet over classes: the kernel's grid gains an axis.
    ((2, 1, 256, 2, 8), (2, 1, 256, 2, 8), True, True),
    # Padded: queries to 128, keys to 256 (the last key block holds 56 masked keys, so the online softmax meets
    # them), head size 160 to 256.
    ((2, 77, 1, 160), (2, 200, 1, 160), False, False),
])
def test_pallas_interpret_matches_xla(monkeypatch, shape_q, shape_kv, causal, vmapped):
  q, k, v = normal(*shape_q, seed=0), normal(*shape_kv, seed=1), normal(*shape_kv, seed=2)
  xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  monkeypatch.setenv("MCTI_ATTENTION", "pallas_interpret")
  pallas = lambda q, k, v: attention.dot_product_attention(q, k, v, is_causal=causal)
  (want_out, want_grads), (got_out, got_grads) = (output_and_grads(f, q, k, v, vmapped) for f in (xla, pallas))
  assert_close(got_out, want_out)
  for got, want in zip(got_grads, want_grads):
    assert float(jnp.abs(want).max()) > 0.1
    assert_close(got, want)


def test_tpu_interpret_mode_matches_xla():
  # JAX's TPU interpret mode also simulates the TPU's memory: unwritten buffers read as NaN, out-of-bounds reads
  # raise. Forward only (it compiles slower). CLIP's text tower: 77 tokens, padded to 128, causal.
  q, k, v = (normal(1, 77, 2, 16, seed=seed) for seed in range(3))
  attend = lambda q, k, v: attention.pallas_attention(q, k, v, is_causal=True, interpret=pltpu.InterpretParams())
  xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
  assert_close(jax.jit(attend)(q, k, v), jax.jit(xla)(q, k, v))


def pallas_calls(jaxpr) -> int:
  """pallas_call equations in a jaxpr and all its sub-jaxprs (the printed text shows a repeated sub-jaxpr once)."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == "pallas_call"
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, "eqns"):
          count += pallas_calls(sub)
  return count


def kernels_for(q_shape, k_shape, causal=False) -> int:
  attend = lambda q, k: attention.dot_product_attention(q, k, k, is_causal=causal)
  return pallas_calls(jax.make_jaxpr(attend)(jnp.ones(q_shape), jnp.ones(k_shape)).jaxpr)


def test_auto_on_a_tpu_takes_the_kernel_only_where_it_fits(monkeypatch):
  # Traced only (nothing runs), as if on a TPU: lengths that are multiples of 128 with head sizes up to 128 or
  # multiples of 128 take it; 77 text tokens, 64 pixels (8x8) and head size 160 stay on XLA.
  monkeypatch.setenv("MCTI_ATTENTION", "auto")
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert kernels_for((1, 256, 2, 40), (1, 256, 2, 40)) == 1
  assert kernels_for((1, 256, 1, 512), (1, 256, 1, 512)) == 1  # the VAE's single 512-wide head
  assert kernels_for((1, 256, 2, 40), (1, 77, 2, 40)) == 0
  assert kernels_for((1, 77, 2, 64), (1, 77, 2, 64), causal=True) == 0
  assert kernels_for((1, 64, 2, 40), (1, 64, 2, 40)) == 0
  assert kernels_for((1, 256, 2, 160), (1, 256, 2, 160)) == 0


def test_auto_off_a_tpu_never_takes_the_kernel(monkeypatch):
  monkeypatch.setenv("MCTI_ATTENTION", "auto")
  assert kernels_for((1, 256, 2, 40), (1, 256, 2, 40)) == 0


def test_pallas_off_a_tpu_names_the_fix(monkeypatch):
  monkeypatch.setenv("MCTI_ATTENTION", "pallas")
  q = jnp.ones((1, 128, 2, 8))
  with pytest.raises(ValueError, match="MCTI_ATTENTION=pallas .*backend is cpu.*pallas_interpret"):
    attention.dot_product_attention(q, q, q)


def test_tiny_unet_same_output_with_the_kernel(monkeypatch):
  # Every attention of the tiny UNet goes through the kernel, padded: 8x8 = 64 pixels, 77 text tokens. One level
  # (still a down, a mid and an up block with attention) halves XLA's compile, the most of this test's time.
  config = dataclasses.replace(tiny_checkpoints.unet_config(), block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                               up_block_types=("CrossAttnUpBlock2D",))
  model = init.create(lambda: unet.UNet2DConditionModel(config, rngs=nnx.Rngs(0)), seed=3)
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, config.sample_size, config.sample_size, config.in_channels)), jnp.float32)
  context = jnp.asarray(rng.normal(size=(1, 77, config.cross_attention_dim)), jnp.float32)
  t = jnp.array([500])
  attentions = sum(isinstance(m, unet.Attention) for _, m in nnx.iter_graph(model))  # 4 transformers x 2
  outs = {}
  for setting, kernels in (("xla", 0), ("pallas_interpret", attentions)):
    monkeypatch.setenv("MCTI_ATTENTION", setting)  # read when traced: a new function each time, so no cached trace
    traced = jax.jit(lambda state: nnx.merge(graphdef, state)(x, t, context), compiler_options=QUICK).trace(state)
    assert pallas_calls(traced.jaxpr.jaxpr) == kernels
    outs[setting] = traced.lower().compile()(state)
  assert_close(outs["pallas_interpret"], outs["xla"])
