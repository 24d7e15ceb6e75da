"""A run's setup: the config and data checked, then the models loaded and the shots encoded.

  setup = prepare(config)          # everything a run needs, prepared once (Setup)
  backbone = make_backbone(setup)  # the frozen models the compiled step takes

Everything that can be wrong with the input (config values, data, paths,
class counts, a workdir holding another run) is checked before the models
load, so that no bad input waits minutes for Stable Diffusion.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mcti_jax.training import class_chunks, config_checks, phases, runs, token_init
from mcti_jax.runtime import parallel
from mcti_jax.tokens import subspace
from mcti_jax import paths
from mcti_jax import data as D
from mcti_jax.errors import ConfigError
from mcti_jax.tokens import placeholders as tok
from mcti_jax.methods.protocol import Loaded
from mcti_jax.models import clip as clip_lib
from mcti_jax.models import hf_io, pipeline
from mcti_jax.models.frozen import freeze
from mcti_jax.training.step import Backbone, ShotData


# ------------------------------------------------------------------ data


def make_encoder(sd: pipeline.StableDiffusion, clip_model: clip_lib.CLIPModel | None) -> Callable:
  """uint8 images [B, H, W, 3] -> VAE latent moments and (if CLIP is given) CLIP image features."""
  vae = freeze(sd.vae)
  clip_frozen = freeze(clip_model) if clip_model is not None else None

  @jax.jit
  def encode(images):
    mean, logvar = vae.module.encode(D.to_model_range(images))
    out = {"latent_mean": mean, "latent_logvar": logvar}
    if clip_frozen is not None:
      out["image_features"] = clip_lib.image_features(clip_frozen.module, images)
    return out

  return lambda images: jax.device_get(encode(images))


# ------------------------------------------------------------------ setup


@dataclasses.dataclass
class Setup:
  """Everything a run needs, prepared once."""
  config: ml_collections.ConfigDict
  plan: list[phases.Phase]  # the phases that train, in order
  mesh: jax.sharding.Mesh
  sd: pipeline.StableDiffusion
  clip: clip_lib.CLIPModel | None
  class_names: list[str]
  class_tokens: tok.ClassTokens
  template_ids: dict[str, np.ndarray]  # per phase: [T, L] prompt ids of its templates ([K', T, L] per class, with
                                       # "{name}" or when classes use different numbers of vectors)
  shots: D.FewShot | None  # this process's classes' shots (all, with one process), read on demand; None when no phase
                           # trains on shots
  shot_positions: np.ndarray | None  # [K, N] every class's shots' positions in the source
  shots_manifest: dict[str, Any] | None  # which images every class's shots are (export manifests record it)
  data: ShotData
  classifier: Any  # guides.Classifier, for methods that need one; else None
  targets: np.ndarray | None  # [K] class k's class in the classifier
  init_tokens: jax.Array  # [Kp, V, D], class-sharded
  signature: dict[str, Any]  # what run.json records (runs.signature)
  subspace: subspace.Subspace | None = None  # the span of tokens.subspace_words, where a phase trains in it

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def num_padded(self) -> int:
    return self.init_tokens.shape[0]


def _check_output_folders(config: ml_collections.ConfigDict, plan: list[phases.Phase]) -> None:
  """The workdir and the shots' cache must be folders we can create and write: found now, not after the models
  loaded or the tokens trained."""
  paths.output_folder(config.workdir, "config.workdir")
  if any(p.caps.uses_shots for p in plan):  # a run without shots never touches the cache
    paths.output_folder(config.data.cache_dir, "data.cache_dir")


def prepare(config: ml_collections.ConfigDict, log: Callable[[str], None] = print,
            check_signature: Callable[[dict[str, Any]], None] | None = None) -> Setup:
  """Check the config and data, then load the models and encode the shots.

  `check_signature` sees the run's signature before the models load (the trainer refuses a workdir of another
  run there), so that no bad input waits minutes for Stable Diffusion.
  """
  config_checks.check_train_config(config)
  plan = phases.plan(config)
  _check_output_folders(config, plan)
  mesh = parallel.make_mesh(config.num_devices, data=config.mesh.data)
  if config.class_chunk == class_chunks.AUTO and class_chunks.device_memory(mesh.local_devices) is None:
    raise ConfigError(f"config.class_chunk='auto' fits the classes per pass to the device's memory, but the "
                      f"{mesh.devices.flat[0].platform} backend does not report it; set --config.class_chunk=N, "
                      "a number of classes per pass (memory grows with N; 0 runs all of a device's classes at once)")
  if config.mesh.data > 1 and (draws := [p.name for p in plan if p.caps.draws_items]):
    raise ConfigError(f"mesh.data={config.mesh.data} splits a class's per-class batch of shots, but phase(s) "
                      f"{draws} draw their own images instead; train them with mesh.data=1")
  needs = {need for p in plan for need in p.caps.needs}
  needs_clip, uses_shots = "clip" in needs, any(p.caps.uses_shots for p in plan)
  classifier = targets = None
  if "classifier" in needs:  # small next to SD: loaded first, so that a bad classifier fails at once
    classifier, targets = _load_classifier(config, plan)

  labeled = D.load_labeled(config.data, "train") if uses_shots else None
  num_classes = D.num_classes_of(labeled, config.data) if uses_shots else len(targets)
  if targets is not None and len(targets) != num_classes:
    raise ConfigError(f"classifier.targets gives {len(targets)} classes, but the data has {num_classes}: give one "
                      "target class (an index into the classifier's classes) per class of the data")
  class_names = _class_names(config, labeled, num_classes, classifier, targets)
  num_padded = parallel.padded_num_classes(num_classes, mesh)
  local = parallel.local_classes(mesh, num_padded)
  local_real = local[local < num_classes]
  replicate = jax.jit(lambda x: x, out_shardings=parallel.replicated(mesh))

  def sharded(local_rows: np.ndarray) -> jax.Array:
    return parallel.shard_by_class(parallel.pad_rows(local_rows, len(local)), mesh, num_padded)

  # A label is CLIP's zero-shot pick on the shots, unless tokens.label_classifier names them.
  label_classifier = token_init.load_label_classifier(config) if config.tokens.init == "label" else None
  loads_clip = needs_clip or (config.tokens.init == "label" and label_classifier is None)
  shots, data_fingerprint, shot_positions, shots_manifest, cache_key, cache_digests = (None,) * 6
  if uses_shots:
    # References only: the pixels are read a chunk of classes at a time, here to hash them and after the models
    # load to encode the classes missing from the cache, so host memory is flat in K.
    shots = D.sample_few_shot(labeled, config.data.n_shots, config.data.shot_seed, class_indices=local_real,
                              resolution=config.data.resolution, load=False)
    everyone = np.arange(num_classes)  # named, not loaded: each process loads only its own classes' images
    shot_positions = D.choose_shots(labeled, config.data.n_shots, config.data.shot_seed, everyone)
    shots_manifest = D.shots_manifest(labeled, shot_positions, config.data.shot_seed, everyone)
    cache_key = {"sd": runs.fingerprint(config.model.sd_path), **_variant_key(config),
                 "clip": runs.fingerprint(config.model.clip_path) if loads_clip else None,
                 "dtype": config.model.dtype, "source": labeled.source, "resolution": config.data.resolution}
    local_digests, cache_digests = _hash_shots(shots, cache_key, config.data.flip)
    digests = np.asarray(replicate(sharded(local_digests)))[:num_classes]  # gathered: every process's classes
    data_fingerprint = runs.data_fingerprint(digests)
  log(f"{num_classes} classes" + (f" x {config.data.n_shots} shots at {config.data.resolution}px" if uses_shots
                                  else " (no shots: generations judged by the classifier)")
      + f" on {mesh.devices.size} device(s){_mesh_text(mesh)} ({num_padded - num_classes} padded classes)")
  captions = _check_token_init(config, plan, class_names, uses_shots)
  signature = runs.signature(config, num_classes=num_classes, data=data_fingerprint,
                             sd=runs.weights_fingerprint(config.model.sd_path),
                             clip=runs.weights_fingerprint(config.model.clip_path) if loads_clip else None,
                             classifier=_classifier_fingerprint(config) if classifier is not None else None,
                             captions=captions)
  if check_signature is not None:
    check_signature(signature)
  in_subspace = any(p.settings.subspace for p in plan)
  if in_subspace:  # bad words fail here, before the models load
    from mcti_jax.models import tokenizer as tokenizer_lib
    words_tokenizer = tokenizer_lib.load_tokenizer(config.model.sd_path, "tokenizer")
    subspace.word_ids(words_tokenizer, tuple(config.tokens.subspace_words), len(words_tokenizer))

  # Both found (or downloaded) before either loads: a wrong CLIP path must not wait for Stable Diffusion.
  sd_folder = hf_io.resolve_folder(config.model.sd_path, variant=config.model.get("variant"))
  clip_folder = hf_io.resolve_folder(config.model.clip_path) if loads_clip else None
  log(f"loading Stable Diffusion from {config.model.sd_path}")
  sd = pipeline.load_stable_diffusion(sd_folder, dtype=config.model.dtype, remat=config.model.remat,
                                      variant=config.model.get("variant"))
  clip_model = None
  if loads_clip:
    log(f"loading CLIP from {config.model.clip_path}")
    clip_model, clip_tokenizer = pipeline.load_clip(clip_folder, dtype=config.model.dtype)
    if needs_clip:
      _check_same_token_space(sd, clip_model, clip_tokenizer)

  if uses_shots:  # reads again only the shots of classes missing from the cache
    encoded = D.encode_by_class(shots, make_encoder(sd, clip_model), config.data.cache_dir, cache_key,
                                flip=config.data.flip, digests=cache_digests, note={"process": jax.process_index()})
    if not config.data.flip:  # a flip axis of size 1 keeps one code path
      encoded = {k: v[:, :, None] for k, v in encoded.items()}
  else:  # nothing to encode; the step's shot arguments are placeholders
    encoded = {"latent_mean": np.zeros((len(local_real), 1), np.float32),
               "latent_logvar": np.zeros((len(local_real), 1), np.float32)}
  features = replicate(sharded(encoded["image_features"])) if loads_clip else jnp.zeros((num_padded, 1, 1, 1))
  texts = captions
  if config.tokens.init == "label":  # every class's shots, also those of another process's classes
    all_shots = (D.sample_few_shot(labeled, config.data.n_shots, config.data.shot_seed, np.arange(num_classes),
                                   resolution=config.data.resolution, load=False)
                 if label_classifier is not None else None)
    texts, _ = token_init.class_labels(
        config, num_classes, shots=all_shots, classifier=label_classifier,
        clip=clip_model, clip_tokenizer=clip_tokenizer if loads_clip else None,
        shot_features=np.asarray(features)[:num_classes, :, 0] if loads_clip else None)
    log("labels: " + ", ".join(f"{name}: {label}" for name, label in zip(class_names, texts)))
  if not needs_clip:  # loaded for the labels only: the step need not carry it
    clip_model, features = None, jnp.zeros((num_padded, 1, 1, 1))
  start = token_init.initial_tokens(config, sd.tokenizer, tok.token_table(sd.text_encoder), num_classes, texts,
                                    seed=config.seed + 1)
  token_init.check_room(sd.tokenizer, start.counts, start.texts, {p.name: templates_of(config, p) for p in plan},
                        class_names)
  class_tokens = tok.add_class_tokens(sd.tokenizer, num_classes, int(start.counts.max()), start.counts, start.texts)
  data = ShotData(class_ids=parallel.shard_by_class(local.astype(np.int32), mesh, num_padded),
                  latent_mean=sharded(encoded["latent_mean"]), latent_logvar=sharded(encoded["latent_logvar"]),
                  image_features=features,
                  valid=jax.device_put(np.arange(num_padded) < num_classes, parallel.replicated(mesh)),
                  vector_valid=sharded(class_tokens.vector_valid[local_real]))
  template_ids = {p.name: _template_ids(sd.tokenizer, templates_of(config, p), class_tokens, class_names, num_padded)
                  for p in plan}
  init = start.vectors
  init_tokens = parallel.shard_by_class(parallel.pad_rows(init, num_padded)[local], mesh, num_padded)
  span = (subspace.from_words(sd.tokenizer, tok.token_table(sd.text_encoder), tuple(config.tokens.subspace_words))
          if in_subspace else None)
  return Setup(config, plan, mesh, sd, clip_model, class_names, class_tokens, template_ids, shots, shot_positions,
               shots_manifest, data, classifier, targets, init_tokens, signature, span)


def _variant_key(config) -> dict[str, str]:
  """{"variant": "fp16"} when model.variant is set (fp16 weights encode slightly other latents); {} keeps the
  cache keys of full-precision runs as they were."""
  variant = config.model.get("variant")
  return {"variant": variant} if variant else {}


def _hash_shots(shots: D.FewShot, cache_key: dict[str, Any], flip: bool) -> tuple[np.ndarray, list[str]]:
  """Per class, reading a chunk of classes at a time: the run's shot digests (runs.shot_digests, uint8 [K, 32]) and
  its encoding cache entries' (D.class_digest)."""
  run_rows, cache_rows = [np.zeros((0, 32), np.uint8)], []
  for rows, pixels in shots.chunks():
    run_rows.append(runs.shot_digests([shots.class_names[r] for r in rows], [shots.shot_ids[r] for r in rows],
                                      pixels))
    cache_rows += [D.class_digest(cache_key, flip, shots.shot_ids[r], p) for r, p in zip(rows, pixels)]
  return np.concatenate(run_rows), cache_rows


