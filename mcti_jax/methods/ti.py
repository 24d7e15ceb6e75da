"""Textual Inversion: the frozen UNet's noise-prediction error with the class token in the prompt."""

import jax.numpy as jnp


def noise_loss(prediction, target):
  """Mean squared error between the UNet output and its training target (noise or v)."""
  return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)))
