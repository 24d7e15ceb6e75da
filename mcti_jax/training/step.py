"""One compiled step that trains the tokens of all K classes with one method.

For every class k (vmapped; the class axis sharded over the mesh by
`shard_map`) and every item of its per-class batch: sample a shot, a flip, a
timestep, noise and a template from `fold_in(step_key, k)`; splice the
class's vectors into the prompt; run the frozen text encoder and UNet. That
sampled `Item` goes to the method's `item_terms` (methods/<name>.py), which
returns its loss terms (noise MSE, a regulariser, ...); the method's `loss`
makes class k's loss from their means over its batch.

The step's loss is a SUM over classes. For a per-class method the gradient
of class k's vectors is then its own loss's gradient, whatever K is; AdamW is
elementwise, so classes never interact: K classes together equal K one-class
runs. A cross-class method (`cross_class = True`) also sees every class's
items of the step (their training targets, gathered over the mesh) through
`cross_terms`.

A method that draws its own items (`class_terms`: DCT generates images
instead of noising shots) replaces the shot sampling. A method may keep
per-class state across steps (`class_state`/`next_state`, e.g. early
stopping): a class whose state says it is not "training" gets no update,
in the same compiled step. In a phase with `subspace=True` the state holds
the tokens' coordinates in the span of chosen words (tokens/subspace.py); the
loss sees the vectors they map to, so the gradient is the coordinates'.

With `class_chunk` = c (class_chunks.py) a device runs its classes in passes
of c inside the step (`lax.map`), so its memory is that of c classes for any
K; a cross-class method's targets (its noises: no UNet call) are drawn for
every class before the passes, so each pass still sees every class's items.

On a (classes, data) mesh (runtime/parallel.py) the devices of a class shard each
draw their slice of every class's batch (the same items as on a 1-D mesh);
the terms are averaged over the slices before the loss, and the gradient is
the chain rule through that average, so any loss of the terms' means is exact.

Each step also returns, per class, whether its loss terms or new tokens hold
NaN or inf (metrics["nonfinite"], `nonfinite_codes`): the trainer stops a
diverged run on it, before anything non-finite is saved or exported.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import PartitionSpec as P

from mcti_jax import methods
from mcti_jax.tokens import placeholders as tok
from mcti_jax.methods.protocol import Settings, frozen_settings
from mcti_jax.models import vae as vae_lib
from mcti_jax.models.frozen import Frozen
from mcti_jax.runtime.parallel import CLASS_AXIS, DATA_AXIS


@struct.dataclass
class Backbone:
  """The frozen models one step needs; `clip` only for methods that need it, `parts` the methods' own."""
  text_encoder: Frozen
  unet: Frozen
  schedule: object  # models.schedule.NoiseSchedule, a pytree of arrays
  clip: Frozen | None
  scaling_factor: float = struct.field(pytree_node=False)  # the VAE's: latents = (sample - shift) * scaling
  shift_factor: float | None = struct.field(pytree_node=False, default=None)
  # The phases' methods' own frozen parts by name, from their backbone_parts (DCT: "vae", "classifier", "targets",
  # "uncond_context"); a pytree of pytrees, so a new method's part needs no field here.
  parts: dict[str, Any] = struct.field(default_factory=dict)
  subspace: object = None  # subspace.Subspace: what phases with subspace=True map their coordinates through
  # CLIP's text tower is the text encoder (clip.same_text_tower): a prompt's CLIP text feature is the projection of
  # the text encoder's pooled output (Item.pooled), so the transformer runs once for both.
  text_shared: bool = struct.field(pytree_node=False, default=False)


@struct.dataclass
class ShotData:
  """Cached encodings of the shots. Leading axis: classes, padded to the mesh.

  latent_mean/latent_logvar [Kp, N, F, h, w, c] and class_ids [Kp] are
  sharded on the class axis; image_features [K', N, F, P] and valid [K'] cover
  every class (K' is the padded class count of the whole problem), because
  a method may look at shots of all of them. vector_valid [Kp, V] (class-
  sharded) marks the vectors each class uses (its first V_k); the others
  never reach a prompt and get no update, not even AdamW's weight decay.
  None: all.
  """
  class_ids: jax.Array
  latent_mean: jax.Array
  latent_logvar: jax.Array
  image_features: jax.Array
  valid: jax.Array
  vector_valid: jax.Array | None = None


