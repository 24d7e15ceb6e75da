"""Textual Inversion: the frozen UNet's noise-prediction error with the class token in the prompt.

The per-class loss is the MSE between the UNet's output for a noised shot and
its training target (noise or v), averaged over the class's items.

Paper vs this module (TI as MC-TI's warm-up: Wang et al. Sec. 4.1 "adhere to the same training scheme as
outlined in the original paper", Gal et al.; tests/test_defaults.py holds the values):

  setting      | paper (section)                       | this module (mcti:pets)      | why, if different
  -------------|---------------------------------------|------------------------------|--------------------------
  loss         | the LDM noise MSE (Gal et al., eq. 2) | noise (or v) MSE             |
  steps        | 3000 (MC-TI 4.1)                      | phase.ti.steps = 3000        |
  optimizer    | AdamW, lr 5e-4 (MC-TI 4.1)            | AdamW, lr 5e-4, decay 0.01   | decay: torch's default
  items a step | not given                             | 1 shot per class, every class| all classes in one step
  prompts      | Gal et al.'s ImageNet templates       | the same 27 (config.templates)|
  init         | a word for the concept (Gal et al.)   | tokens.init_word per preset  |
  model        | SD v1.5 (MC-TI 4.1)                   | model.sd_path = SD v1.5      |
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
