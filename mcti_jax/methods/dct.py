"""Discriminative Class Tokens (Schwartz et al.): a token learned from a frozen classifier, on images made with it.

No images of the class are needed. For class k, images are generated from the
paper's prompts with the class's name (Sec. 3: "A photo of a S_c label"),
"{}" the token and "{name}" the classifier's name of class k, by DDIM with
classifier-free guidance from starting latents that are the same every epoch;
a frozen classifier (the config's `classifier`, mcti_jax/guides/) scores
them, and the loss is the cross-entropy against class k's target class. The
first n - 1 denoising steps run without gradient: the last UNet call, its
guidance, the scheduler step, the VAE decode, the classifier's input
transform and the classifier keep the graph, so memory stays that of one UNet
call (`sampling.denoise`'s grad_last_step_only: the gradient of the one-step
function at the loop's fixed x_{t_1}).

Early stopping is per class, counted as the authors' code counts it: a class
stops at the end of an epoch in which more than `stop_accuracy` of its
generations were classified as its target, or once more than `patience`
updates in a row brought no new lowest update loss (their counter starts at
15, loses one per such update and stops below 0: after 16). The phase exports
the token right after the update of the lowest loss (`kept_updates=1`: their
code saves the pipeline after `optimizer.step()`); `kept_updates=0` keeps
instead the token that made that loss, the one whose images were scored. A
stopped class is frozen by a mask in the same compiled step.

Paper vs this module (paper: arXiv:2303.17155; code: github.com/idansc/discriminative_class_tokens, f74e03a):

| setting | paper (section) / authors' code | this module | why |
|---|---|---|---|
| prompts | Sec. 3 (ii): 2 [a]; code: 3 [b] | the paper's 2 (TEMPLATES) | the paper's, and its reason [a] |
| class name | Sec. 3: "A photo of a S_c label" | in the prompts; `,no_names` drops it | the paper's |
| prompt of an image | code: i mod T for image i of an epoch, shuffled | drawn per image | equal in expectation |
| batch | Sec. 3 (i): 5; code: 5 accumulated | 5 per update, one update an epoch | |
| optimizer | code: AdamW, lr 0.00025 * 5, weight decay 1e-2 | the same | |
| sampler | code: SD's default, PNDM; 30 steps [c]; guidance 7 | DDIM, eta 0; 30 steps; 7 | [d] |
| gradient | Sec. 3, Fig. 3: the final denoising step only | the last DDIM step: one UNet call | [d] |
| stop: accuracy | code: epoch accuracy > 0.7 | stop_accuracy = 0.7 | |
| stop: patience | code: 15, one per update, stops below 0 | patience = 15 updates, the same | |
| stop: cap | code: 50 epochs | dct:sd: 50 steps (one per epoch) | |
| kept token | code: saved after `optimizer.step()` | kept_updates = 1 | [e] |
| collapse | code: a loss > 2x the best -> new latents | not done | not in the paper [f] |

[a] "A high-resolution realistic image of a S_c label", "A photo of S_c label": "too much variability during
    training [is] harmful to convergence". The paper's generic prompt, Sec. 3, is "A photo of a S_c label".
[b] `number_of_prompts = 3` of prompt_dataset.py: "A photo of", "a high resolution realistic image of",
    "A close-up photo of a", each + " <token> <label>".
[c] 40 in the first upload (2023-07-19); 30 since commit 434634a (2023-07-21), its current value.
[d] DDIM is the sampler we have (generation/sampling.py). With eta 0 it is deterministic, like PNDM, and its last
    step is one UNet call, so the gradient through "the last step" is exactly Fig. 3's. PNDM (PLMS) makes steps + 1
    UNet calls and mixes the last 4 noise predictions; the code's `i < steps - 1` test leaves the last two calls in
    the graph, so the authors' gradient runs through two UNet calls, not one.
[e] The authors' (and so the default). kept_updates = 0 keeps the token that made the lowest loss, the one whose
    images were scored; the exported token is then one AdamW step short of the authors'. Neither is wrong: the
    post-update token was never itself scored, the pre-update one never received its own update.
[f] The loss compared across epochs would then be that of other images.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mcti_jax.tokens import conditioning
from mcti_jax.generation import sampling
from mcti_jax.tokens import placeholders as tok
from mcti_jax.models import vae as vae_lib
from mcti_jax.models.frozen import freeze

needs = ("classifier",)
uses_shots = False  # it draws its own items: generations, not shots
cross_class = False
metric_titles = {"ce": "classifier CE of the generations", "acc": "generations classified as the target",
                 "training": "classes still training"}

# The paper's two training prompts (Sec. 3, design choice (ii)): "{}" is the class token, "{name}" the classifier's
# name of its class. NAME_FREE_TEMPLATES: the same without the name (the `<preset>,no_names` presets).
TEMPLATES = ("A high-resolution realistic image of a {} {name}", "A photo of {} {name}")
NAME_FREE_TEMPLATES = tuple(t.replace(" {name}", "") for t in TEMPLATES)
# A stream of the run's key that no step's draws use (those are fold_in(key, step) with step < 2**31 - 1).
_LATENT_STREAM = 2 ** 31 - 1


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=1.25e-3,
      templates=TEMPLATES,
      sampling_steps=30,  # DDIM steps of each generation (the authors': 30 PNDM steps); the last alone has gradient
      guidance=7.0,  # classifier-free guidance
      images_per_update=5,  # generations per class and AdamW update (the authors accumulate 5)
      epoch_size=5,  # generations per epoch (a multiple of images_per_update); the same starting latents each epoch
      stop_accuracy=0.7,  # a class stops once more of its epoch's generations are classified as it
      patience=15,  # ... or once more than this many updates in a row brought no new lowest update loss
      kept_updates=1,  # the kept token is the lowest loss's plus 1 update (the authors'), or 0: the one scored
  ))


def check(cfg) -> list[str]:
  """Problems with a phase's DCT settings (phases.plan turns them into one ConfigError)."""
  problems = []
  for field, least in (("sampling_steps", 1), ("images_per_update", 1), ("epoch_size", 1), ("patience", 0)):
    value = getattr(cfg, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      problems.append(f"{field}={value!r} must be an integer >= {least}")
  if cfg.kept_updates not in (0, 1) or isinstance(cfg.kept_updates, (bool, float)):
    problems.append(f"kept_updates={cfg.kept_updates!r} must be 1 (the token after the lowest-loss update) or 0 "
                    "(the token that made it)")
  if not problems and cfg.epoch_size % cfg.images_per_update:
    problems.append(f"epoch_size={cfg.epoch_size} must be a multiple of images_per_update={cfg.images_per_update}")
  return problems


def backbone_parts(loaded) -> dict:
  """Its parts of the step's Backbone: the VAE that decodes its generations, the "" prompt's context (guidance),
  the classifier and each class's target in it."""
  uncond_context = conditioning.encode_prompts(loaded.text_encoder, loaded.sd.tokenizer, [""])[0]  # [1, L, D]
  return {"vae": freeze(loaded.sd.vae), "uncond_context": uncond_context, "classifier": loaded.classifier,
          "targets": loaded.targets}


def starting_latents(run_key, k, indices, shape) -> jax.Array:
  """N(0, 1) latents [len(indices), *shape] of class k: image i draws from fold_in(fold_in(stream, k), i)."""
  key = jax.random.fold_in(jax.random.fold_in(run_key, _LATENT_STREAM), k)
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))(indices)