def _mesh_text(mesh) -> str:
  shape = dict(mesh.shape)
  return "" if len(shape) == 1 else " as a mesh " + " x ".join(f"{n} {axis}" for axis, n in shape.items())


def templates_of(config, phase: phases.Phase) -> tuple[str, ...]:
  """A phase's prompt templates: its own, else config.templates; "dataset" is the preset's data.template."""
  spec = phase.settings.templates or config.templates
  return tok.templates(config.data.template if spec == "dataset" else spec)


def _template_ids(tokenizer, templates: tuple[str, ...], class_tokens, class_names, num_padded: int) -> np.ndarray:
  """[T, L] ids of the templates (filled with class 0); [K', T, L] when they hold "{name}" (the class's name) or
  when classes use different numbers of vectors (row k holds class k's V_k placeholders)."""
  if not any("{name}" in t for t in templates):
    ids = tok.template_ids(tokenizer, templates, class_tokens)
    return ids if ids.ndim == 2 else parallel.pad_rows(ids, num_padded)  # padded classes: any prompts
  rows = [k if k < len(class_names) else 0 for k in range(num_padded)]  # padded classes: any words
  return np.stack([tok.class_template_ids(tokenizer, tuple(t.replace("{name}", class_names[k]) for t in templates),
                                          class_tokens, k) for k in rows])


