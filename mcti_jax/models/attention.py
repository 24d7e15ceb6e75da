"""Scaled dot-product attention: cuDNN's fused kernel on a GPU where it applies, else XLA's.

`jax.nn.dot_product_attention` defaults to XLA, which materialises the
[batch, heads, T, S] scores: at SD's 64x64 level, 4096 x 4096 per head, kept
for the backward pass. cuDNN's flash kernel does not. It takes only float16 /
bfloat16 and the head sizes its version supports (SD 1.5's 1280-wide levels,
head size 160, are not among them on every version), so anything else stays
on XLA. `MCTI_ATTENTION` picks: `auto` (the default: cuDNN on a GPU where it
applies), `xla`, or `cudnn` (cuDNN or an error).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

CHOICES = ("auto", "xla", "cudnn")


def implementation() -> str:
  """The `MCTI_ATTENTION` setting, read when a model is traced."""
  choice = os.environ.get("MCTI_ATTENTION", "auto")
  if choice not in CHOICES:
    raise ValueError(f"MCTI_ATTENTION={choice!r}: use one of {', '.join(CHOICES)}")
  return choice


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = False) -> jax.Array:
  """Softmax(q k^T / sqrt(head size)) v over [batch, length, heads, head size] arrays."""
  choice = implementation()
  half = q.dtype in (jnp.bfloat16, jnp.float16)
  if choice == "cudnn" or (choice == "auto" and half and jax.default_backend() == "gpu"):
    try:
      return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="cudnn")
    except (NotImplementedError, ValueError, RuntimeError):  # an unsupported shape, dtype or cuDNN version
      if choice == "cudnn":
        raise
  return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal)
