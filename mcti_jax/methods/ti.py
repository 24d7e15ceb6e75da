"""Textual Inversion: the frozen UNet's noise-prediction error with the class token in the prompt.

The per-class loss is the MSE between the UNet's output for a noised shot and
its training target (noise or v), averaged over the class's items.
"""

import jax.numpy as jnp
import ml_collections

needs = ()
cross_class = False
metric_titles = {"mse": "noise MSE"}


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(lr=5e-4))


def noise_loss(prediction, target):
  """Mean squared error between the UNet output and its training target (noise or v)."""
  return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)))


def item_terms(item, ctx, cfg) -> dict:
  del ctx, cfg
  return {"mse": noise_loss(item.prediction, item.target)}


def loss(terms, cfg):
  del cfg
  return terms["mse"]