@struct.dataclass
class TrainState:
  step: jax.Array
  tokens: jax.Array  # [Kp, V, D]
  opt_state: optax.OptState
  key: jax.Array
  class_state: Any = struct.field(default_factory=dict)  # the method's per-class state, leaves [Kp, ...]


@struct.dataclass
class Item:
  """One sampled training item of class k: its prompt, its noised shot, and the UNet's prediction."""
  k: jax.Array  # the class
  vectors: jax.Array  # [V, D] class k's tokens
  ids: jax.Array  # [L] the prompt's token ids
  placeholder_ids: jax.Array  # [V] the ids that `vectors` replace
  pooled: jax.Array  # [D] the text encoder's pooled output of the prompt
  prediction: jax.Array  # the UNet output
  target: jax.Array  # what it should be (noise or v)
  keys: jax.Array  # [2] keys left for the method's own draws


@struct.dataclass
class Context:
  """What a method's `item_terms` (or `class_terms`) may look at besides the item."""
  backbone: Backbone
  image_features: jax.Array  # [K', N, F, P] CLIP image features of every class's shots
  valid: jax.Array  # [K'] False on padded classes
  template_ids: jax.Array  # [T, L] the phase's prompts (class 0's ids), or [K', T, L] per class
  step: jax.Array  # the step's index within its phase
  run_key: jax.Array  # the run's key (the same at every step)
  pooling: str = struct.field(pytree_node=False)
  first_placeholder_id: int = struct.field(pytree_node=False)
  latent_shape: tuple[int, ...] = struct.field(pytree_node=False)  # (h, w, c) of the UNet's latents


@struct.dataclass
class Everyone:
  """Every class's items of the step, gathered over the mesh (cross-class methods)."""
  target: jax.Array  # [K', B, ...]
  class_ids: jax.Array  # [K']
  valid: jax.Array  # [K']


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of a compiled step (a change recompiles)."""
  method: ModuleType  # methods/<name>.py
  settings: tuple[tuple[str, Any], ...]  # the method's settings (methods.phase), compiled in
  first_placeholder_id: int
  num_vectors: int
  num_train_timesteps: int
  pooling: str = "eos"
  batch_per_class: int = 1
  grad_accum: int = 1
  latent_shape: tuple[int, ...] = ()
  subspace: bool = False  # the state holds coordinates in backbone.subspace, not vectors
  data_shards: int = 1  # devices that split a class's batch (the mesh's data axis)
  class_chunk: int = 0  # classes per pass on a device (0: all of its classes in one pass)


def make_optimizer(lr: float, weight_decay: float = 1e-2) -> optax.GradientTransformation:
  """AdamW, elementwise. No global-norm clipping: that would couple the classes."""
  return optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)


def draw_item(key, k, latent_mean, latent_logvar, template_ids, backbone: Backbone, cfg: StepConfig):
  """Class k's draw of one item: a shot, flip, t, noise and template; the noised latent and what the UNet should
  predict. No network runs, so cross-class methods can draw every class's targets before the UNet passes."""
  num_shots, num_flips = latent_mean.shape[:2]
  keys = jax.random.split(key, 8)
  shot = jax.random.randint(keys[0], (), 0, num_shots)
  flip = jax.random.randint(keys[1], (), 0, num_flips)
  mean, logvar = latent_mean[shot, flip], latent_logvar[shot, flip]
  x0 = vae_lib.moments_to_latents(mean, logvar, backbone, keys[2])
  t = jax.random.randint(keys[3], (), 0, cfg.num_train_timesteps)
  noise = jax.random.normal(keys[4], x0.shape)
  x_t = backbone.schedule.add_noise(x0, noise, t)
  target = backbone.schedule.training_target(x0, noise, t)
  class_templates = template_ids[k] if template_ids.ndim == 3 else template_ids
  template = jax.random.randint(keys[5], (), 0, class_templates.shape[0])
  ids = tok.ids_for_class(class_templates[template], cfg.first_placeholder_id, cfg.num_vectors, k)
  return x_t, t, target, ids, keys[6:8]