def generate(vectors, k, latents, template_ids, backbone, cfg, *, first_placeholder_id: int, pooling: str,
             grad_last_step_only: bool = True) -> jax.Array:
  """Images [B, H, W, 3] in [0, 1] of class k from `latents` [B, h, w, c], prompt b holding `template_ids[b]`."""
  num_vectors = vectors.shape[0]
  text_encoder = backbone.text_encoder.module
  placeholder_ids = first_placeholder_id + k * num_vectors + jnp.arange(num_vectors)
  ids = tok.ids_for_class(template_ids, first_placeholder_id, num_vectors, k)  # [B, L]
  embeds = tok.splice(tok.token_table(text_encoder), ids, placeholder_ids, vectors)
  context, _ = text_encoder(ids, inputs_embeds=embeds, pooling=pooling)
  timesteps = jnp.asarray(sampling.ddim_timesteps(backbone.schedule.config, cfg.sampling_steps))
  latents = sampling.denoise(backbone.unet.module, backbone.schedule, latents, context,
                             backbone.parts["uncond_context"], timesteps, cfg.guidance, use_cfg=cfg.guidance > 1,
                             grad_last_step_only=grad_last_step_only)
  return vae_lib.decode_images(backbone.parts["vae"].module, latents)


def class_terms(vectors, k, key, ctx, cfg) -> dict:
  """The classifier's CE and hits on this update's generations of class k (its images of the epoch)."""
  updates_per_epoch = cfg.epoch_size // cfg.images_per_update
  first = (ctx.step % updates_per_epoch) * cfg.images_per_update
  indices = first + jnp.arange(cfg.images_per_update)
  latent_shape = ctx.latent_shape
  latents = starting_latents(ctx.run_key, k, indices, latent_shape)
  class_templates = ctx.template_ids[k] if ctx.template_ids.ndim == 3 else ctx.template_ids  # [T, L]
  which = jax.random.randint(key, (cfg.images_per_update,), 0, class_templates.shape[0])
  images = generate(vectors, k, latents, class_templates[which], ctx.backbone, cfg,
                    first_placeholder_id=ctx.first_placeholder_id, pooling=ctx.pooling)
  logits = ctx.backbone.parts["classifier"](images).astype(jnp.float32)
  target = ctx.backbone.parts["targets"][k]
  ce = -jax.nn.log_softmax(logits)[:, target]
  hits = (jnp.argmax(logits, -1) == target).astype(jnp.float32)
  return {"ce": ce.mean(), "acc": hits.mean()}


