"""Discriminative Class Tokens (Schwartz et al.): a token learned from a frozen classifier, on images made with it.

No images of the class are needed. For class k, images are generated from
"a photo of <cls-k>"-like prompts by DDIM with classifier-free guidance, from
starting latents that are the same every epoch; a frozen classifier (the
config's `classifier`, mcti_jax/guides/) scores them, and the loss is the
cross-entropy against class k's target class. The first n - 1 denoising steps
run without gradient: the last UNet call, its guidance, the scheduler step,
the VAE decode, the classifier's input transform and the classifier keep the
graph, so memory stays that of one UNet call (`sampling.denoise`'s
grad_last_step_only: the gradient of the one-step function at the loop's
fixed x_{t_1}).

Early stopping is per class (the authors' code): the phase exports the token
of each class's lowest update loss; a class stops when its epoch accuracy
exceeds `stop_accuracy`, or after `patience` epochs without a new lowest
loss. A stopped class is frozen by a mask in the same compiled step.
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

# The authors' prompts. "{}" is the class token; the config's templates may add the class name after it
# ("{} {name}", the semantic case; see mcti_jax/configs/dct.py).
TEMPLATES = ("A photo of {}", "a high resolution realistic image of {}", "A close-up photo of a {}")
# A stream of the run's key that no step's draws use (those are fold_in(key, step) with step < 2**31 - 1).
_LATENT_STREAM = 2 ** 31 - 1


def defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=1.25e-3,
      templates=TEMPLATES,
      sampling_steps=30,  # DDIM steps of each generation; all but the last run without gradient
      guidance=7.0,  # classifier-free guidance
      images_per_update=5,  # generations per class and AdamW update (the authors accumulate 5)
      epoch_size=5,  # generations per epoch (a multiple of images_per_update); the same starting latents each epoch
      stop_accuracy=0.7,  # a class stops once more of its epoch's generations are classified as it
      patience=15,  # ... or after this many epochs without a new lowest update loss
  ))


def check(cfg) -> list[str]:
  """Problems with a phase's DCT settings (phases.plan turns them into one ConfigError)."""
  problems = []
  for field in ("sampling_steps", "images_per_update", "epoch_size", "patience"):
    value = getattr(cfg, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      problems.append(f"{field}={value!r} must be an integer >= 1")
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
          "stale_epochs": jnp.int32(0), "improved": jnp.bool_(False), "epoch_hits": jnp.float32(0.0)}


def next_state(state, vectors, terms, step, cfg) -> dict:
  """After phase step `step` of a training class: `vectors` made `terms`. Keep the best; stop at an epoch's end."""
  improved = terms["ce"] < state["best_loss"]
  hits = state["epoch_hits"] + terms["acc"] * cfg.images_per_update
  improved_in_epoch = state["improved"] | improved
  epoch_ends = (step + 1) % (cfg.epoch_size // cfg.images_per_update) == 0
  stale = jnp.where(improved_in_epoch, 0, state["stale_epochs"] + 1)
  stop = (hits / cfg.epoch_size > cfg.stop_accuracy) | (stale >= cfg.patience)
  return {
      "training": ~(epoch_ends & stop),
      "best_loss": jnp.where(improved, terms["ce"], state["best_loss"]),
      "best_vectors": jnp.where(improved, vectors, state["best_vectors"]),
      "stale_epochs": jnp.where(epoch_ends, stale, state["stale_epochs"]),
      "improved": jnp.where(epoch_ends, False, improved_in_epoch),
      "epoch_hits": jnp.where(epoch_ends, 0.0, hits),
  }


def final_vectors(state, vectors):
  """What the phase exports for a class: the token of its lowest update loss."""
  return jnp.where(jnp.isfinite(state["best_loss"]), state["best_vectors"], vectors)
