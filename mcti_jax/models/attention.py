"""Scaled dot-product attention: cuDNN's fused kernel on a GPU, a Pallas flash kernel on a TPU, else XLA's.

`jax.nn.dot_product_attention` defaults to XLA, which materialises the
[batch, heads, T, S] scores: at SD's 64x64 level, 4096 x 4096 per head, kept
for the backward pass. Flash kernels do not. `MCTI_ATTENTION` picks:

- `auto` (the default): cuDNN on a GPU for float16 / bfloat16 where its version
  takes the head size (SD 1.5's 160 is not taken on every version); the Pallas
  kernel on a TPU where the shapes fit it (below); XLA everywhere else.
- `xla`: always XLA.
- `cudnn`: cuDNN, or its error.
- `pallas`: JAX's Pallas TPU flash-attention kernel
  (`jax.experimental.pallas.ops.tpu.flash_attention`), padding what does not
  fit; an error off a TPU.
- `pallas_interpret`: the same kernel, forward and backward, interpreted
  (`pallas_call(interpret=True)`: a scan over its grid in plain JAX), on any
  backend. Slow: for tests, which check it against `xla` on a CPU.

The Pallas kernel tiles lengths in blocks of 128 and takes head sizes up to
128 or multiples of 128. `auto` uses it only where the shapes fit as they are:
in SD 1.5, the self-attention at 64x64 and 32x32 (head sizes 40 and 80), where
the memory goes, and the VAE's (one head of 512). Cross-attention (77 text
tokens), the CLIP text tower (77, causal), 16x16 (head size 160) and 8x8 (64
tokens) stay on XLA: their scores are at most 4096 x 77 per head, 1/53 of the
64x64 self-attention's, so a flash kernel saves little there, while padding
77 keys to 128 would add 66% to the work. `pallas` pads instead: lengths up to
a multiple of 128 (padded keys are masked out with the kernel's segment ids,
so they get no weight; padded queries are dropped) and head sizes above 128 up
to a multiple of 128 with zeros (which change no score and no output). The
scale is 1/sqrt(head size) and causal masks are top-left aligned, as XLA's.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp

CHOICES = ("auto", "xla", "cudnn", "pallas", "pallas_interpret")
BLOCK = 128  # the Pallas kernel's default tile along both lengths (key tiles must be multiples of 128); larger tiles
             # may be faster, which only a TPU can tell


def implementation() -> str:
  """The `MCTI_ATTENTION` setting, read when a model is traced."""
  choice = os.environ.get("MCTI_ATTENTION", "auto")
  if choice not in CHOICES:
    raise ValueError(f"MCTI_ATTENTION={choice!r}: use one of {', '.join(CHOICES)}")
  return choice


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = False) -> jax.Array:
  """Softmax(q k^T / sqrt(head size)) v over [batch, length, heads, head size] arrays."""
  choice = implementation()
  if choice in ("pallas", "pallas_interpret"):
    return pallas_attention(q, k, v, is_causal=is_causal, interpret=choice == "pallas_interpret")
  if choice == "auto" and jax.default_backend() == "tpu" and fits_pallas(q, k, v):
    return pallas_attention(q, k, v, is_causal=is_causal)
  half = q.dtype in (jnp.bfloat16, jnp.float16)
  if choice == "cudnn" or (choice == "auto" and half and jax.default_backend() == "gpu"):
    try:
      return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="cudnn")
    except (NotImplementedError, ValueError, RuntimeError):  # an unsupported shape, dtype or cuDNN version
      if choice == "cudnn":
        raise
  return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal)


def fits_pallas(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
  """Whether the Pallas kernel takes these [batch, length, heads, head size] arrays as they are, without padding."""
  head = q.shape[-1]
  return (q.shape[1] % BLOCK == 0 and k.shape[1] % BLOCK == 0 and (head <= 128 or head % 128 == 0)
          and k.shape[-1] == head and k.shape == v.shape and q.dtype in (jnp.float32, jnp.bfloat16))


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = False,
                     interpret: Any = False) -> jax.Array:
  """The Pallas TPU flash kernel on [batch, length, heads, head size] arrays, padded to fit it.

  `interpret` is what `pallas_call` takes: True runs the kernel, forward and
  backward, as a scan over its grid in plain JAX, on any backend (the
  `pallas_interpret` setting); `jax.experimental.pallas.tpu.InterpretParams()`
  in TPU interpret mode, which also simulates the TPU's memory (unwritten
  buffers read as NaN, out-of-bounds reads raise) but, in JAX 0.10, fails
  under `jax.vmap`, which the training step puts around the UNet.
  """
  if not interpret and jax.default_backend() != "tpu":
    raise ValueError(f"MCTI_ATTENTION=pallas runs a TPU kernel, and the backend is {jax.default_backend()}: use "
                     "MCTI_ATTENTION=auto or xla here, or pallas_interpret to interpret the kernel (slow; for tests)")
  if q.shape[-1] != k.shape[-1] or k.shape != v.shape:
    raise ValueError(f"Pallas attention needs q, k, v of one head size and k, v of one shape; got q {q.shape}, "
                     f"k {k.shape}, v {v.shape}: use MCTI_ATTENTION=xla")
  run = functools.partial(_padded_flash, is_causal=is_causal)
  return (_interpreted(run, interpret) if interpret else run)(q, k, v)


def _padded_flash(q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool) -> jax.Array:
  """Pads lengths to multiples of BLOCK (padded keys masked) and head sizes over 128 to multiples of 128."""
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # imported here: Pallas is needed only here

  batch, t, _, head = q.shape
  s = k.shape[1]
  up = lambda n, m: -(-n // m) * m
  t_pad, s_pad, head_pad = up(t, BLOCK), up(s, BLOCK), head if head <= 128 else up(head, 128)

  def to_kernel(x, length):  # [b, len, h, d] -> zero-padded [b, h, length, head_pad]
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, head_pad - head))).transpose(0, 2, 1, 3)

  segment_ids = None
  if s_pad != s:  # queries are segment 1, real keys 1, padded keys 0: a padded key matches no query
    real = (jnp.arange(s_pad) < s).astype(jnp.int32)
    segment_ids = fa.SegmentIds(q=jnp.ones((batch, t_pad), jnp.int32), kv=jnp.broadcast_to(real, (batch, s_pad)))
  out = fa.flash_attention(to_kernel(q, t_pad), to_kernel(k, s_pad), to_kernel(v, s_pad), segment_ids=segment_ids,
                           causal=is_causal, sm_scale=1.0 / math.sqrt(head))
  return out.transpose(0, 2, 1, 3)[:, :t, :, :head]


def _interpreted(fn, interpret):
  """`fn` with every Pallas call in it, forward and backward, run with `pallas_call(interpret=interpret)`.

  `force_tpu_interpret_mode(x)` makes `x` the `interpret` of every pallas_call
  traced inside it (True as well as InterpretParams: pallas_call takes both,
  though the context manager is typed for the latter). But JAX traces a
  custom_vjp's backward (here the kernel's backward kernels) after the forward
  has returned, outside any `with` around the forward: hence this custom_vjp,
  which traces both passes inside the context.
  """
  from jax.experimental.pallas import tpu as pltpu

  @jax.custom_vjp
  def run(*args):
    with pltpu.force_tpu_interpret_mode(interpret):
      return fn(*args)

  def forward(*args):
    with pltpu.force_tpu_interpret_mode(interpret):
      return jax.vjp(fn, *args)  # (output, pullback): the pullback (a pytree of residuals) is the residual

  def backward(pullback, grad):
    with pltpu.force_tpu_interpret_mode(interpret):
      return pullback(grad)

  run.defvjp(forward, backward)
  return run
