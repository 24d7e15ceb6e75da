"""One compiled step that trains the tokens of all K classes.

For every class k (vmapped; the class axis sharded over the mesh by
`shard_map`) and every item of its per-class batch: sample a shot, a flip, a
timestep, noise and a template from `fold_in(step_key, k)`; splice the
class's vectors into the prompt; run the frozen text encoder and UNet; take
the noise-prediction MSE (TI). In the MC-TI phase also take the projected
CLIP text feature of the same prompt and the cached CLIP image features of
one random shot of every class, and the cross-entropy of s*cos with target k.

The loss is a SUM over classes, so the gradient of class k's vectors is its
own loss's gradient, whatever K is; AdamW is elementwise, so classes never
interact: training K classes together equals K one-class runs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import PartitionSpec as P

from mcti_jax import tokens as tok
from mcti_jax.methods import mcti, ti
from mcti_jax.models.frozen import Frozen
from mcti_jax.parallel import CLASS_AXIS


@struct.dataclass
class Backbone:
  """The frozen models one step needs. `clip` (text tower + projection) only for MC-TI."""
  text_encoder: Frozen
  unet: Frozen
  schedule: object  # models.schedule.NoiseSchedule, a pytree of arrays
  clip: Frozen | None
  scaling_factor: float = struct.field(pytree_node=False)


@struct.dataclass
class ShotData:
  """Cached encodings of the shots. Leading axis: classes, padded to the mesh.

  latent_mean/latent_logvar [Kp, N, F, h, w, c] and class_ids [Kp] are
  sharded on the class axis; image_features [K', N, F, P] and valid [K'] cover
  every class (K' is the padded class count of the whole problem), because
  the regulariser of one class looks at shots of all of them.
  """
  class_ids: jax.Array
  latent_mean: jax.Array
  latent_logvar: jax.Array
  image_features: jax.Array
  valid: jax.Array


@struct.dataclass
class TrainState:
  step: jax.Array
  tokens: jax.Array  # [Kp, V, D]
  opt_state: optax.OptState
  key: jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of a compiled step (a change recompiles)."""
  first_placeholder_id: int
  num_vectors: int
  num_train_timesteps: int
  alpha: float = 1.0
  beta: float = 0.0  # 0 in the TI warm-up phase; the regulariser is then not even traced
  scale: float = 10.0
  pooling: str = "eos"
  batch_per_class: int = 1
  grad_accum: int = 1


def make_optimizer(lr: float, weight_decay: float = 1e-2) -> optax.GradientTransformation:
  """AdamW, elementwise. No global-norm clipping: that would couple the classes."""
  return optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)


def _text_table(text_module):
  return text_module.text_model.embeddings.token_embedding.embedding[...]


def class_objective(vectors, k, key, backbone: Backbone, latent_mean, latent_logvar, image_features_all,
                    valid, template_ids, cfg: StepConfig):
  """(mse, reg, correct) of class k averaged over its per-class batch."""
  num_shots, num_flips = latent_mean.shape[:2]
  placeholder_ids = cfg.first_placeholder_id + k * cfg.num_vectors + jnp.arange(cfg.num_vectors)
  text_encoder, unet = backbone.text_encoder.module, backbone.unet.module

  def one_item(key):
    keys = jax.random.split(key, 8)
    shot = jax.random.randint(keys[0], (), 0, num_shots)
    flip = jax.random.randint(keys[1], (), 0, num_flips)
    mean, logvar = latent_mean[shot, flip], latent_logvar[shot, flip]
    x0 = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(keys[2], mean.shape)) * backbone.scaling_factor
    t = jax.random.randint(keys[3], (), 0, cfg.num_train_timesteps)
    noise = jax.random.normal(keys[4], x0.shape)
    x_t = backbone.schedule.add_noise(x0, noise, t)
    target = backbone.schedule.training_target(x0, noise, t)
    template = jax.random.randint(keys[5], (), 0, template_ids.shape[0])
    ids = tok.ids_for_class(template_ids[template], cfg.first_placeholder_id, cfg.num_vectors, k)

    embeds = tok.splice(_text_table(text_encoder), ids, placeholder_ids, vectors)
    hidden, _ = text_encoder(ids[None], inputs_embeds=embeds[None], pooling=cfg.pooling)
    prediction = unet(x_t[None], t[None], hidden)[0]
    mse = ti.noise_loss(prediction, target)
    if cfg.beta == 0:
      return mse, jnp.zeros(()), jnp.zeros(())

    clip = backbone.clip.module
    clip_embeds = tok.splice(_text_table(clip), ids, placeholder_ids, vectors)
    text_feature = clip.get_text_features(ids[None], inputs_embeds=clip_embeds[None], pooling=cfg.pooling)[0]
    # One shot (and flip) of every class j, drawn from fold_in(key, j): the draw of a real class does
    # not depend on how many padded classes follow it.
    num_all, shots_each, flips_each = image_features_all.shape[:3]
    draw = lambda key, n: jax.vmap(lambda j: jax.random.randint(jax.random.fold_in(key, j), (), 0, n))(  # noqa: E731
        jnp.arange(num_all))
    image_features = image_features_all[jnp.arange(num_all), draw(keys[6], shots_each), draw(keys[7], flips_each)]
    reg, correct = mcti.reg_loss(text_feature, image_features, k, valid, cfg.scale)
    return mse, reg, correct

  mse, reg, correct = jax.vmap(one_item)(jax.random.split(key, cfg.batch_per_class))
  return mse.mean(), reg.mean(), correct.mean()