def _load_classifier(config, plan) -> tuple[Any, np.ndarray]:
  """The config's classifier and the target class of each class (all of the classifier's when unset)."""
  from mcti_jax import guides
  spec = config.classifier
  users = ", ".join(p.name for p in plan if "classifier" in p.caps.needs)
  if not spec.type:
    raise ConfigError(f"phase(s) {users} learn from a classifier, but config.classifier.type is unset: set it to "
                      f"file, clip_zeroshot or clip_tokens with its path (see `mcti train --config dct --help`)")
  required, optional = guides.TYPES.get(spec.type, ((), ()))
  classifier = guides.load({k: spec[k] for k in ("type", *required, *optional) if spec.get(k) is not None})
  count = classifier.num_classes
  targets = np.arange(count) if spec.targets is None else np.asarray(spec.targets)
  if targets.ndim != 1 or not len(targets) or not np.issubdtype(targets.dtype, np.integer):
    raise ConfigError(f"config.classifier.targets={spec.targets!r} must be a tuple of class indices")
  bad = [int(t) for t in targets if not 0 <= t < count]
  if bad:
    raise ConfigError(f"config.classifier.targets holds {bad}, out of range: the classifier has {count} classes "
                      f"(0..{count - 1}: {', '.join(classifier.class_names[:5])}, ...)")
  seen = {}
  for position, t in enumerate(targets.tolist()):
    if t in seen:  # two tokens for one class: the same concept twice, and a name that can't tell them apart
      raise ConfigError(f"config.classifier.targets={tuple(targets.tolist())} names class {t} "
                        f"({classifier.class_names[t]}) twice (positions {seen[t]} and {position}): each token is "
                        "learned for one class of the classifier; for several tokens of one class, train with "
                        "different seeds")
    seen[t] = position
  return classifier, targets.astype(np.int32)


