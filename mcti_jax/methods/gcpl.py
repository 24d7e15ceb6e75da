"""GCPL (Towards Generative Class Prompt Learning): a class token inside a per-dataset template, noise MSE only.

What distinguishes it from TI is the prompt: one template per dataset that
names the super-class ("A photo of {}, a type of car.", GCPL Table 1), and a
token initialised from the super-class word. Both are config fields
(`data.template`, `tokens.init_word`; mcti_jax/configs/gcpl.py sets them per preset).
It is evaluated with the few-shot Diffusion Classifier and the CLIP-token head.
"""

import ml_collections

from mcti_jax.methods import ti

needs = ()
cross_class = False
metric_titles = ti.metric_titles


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=1e-3,  # CoMPLe's, so that CoMPLe at lambda 0 is GCPL
      templates="dataset",  # config.data.template, e.g. "A photo of {}, a type of car."
  ))


item_terms = ti.item_terms
loss = ti.loss