def _shard_grads(tokens, class_ids, latent_mean, latent_logvar, step_key, backbone, image_features, valid_all,
                 template_ids, cfg: StepConfig):
  """Gradients for the classes of one shard, and metric sums over all shards."""
  valid = valid_all[class_ids]
  masked_sum = lambda x: jnp.sum(jnp.where(valid, x, 0.0))  # noqa: E731  (padded classes may hold inf)

  def loss_fn(tokens, micro_key):
    keys = jax.vmap(lambda k: jax.random.fold_in(micro_key, k))(class_ids)
    per_class = jax.vmap(class_objective, in_axes=(0, 0, 0, None, 0, 0, None, None, None, None))
    mse, reg, correct = per_class(tokens, class_ids, keys, backbone, latent_mean, latent_logvar, image_features,
                                  valid_all, template_ids, cfg)
    loss = masked_sum(cfg.alpha * mse + cfg.beta * reg)
    return loss, jnp.stack([masked_sum(mse), masked_sum(reg), masked_sum(correct)])

  def micro_step(grads_and_sums, micro):
    grads, sums = grads_and_sums
    (_, micro_sums), micro_grads = jax.value_and_grad(loss_fn, has_aux=True)(tokens, jax.random.fold_in(step_key, micro))
    return (grads + micro_grads, sums + micro_sums), None

  init = (jnp.zeros_like(tokens), jnp.zeros((3,), jnp.float32))
  (grads, sums), _ = jax.lax.scan(micro_step, init, jnp.arange(cfg.grad_accum))
  sums = jax.lax.psum(sums, CLASS_AXIS) / cfg.grad_accum
  return grads / cfg.grad_accum, sums


def train_step(state: TrainState, data: ShotData, backbone: Backbone, template_ids, *, cfg: StepConfig,
               optimizer: optax.GradientTransformation, mesh) -> tuple[TrainState, dict]:
  """One AdamW step on every class's tokens. Jit it with the mesh's shardings (see trainer)."""
  step_key = jax.random.fold_in(state.key, state.step)
  shard_grads = jax.shard_map(
      lambda *a: _shard_grads(*a, cfg=cfg), mesh=mesh,
      in_specs=(P(CLASS_AXIS), P(CLASS_AXIS), P(CLASS_AXIS), P(CLASS_AXIS), P(), P(), P(), P(), P()),
      out_specs=(P(CLASS_AXIS), P()), check_vma=False)
  grads, sums = shard_grads(state.tokens, data.class_ids, data.latent_mean, data.latent_logvar, step_key,
                            backbone, data.image_features, data.valid, template_ids)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.tokens)
  tokens = optax.apply_updates(state.tokens, updates)
  num_valid = jnp.maximum(jnp.sum(data.valid[data.class_ids]), 1)
  metrics = {"mse": sums[0] / num_valid, "reg": sums[1] / num_valid, "reg_acc": sums[2] / num_valid}
  return state.replace(step=state.step + 1, tokens=tokens, opt_state=opt_state), metrics