def _classifier_fingerprint(config) -> str:
  spec = config.classifier
  paths = [spec.get(k) for k in ("path", "clip_path", "export") if spec.get(k)]
  return ",".join(runs.weights_fingerprint(p) for p in paths)


def _class_names(config, labeled: D.LabeledImages | None, num_classes: int, classifier=None, targets=None
                 ) -> list[str]:
  """The K class names (data.class_names, the source's, or the classifier's); checks tokens.init_texts' count."""
  if labeled is None:  # tokens learned from a classifier alone: class k is the classifier's class targets[k]
    names = tuple(classifier.class_names[t] for t in targets)
    given = tuple(config.data.class_names or ())
    if given and given[:num_classes] != names:
      raise ConfigError(f"data.class_names={given} would name the tokens, but they are learned for the classifier's "
                        f"classes at classifier.targets, {names}: their names; drop data.class_names")
  else:
    names = tuple(config.data.class_names or labeled.class_names)
  if len(names) < num_classes:
    raise ConfigError(f"data.class_names gives {len(names)} names for {num_classes} classes")
  if config.tokens.init == "texts" and len(config.tokens.init_texts or ()) != num_classes:
    raise ConfigError(f"tokens.init='texts' needs one text per class: got {len(config.tokens.init_texts or ())} "
                      f"for {num_classes} classes")
  return list(names[:num_classes])