def sample_item(key, k, vectors, backbone: Backbone, latent_mean, latent_logvar, template_ids,
                cfg: StepConfig) -> Item:
  """Draw one (shot, flip, t, noise, template) of class k and run the frozen text encoder and UNet on it."""
  x_t, t, target, ids, keys = draw_item(key, k, latent_mean, latent_logvar, template_ids, backbone, cfg)
  placeholder_ids = cfg.first_placeholder_id + k * cfg.num_vectors + jnp.arange(cfg.num_vectors)
  text_encoder, unet = backbone.text_encoder.module, backbone.unet.module
  embeds = tok.splice(tok.token_table(text_encoder), ids, placeholder_ids, vectors)
  hidden, pooled = text_encoder(ids[None], inputs_embeds=embeds[None], pooling=cfg.pooling)
  prediction = unet(x_t[None], t[None], hidden)[0]
  return Item(k=k, vectors=vectors, ids=ids, placeholder_ids=placeholder_ids, pooled=pooled[0], prediction=prediction,
              target=target, keys=keys)


def batch_keys(key, cfg: StepConfig) -> jax.Array:
  """The keys of class k's per-class batch (from its key), this device's slice of them on a (classes, data) mesh."""
  keys = jax.random.split(key, cfg.batch_per_class)
  if cfg.data_shards > 1:
    per_device = cfg.batch_per_class // cfg.data_shards
    keys = jax.lax.dynamic_slice_in_dim(keys, jax.lax.axis_index(DATA_AXIS) * per_device, per_device)
  return keys


def class_objective(vectors, k, key, latent_mean, latent_logvar, ctx: Context, settings: Settings, cfg: StepConfig):
  """Class k's terms averaged over its per-class batch, and the batch's items (None for `class_terms` methods)."""
  if methods.capabilities(cfg.method).draws_items:
    return cfg.method.class_terms(vectors, k, key, ctx, settings), None

  def one_item(key):
    item = sample_item(key, k, vectors, ctx.backbone, latent_mean, latent_logvar, ctx.template_ids, cfg)
    return cfg.method.item_terms(item, ctx, settings), item

  terms, items = jax.vmap(one_item)(batch_keys(key, cfg))
  return {name: value.mean() for name, value in terms.items()}, items


def class_targets(key, k, latent_mean, latent_logvar, template_ids, backbone: Backbone, cfg: StepConfig):
  """The training targets of class k's batch (this device's slice), as `class_objective`'s items hold them."""
  draw = lambda key: draw_item(key, k, latent_mean, latent_logvar, template_ids, backbone, cfg)[2]  # noqa: E731
  return jax.vmap(draw)(batch_keys(key, cfg))


def chunk_size(class_chunk: int, num_local: int) -> int:
  """Classes per pass of the step on a device holding `num_local` classes: all of them for 0 (or more)."""
  return num_local if class_chunk <= 0 or class_chunk >= num_local else class_chunk