def loss(terms, cfg):
  del cfg
  return terms["ce"]


# ------------------------------------------------------------------ per-class early stopping


def class_state(vectors, cfg) -> dict:
  """Class k's early-stopping state at the start of the phase ("training" is read by the trainer)."""
  del cfg
  return {"training": jnp.bool_(True), "best_loss": jnp.float32(np.inf), "best_vectors": vectors,
          "pending": jnp.bool_(False), "stale_updates": jnp.int32(0), "epoch_hits": jnp.float32(0.0)}


def next_state(state, vectors, terms, step, cfg) -> dict:
  """After phase step `step` of a training class: `vectors` made `terms`. Keep the best; stop at an epoch's end.

  `vectors` are the token before this step's update, i.e. right after the previous one: with kept_updates=1 a new
  lowest loss sets `pending`, and the next call (or final_vectors, after the last step) keeps the vectors it is
  given, the post-update token of that lowest-loss update.
  """
  improved = terms["ce"] < state["best_loss"]
  if cfg.kept_updates == 1:
    best_vectors = jnp.where(state["pending"], vectors, state["best_vectors"])
    pending = improved
  else:  # 0: the token that made the lowest loss
    best_vectors = jnp.where(improved, vectors, state["best_vectors"])
    pending = jnp.bool_(False)
  stale = jnp.where(improved, 0, state["stale_updates"] + 1)  # the authors' counter is patience - stale
  hits = state["epoch_hits"] + terms["acc"] * cfg.images_per_update
  epoch_ends = (step + 1) % (cfg.epoch_size // cfg.images_per_update) == 0
  stop = (hits / cfg.epoch_size > cfg.stop_accuracy) | (stale > cfg.patience)
  return {
      "training": ~(epoch_ends & stop),
      "best_loss": jnp.where(improved, terms["ce"], state["best_loss"]),
      "best_vectors": best_vectors,
      "pending": pending,
      "stale_updates": stale,
      "epoch_hits": jnp.where(epoch_ends, 0.0, hits),
  }


def final_vectors(state, vectors):
  """What the phase exports for a class: the token after (kept_updates=0: before) its lowest-loss update.

  `vectors` are the class's last tokens: those after its last update (a stopped class's are frozen after it)."""
  kept = jnp.where(state["pending"], vectors, state["best_vectors"])
  return jnp.where(jnp.isfinite(state["best_loss"]), kept, vectors)
