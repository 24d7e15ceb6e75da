"""The classifier's inputs: image latents x0 from the VAE, class conditioning from the text encoder."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mcti_jax.runtime import parallel
from mcti_jax.data import preprocess
from mcti_jax.models import vae as vae_lib
from mcti_jax.models.frozen import Frozen


@jax.jit
def _encode_latents(vae: Frozen, images):
  return vae_lib.encode_latents(vae.module, preprocess.to_model_range(images))


def latent_encoder(vae: Frozen, mesh=None) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 images [B, H, W, 3] -> x0 = (VAE latent mean - shift) x scaling_factor [B, h, w, c], jitted.

  With a mesh the VAE weights are replicated on it once.
  """
  if mesh is not None:
    vae = jax.device_put(vae, parallel.replicated(mesh))
  return lambda images: np.asarray(jax.device_get(_encode_latents(vae, jnp.asarray(images, jnp.uint8))))


def class_contexts(text_encoder: Frozen, tokenizer, *, class_names: Sequence[str] | None = None, learned=None,
                   template: str = "a photo of a {}", pooling: str = "eos") -> jax.Array:
  """The UNet conditioning [K, 77, D] of every class.

  Zero-shot: pass `class_names` ("a photo of a {name}"). Few-shot: pass the
  learned tokens (`conditioning.LearnedTokens`), giving "a photo of a <cls-k>".
  """
  from mcti_jax.tokens import conditioning
  if (class_names is None) == (learned is None):
    raise ValueError("pass exactly one of class_names (zero-shot) and learned (learned class tokens)")
  if template.count("{}") != 1:
    raise ValueError(f"template {template!r} must hold exactly one '{{}}' for the class")
  if learned is not None:
    prompts = [template.format(f"<cls-{k}>") for k in range(learned.class_tokens.num_classes)]
  else:
    prompts = [template.format(name) for name in class_names]
  if not prompts:
    raise ValueError("no classes: class_names is empty")
  hidden, _ = conditioning.encode_prompts(text_encoder, tokenizer, prompts, learned, pooling=pooling)
  return hidden