def _shard_grads(tokens, class_ids, latent_mean, latent_logvar, step_key, backbone, image_features, valid_all,
                 template_ids, phase_step, run_key, cfg: StepConfig):
  """Gradients and per-class terms for the classes of one shard, and metric sums over all shards.

  With cfg.class_chunk = c the shard's classes run in passes of c (`lax.map`): a pass's activations are all that
  is live, so memory does not grow with the classes per device. Each pass takes the gradient of its classes'
  summed loss, which for class k is class k's own, as in one pass. The last pass is filled up with the shard's
  last class, masked out of the loss and dropped.
  """
  settings = Settings(cfg.settings)
  valid = valid_all[class_ids]
  masked_sum = lambda x, mask: jnp.sum(jnp.where(mask, x, 0.0))  # noqa: E731  (padded classes may hold inf)
  method, caps = cfg.method, methods.capabilities(cfg.method)
  ctx = Context(backbone=backbone, image_features=image_features, valid=valid_all, template_ids=template_ids,
                step=phase_step, run_key=run_key, pooling=cfg.pooling, first_placeholder_id=cfg.first_placeholder_id,
                latent_shape=cfg.latent_shape)
  num_local = tokens.shape[0]
  chunk = chunk_size(cfg.class_chunk, num_local)
  num_chunks = -(-num_local // chunk)
  fold = lambda key, ids: jax.vmap(lambda k: jax.random.fold_in(key, k))(ids)  # noqa: E731

  def everyone_of(micro_key) -> Everyone:
    """Every class's training targets of the step over the mesh (cross-class methods): drawn, not predicted."""
    targets = jax.vmap(class_targets, in_axes=(0, 0, 0, 0, None, None, None))(
        fold(micro_key, class_ids), class_ids, latent_mean, latent_logvar, template_ids, backbone, cfg)
    targets = jax.lax.stop_gradient(targets)  # [Kc, B / data_shards, ...]
    if cfg.data_shards > 1:  # every item of the class, in the order of its batch
      targets = jax.lax.all_gather(targets, DATA_AXIS, axis=1, tiled=True)
    gather = lambda x: jax.lax.all_gather(x, CLASS_AXIS, tiled=True)  # noqa: E731
    all_ids = gather(class_ids)
    return Everyone(target=gather(targets), class_ids=all_ids, valid=valid_all[all_ids])

  def pass_terms(tokens, ids, mean, logvar, micro_key, everyone):
    """Per-class terms [c] of some of this shard's classes, over this device's slice of their batches."""
    vectors = backbone.subspace.to_vectors(tokens) if cfg.subspace else tokens
    per_class = jax.vmap(class_objective, in_axes=(0, 0, 0, 0, 0, None, None, None))
    terms, items = per_class(vectors, ids, fold(micro_key, ids), mean, logvar, ctx, settings, cfg)
    if caps.cross_class:
      cross = jax.vmap(method.cross_terms, in_axes=(0, 0, None, None))(items, ids, everyone, settings)
      terms = {**terms, **cross}
    return terms

  def pass_grads(tokens, ids, mean, logvar, mask, micro_key, everyone):
    """One pass: its classes' terms, and the gradient of their summed loss."""
    terms_of = lambda t: pass_terms(t, ids, mean, logvar, micro_key, everyone)  # noqa: E731
    total_loss = lambda terms: masked_sum(jax.vmap(lambda t: method.loss(t, settings))(terms), mask)  # noqa: E731
    if cfg.data_shards == 1:
      def loss_fn(tokens):
        terms = terms_of(tokens)
        return total_loss(terms), terms
      (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(tokens)
      return terms, grads
    # The batch's terms are the mean of the slices'; the loss's gradient flows back through that mean by hand
    # (no differentiation through a collective): d loss / d tokens = mean over slices of (dL/dterms . dterms/dtokens).
    terms, pullback = jax.vjp(terms_of, tokens)
    terms = jax.lax.pmean(terms, DATA_AXIS)
    (grads,) = pullback(jax.grad(total_loss)(terms))
    return terms, jax.lax.pmean(grads, DATA_AXIS)

  def terms_and_grads(micro_key):
    everyone = everyone_of(micro_key) if caps.cross_class else None
    if num_chunks == 1:
      return pass_grads(tokens, class_ids, latent_mean, latent_logvar, valid, micro_key, everyone)

    def one_pass(i):
      slots = i * chunk + jnp.arange(chunk)
      rows = jnp.minimum(slots, num_local - 1)  # the last pass's spare slots repeat the last class, masked
      return pass_grads(tokens[rows], class_ids[rows], latent_mean[rows], latent_logvar[rows],
                        valid[rows] & (slots < num_local), micro_key, everyone)

    terms, grads = jax.lax.map(one_pass, jnp.arange(num_chunks))
    by_class = lambda x: x.reshape(-1, *x.shape[2:])[:num_local]  # noqa: E731  [passes, c, ...] -> [Kc, ...]
    return jax.tree.map(by_class, terms), by_class(grads)

  def micro_step(carry, micro):
    grads, terms = carry
    micro_terms, micro_grads = terms_and_grads(jax.random.fold_in(step_key, micro))
    return (grads + micro_grads, jax.tree.map(jnp.add, terms, micro_terms)), None

  shapes = jax.eval_shape(lambda: terms_and_grads(step_key)[0])
  init = (jnp.zeros_like(tokens), jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes))
  (grads, terms), _ = jax.lax.scan(micro_step, init, jnp.arange(cfg.grad_accum))
  terms = jax.tree.map(lambda t: t / cfg.grad_accum, terms)  # [Kc] per class of this shard
  sums = {name: jax.lax.psum(masked_sum(value, valid), CLASS_AXIS) for name, value in terms.items()}
  return grads / cfg.grad_accum, terms, sums


def train_step(state: TrainState, data: ShotData, backbone: Backbone, template_ids, step_offset=0, phase_start=0, *,
               cfg: StepConfig, optimizer: optax.GradientTransformation, mesh) -> tuple[TrainState, dict]:
  """One AdamW step on every class's tokens. Jit it with the mesh's shardings (see trainer).

  The step's draws use `state.step - step_offset` (traced): a branch (init="initial") draws as a run's first
  phase. `phase_start` is where the phase began (methods with epochs count from it).
  """
  step_key = jax.random.fold_in(state.key, state.step - step_offset)
  phase_step = state.step - phase_start
  shard_grads = jax.shard_map(
      lambda *a: _shard_grads(*a, cfg=cfg), mesh=mesh,
      in_specs=(P(CLASS_AXIS), P(CLASS_AXIS), P(CLASS_AXIS), P(CLASS_AXIS), P(), P(), P(), P(), P(), P(), P()),
      out_specs=(P(CLASS_AXIS), P(CLASS_AXIS), P()), check_vma=False)
  grads, terms, sums = shard_grads(state.tokens, data.class_ids, data.latent_mean, data.latent_logvar, step_key,
                                   backbone, data.image_features, data.valid, template_ids, phase_step, state.key)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.tokens)
  if data.vector_valid is not None:  # a class's unused vectors (past its V_k) stay exactly as they are
    updates = jnp.where(data.vector_valid[..., None], updates, 0.0)
  valid = data.valid[data.class_ids]
  num_valid = jnp.maximum(jnp.sum(valid), 1)
  metrics = {name: total / num_valid for name, total in sums.items()}
  class_state = state.class_state
  if methods.capabilities(cfg.method).stateful:  # per-class state: a class that has stopped gets no update
    training = class_state["training"]
    updates = jnp.where(training[:, None, None], updates, 0.0)
    settings = Settings(cfg.settings)
    stepped = jax.vmap(lambda s, v, t: cfg.method.next_state(s, v, t, phase_step, settings))(
        class_state, state.tokens, terms)
    class_state = jax.tree.map(lambda new, old: jnp.where(_rows(training, new), new, old), stepped, class_state)
    metrics["training"] = jnp.sum(class_state["training"] & valid) / num_valid  # after this step
    metrics["per_class"] = {**terms, "training": class_state["training"].astype(jnp.float32)}
  tokens = optax.apply_updates(state.tokens, updates)
  metrics["nonfinite"] = nonfinite_codes(terms, tokens, valid)
  return state.replace(step=state.step + 1, tokens=tokens, opt_state=opt_state, class_state=class_state), metrics


