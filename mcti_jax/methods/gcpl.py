"""GCPL (Towards Generative Class Prompt Learning): a class token inside a per-dataset template, noise MSE only.

What distinguishes it from TI is the prompt: one template per dataset that
names the super-class ("A photo of {}, a type of car.", GCPL Table 1), and a
token initialised from the super-class word. Both are config fields
(`data.template`, `tokens.init_word`; mcti_jax/configs/gcpl.py sets them per preset).
It is evaluated with the few-shot Diffusion Classifier and the CLIP-token head.

Epochs in steps. The paper trains for 2000 epochs (section 4.2). Its few-shot
set is n_shots images per class, and its code trains one class at a time
(src/train_textinv_fewshot.py), so an epoch is each of a class's shots seen
once. This trainer draws, at every step, batch_per_class x grad_accum items per
class, each a uniformly random shot: one epoch is n_shots / (batch_per_class x
grad_accum) steps in expectation. The paper does not give GCPL's batch; its code
takes 1 image per forward pass and accumulates 4 before each AdamW step
(gradient_accumulation_steps=4), which mcti_jax/configs/gcpl.py follows with
grad_accum=4. At the paper's 16 shots: 2000 x 16 / 4 = 8000 steps (32000 items per
class, as 32000 steps of one item would be).

Paper vs this module (GCPL paper = Chattopadhyay et al., arXiv 2409.01835; code =
github.com/soumitri2001/GCPL, src/gcpl.py and src/train_textinv_fewshot.py):

  setting          | paper (section)               | this module, configs/gcpl.py  | why, if different
  -----------------|-------------------------------|-------------------------------|------------------------------------
  loss             | eq. 1-2 (3.2)                 | noise MSE (ti.item_terms)     |
  lr               | 5e-4 (4.2)                    | lr=5e-4                       | code: x 4 (scale_lr); paper kept
  optimizer        | AdamW(0.9, 0.999, 0.01) (4.2) | the trainer's AdamW, the same |
  items per update | not given                     | 4 (grad_accum=4)              | the code's accumulation
  training length  | 2000 epochs (4.2)             | 2000 * n_shots / 4 steps      | the code's: 500 updates
                   |                               | (8000 at 16 shots)            | (125 epochs); paper kept
  lr schedule      | not given                     | constant                      | the code's, no warm-up
  prompt           | Table 1 (4.2)                 | data.template (presets)       |
  init word        | Table 1 (4.2)                 | tokens.init_word (presets)    |
  shots            | 16 (Table 2; 1-16 in 5.2)     | data.n_shots=16               |
  model            | SD v1.4 (4.2)                 | model.sd_path (SD 1.5)        | the project's default

The tiny-model presets (`gcpl:tiny`, `gcpl:synthetic`) take this project's own schedule for the 32-wide tiny
text tower: see mcti_jax/configs/gcpl.py.
"""

import ml_collections

from mcti_jax.methods import ti

needs = ()
cross_class = False
metric_titles = ti.metric_titles

EPOCHS = 2000  # section 4.2
ITEMS_PER_UPDATE = 4  # the code's gradient accumulation (the paper gives no batch for GCPL)


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=5e-4,  # section 4.2 (CoMPLe's is 1e-3: compare them at equal settings, as tests/methods/test_methods.py does)
      templates="dataset",  # config.data.template, e.g. "A photo of {}, a type of car." (Table 1)
  ))


item_terms = ti.item_terms
loss = ti.loss