def _check_same_token_space(sd, clip_model, clip_tokenizer) -> None:
  sd_width, clip_width = sd.text_width, clip_model.config.text_config.hidden_size
  if sd_width != clip_width:
    raise hf_io.CheckpointError(
        f"a method that uses CLIP splices each class token into both the SD text encoder ({sd_width}-wide) and the "
        f"CLIP text tower ({clip_width}-wide); they must share one token space (SD 1.x with CLIP ViT-L/14).")
  if len(clip_tokenizer) != len(sd.tokenizer):
    raise hf_io.CheckpointError(
        f"the SD tokenizer ({len(sd.tokenizer)} tokens) and the CLIP tokenizer ({len(clip_tokenizer)}) differ; "
        "a method that uses CLIP needs the same vocabulary for both text towers.")


def _check_token_init(config, plan, class_names, uses_shots: bool) -> list[str] | None:
  """What can be wrong with the token init, found before the models load; the captions when init="caption"."""
  init, num_classes = config.tokens.init, len(class_names)
  token_init.vector_counts(config, num_classes)
  if init == "label":
    if not uses_shots:
      raise ConfigError(f"tokens.init='label' labels each class's shots, but phases {[p.name for p in plan]} train on "
                        "no shots; use tokens.init='word' or 'caption'")
    token_init.check_label_source(config)
  if init != "caption":
    return None
  captions = token_init.read_captions(config.tokens.caption_file, num_classes,
                                      config.data.n_shots if uses_shots else 1)
  from mcti_jax.models import tokenizer as tokenizer_lib
  tokenizer = tokenizer_lib.load_tokenizer(config.model.sd_path, "tokenizer")
  counts = np.asarray([len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in captions], np.int32)
  if np.any(counts == 0):
    k = int(np.argmin(counts))
    raise ConfigError(f"the caption of class {k} ({class_names[k]}), {captions[k]!r}, has no tokens")
  token_init.check_room(tokenizer, counts, captions, {p.name: templates_of(config, p) for p in plan}, class_names)
  return captions


def make_backbone(setup: Setup) -> Backbone:
  """The frozen models of the step: SD's, CLIP where a method needs it, and the methods' own parts."""
  sd = setup.sd
  text_encoder = freeze(sd.text_encoder)
  targets = (jnp.asarray(parallel.pad_rows(setup.targets, setup.num_padded)) if setup.targets is not None
             else None)
  loaded = Loaded(sd=sd, text_encoder=text_encoder, classifier=setup.classifier, targets=targets)
  parts = {}
  for method in dict.fromkeys(p.method for p in setup.plan if p.caps.builds_parts):  # each method once
    parts.update(method.backbone_parts(loaded))
  extra = {"parts": parts}
  if setup.subspace is not None:
    extra.update(subspace=setup.subspace)
  if setup.clip is not None:  # SD 1.x with CLIP ViT-L/14: one text transformer pass gives both features
    extra.update(text_shared=clip_lib.same_text_tower(sd.text_encoder, setup.clip))
  return Backbone(text_encoder=text_encoder, unet=freeze(sd.unet), schedule=sd.schedule,
                  clip=freeze(setup.clip) if setup.clip is not None else None, scaling_factor=sd.scaling_factor,
                  shift_factor=sd.vae.config.shift_factor, **extra)