# Bits of a class's `nonfinite` code: what of its step was NaN or inf.
LOSS_NAN, LOSS_INF, TOKENS_NAN, TOKENS_INF = 1, 2, 4, 8


def nonfinite_codes(terms: dict[str, jax.Array], tokens: jax.Array, valid: jax.Array) -> jax.Array:
  """uint8 [Kp]: per class, which of its loss terms and new tokens hold NaN or inf (0: all finite; padded classes 0).

  One elementwise pass over the tokens and the terms, inside the step: the trainer reads these codes only where it
  syncs anyway (a log row, a save), so that a diverged state is never saved or exported."""
  def code(x, axes, nan_bit, inf_bit):
    return (jnp.where(jnp.isnan(x).any(axes), nan_bit, 0) | jnp.where(jnp.isinf(x).any(axes), inf_bit, 0))
  codes = code(tokens, tuple(range(1, tokens.ndim)), TOKENS_NAN, TOKENS_INF)
  for value in terms.values():
    codes = codes | code(value.reshape(value.shape[0], -1), 1, LOSS_NAN, LOSS_INF)
  return jnp.where(valid, codes, 0).astype(jnp.uint8)


def init_class_state(method, tokens, settings: dict):
  """The method's per-class state for a phase on `tokens` [Kp, V, D] ({} for methods without one)."""
  if not methods.capabilities(method).stateful:
    return {}
  cfg = Settings(frozen_settings(settings))
  state = jax.vmap(lambda v: method.class_state(v, cfg))(tokens)
  return jax.tree.map(jnp.copy, state)  # own buffers: the step donates the state (tokens included)


def final_tokens(method, class_state, tokens):
  """The tokens a phase ends with: the method's choice (DCT: each class's best) or the last ones."""
  if not methods.capabilities(method).stateful:
    return tokens
  return jax.vmap(method.final_vectors)(class_state, tokens)


def _rows(mask, x):
  """mask [K] broadcast over the trailing axes of x [K, ...]."""
  return mask.reshape(mask.shape + (1,) * (x.ndim - 1))
