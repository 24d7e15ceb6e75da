"""The trainer: few shots -> cached encodings -> one compiled step per phase for all K classes -> export.

  result = train(config)   # config from configs/mcti.py

The run is `config.phases` in order (phases.py); each phase trains with its
method's loss (methods/<name>.py), a fresh AdamW state, and exports its tokens
to export/<phase>/. The trainer knows no method: what a phase needs (CLIP,
say) comes from its method module. The randomness of step s for class k is
fold_in(fold_in(key, s), k), so a resumed run, a run on another device count,
and a one-class run all see the same samples as an uninterrupted K-class run.

Everything that can be wrong with the input (config values, data, paths,
class counts, a workdir holding another run) is checked before the models
load. SIGINT or SIGTERM stops the run at the next step boundary, after saving
a checkpoint; the same command resumes it. A step whose loss or tokens turn NaN
or inf (a diverged run) stops it with one line naming the phase, the step and
the class; nothing non-finite is ever saved or exported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mcti_jax.training import class_chunks, config_checks, phases, runs, token_init
from mcti_jax.runtime import distributed, parallel
from mcti_jax.tokens import export, subspace
from mcti_jax.generation import generate
from mcti_jax import paths, plots
from mcti_jax import data as D
from mcti_jax.errors import ConfigError, MctiError
from mcti_jax.tokens import placeholders as tok
from mcti_jax.methods.protocol import Loaded
from mcti_jax.models import clip as clip_lib
from mcti_jax.models import hf_io, pipeline
from mcti_jax.models.frozen import freeze
from mcti_jax.runtime.stopping import StopOnSignal
from mcti_jax.training.step import (Backbone, ShotData, StepConfig, TrainState, final_tokens, frozen_settings,
                                    init_class_state, make_optimizer, train_step)
from mcti_jax.training.step import LOSS_INF, LOSS_NAN, TOKENS_INF, TOKENS_NAN


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
  classifier: Any  # classifiers.Classifier, for methods that need one; else None
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

  loads_clip = needs_clip or config.tokens.init == "label"  # a label is CLIP's zero-shot pick on the shots
  shots, data_fingerprint, shot_positions, shots_manifest, cache_key, cache_digests = (None,) * 6
  if uses_shots:
    # References only: the pixels are read a chunk of classes at a time, here to hash them and after the models
    # load to encode the classes missing from the cache, so host memory is flat in K.
    shots = D.sample_few_shot(labeled, config.data.n_shots, config.data.shot_seed, class_indices=local_real,
                              resolution=config.data.resolution, load=False)
    everyone = np.arange(num_classes)  # named, not loaded: each process loads only its own classes' images
    shot_positions = D.choose_shots(labeled, config.data.n_shots, config.data.shot_seed, everyone)
    shots_manifest = D.shots_manifest(labeled, shot_positions, config.data.shot_seed, everyone)
    cache_key = {"sd": runs.fingerprint(config.model.sd_path),
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
  sd_folder = hf_io.resolve_folder(config.model.sd_path)
  clip_folder = hf_io.resolve_folder(config.model.clip_path) if loads_clip else None
  log(f"loading Stable Diffusion from {config.model.sd_path}")
  sd = pipeline.load_stable_diffusion(sd_folder, dtype=config.model.dtype, remat=config.model.remat)
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
  if config.tokens.init == "label":
    texts, _ = token_init.clip_labels(clip_model, clip_tokenizer, np.asarray(features)[:num_classes, :, 0],
                                      config.tokens.label_words, config.tokens.label_template)
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
  from mcti_jax import classifiers
  spec = config.classifier
  users = ", ".join(p.name for p in plan if "classifier" in p.caps.needs)
  if not spec.type:
    raise ConfigError(f"phase(s) {users} learn from a classifier, but config.classifier.type is unset: set it to "
                      f"file, clip_zeroshot or clip_tokens with its path (see configs/dct.py and the README)")
  required, optional = classifiers.TYPES.get(spec.type, ((), ()))
  classifier = classifiers.load({k: spec[k] for k in ("type", *required, *optional) if spec.get(k) is not None})
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
    if not config.tokens.label_words:
      raise ConfigError("tokens.init='label' needs tokens.label_words: the words CLIP chooses each class's label from "
                        "(e.g. the dataset's class names, or candidate words)")
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


def step_config(setup: Setup, phase: phases.Phase, class_chunk: int = 0) -> StepConfig:
  c = setup.config
  return StepConfig(method=phase.method, settings=frozen_settings(phase.method_settings),
                    first_placeholder_id=int(setup.class_tokens.ids[0, 0]), num_vectors=setup.class_tokens.num_vectors,
                    num_train_timesteps=int(setup.sd.schedule.num_train_timesteps), pooling=c.model.pooling,
                    batch_per_class=c.batch_per_class, grad_accum=c.grad_accum,
                    latent_shape=generate.latent_shape(setup.sd), subspace=phase.settings.subspace,
                    data_shards=parallel.data_size(setup.mesh), class_chunk=class_chunk)


def compile_step(setup: Setup, phase: phases.Phase, optimizer, state: TrainState, backbone: Backbone, template_ids,
                 clock, class_chunk: int = 0) -> jax.stages.Compiled:
  """The phase's training step, compiled for `state` (its structure and shardings); it donates the state."""
  return jax.jit(
      functools.partial(train_step, cfg=step_config(setup, phase, class_chunk), optimizer=optimizer, mesh=setup.mesh),
      donate_argnums=(0,), out_shardings=(_state_shardings(state, setup), parallel.replicated(setup.mesh))
  ).lower(state, setup.data, backbone, template_ids, *clock).compile()


def compile_chunked_step(setup: Setup, phase: phases.Phase, optimizer, state: TrainState, backbone: Backbone,
                         template_ids, clock, log) -> jax.stages.Compiled:
  """compile_step at config.class_chunk; for "auto", at the largest chunk that fits the device (class_chunks.py)."""
  chunk = setup.config.class_chunk
  compile_at = lambda c: compile_step(setup, phase, optimizer, state, backbone, template_ids, clock, c)  # noqa: E731
  if chunk != class_chunks.AUTO:
    return compile_at(chunk)
  mib = 2**20  # one program on every host: the smallest device's memory, gathered in MiB (int32)
  limit = distributed.agreed_min(class_chunks.device_memory(setup.mesh.local_devices) // mib) * mib
  per_device = setup.num_padded // setup.mesh.shape[parallel.CLASS_AXIS]
  return class_chunks.choose(compile_at, per_device, limit, log=lambda line: log(f"{phase.name}: {line}"))[1]


def step_offset(phase: phases.Phase) -> jax.Array:
  """Where a phase's draws count from: a branch (init="initial") draws as the run's first phase."""
  return jnp.int32(phase.start if phase.settings.init == "initial" else 0)


# ------------------------------------------------------------------ the loop


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """What a finished run hands to evaluation: its tokens and what they were learned from.

  tokens[phase] [K, V, D] are also in exports[phase] (export/<phase>/); shot_features [K, N, P] are the CLIP
  image features of the (unflipped) shots where a method needed CLIP, else None. `shots` reads the images of this
  process's classes (every class with one process) on demand; shot_positions [K, N] says where every class's shots
  are.
  """
  workdir: Path
  class_names: tuple[str, ...]
  tokens: dict[str, np.ndarray]
  exports: dict[str, Path]
  shots: D.FewShot
  shot_positions: np.ndarray | None
  shot_features: np.ndarray | None
  metrics: Path
  plot: Path

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @functools.cached_property
  def vector_counts(self) -> np.ndarray:
    """int32 [K]: how many of the V vectors each class uses (V_k; label/caption inits vary it), as exported."""
    phase, folder = next(iter(self.exports.items()))
    manifest = json.loads((folder / export.MANIFEST).read_text())
    return export.vector_counts(manifest, self.tokens[phase])


def train(config: ml_collections.ConfigDict, *, on_step: Callable[[int], None] | None = None,
          log: Callable[[str], None] = print) -> TrainResult:
  """Train (or resume, or find finished) the run in config.workdir; export its tokens."""
  workdir = Path(config.workdir)
  log = distributed.main_only(log)
  with StopOnSignal(log) as stop:
    setup = prepare(config, log, check_signature=lambda sig: runs.check_resumable(workdir, sig))
    if distributed.is_main():
      runs.record(workdir, setup.signature)
    if stop.agreed() is not None:  # while the models loaded
      raise stop.stopped("stopped before training; nothing to save. Run the same command again to start.")
    return _run(setup, workdir, stop, on_step, log)


def _run(setup: Setup, workdir: Path, stop: StopOnSignal, on_step, log) -> TrainResult:
  config = setup.config
  plan = setup.plan
  total = plan[-1].end
  optimizers = {p.name: make_optimizer(p.settings.lr, p.settings.weight_decay) for p in plan}
  by_class = parallel.class_sharding(setup.mesh)

  def begin(state: TrainState, phase: phases.Phase, previous_tokens) -> TrainState:
    """A fresh AdamW state at the phase's lr (and the method's fresh per-class state), on the tokens the previous
    phase ended with or on the initial ones (as coordinates in a phase that trains in the subspace)."""
    tokens = setup.init_tokens.copy() if phase.settings.init == "initial" else previous_tokens
    if phase.settings.subspace:
      tokens = to_coords(tokens)
    fresh = optimizers[phase.name].init(tokens)
    class_state = init_class_state(phase.method, tokens, phase.method_settings)
    state = state.replace(tokens=tokens, opt_state=fresh, class_state=class_state)
    return jax.device_put(state, _state_shardings(state, setup))

  def phase_at(step: int) -> phases.Phase:
    return next((p for p in plan if p.start <= step < p.end), plan[-1])

  to_coords = jax.jit(lambda x: setup.subspace.to_coords(x), out_shardings=by_class)
  to_vectors = jax.jit(lambda x: setup.subspace.to_vectors(x), out_shardings=by_class)
  tokens = setup.init_tokens.copy()  # the step donates its state; keep the initial tokens intact
  state = TrainState(step=jnp.zeros((), jnp.int32), tokens=tokens, opt_state=optimizers[plan[0].name].init(tokens),
                     key=jax.random.PRNGKey(config.seed))
  # Each phase's final tokens, by its index in config.phases: [P, Kp, V, D], class-sharded.
  ended = jax.device_put(jnp.zeros((len(config.phases), *tokens.shape), tokens.dtype),
                         NamedSharding(setup.mesh, P(None, parallel.CLASS_AXIS)))
  checkpoint_dir = (workdir / "checkpoints").absolute()
  if distributed.is_main():  # a save cut short (a full disk, a second Ctrl-C, kill -9) left its temporary folder
    _remove_partial_checkpoints(checkpoint_dir)
  manager = ocp.CheckpointManager(checkpoint_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  start = manager.latest_step() or 0
  # The structure of the state saved at `start` (its phase's class state); at 0 also its values.
  state = begin(state, phase_at(start), state.tokens)
  if start:
    restored = manager.restore(start, args=ocp.args.StandardRestore({"state": state, "phase_tokens": ended}))
    state, ended = restored["state"], restored["phase_tokens"]
    log(f"resumed from the checkpoint at step {start}/{total}" if start < total else
        f"{workdir} already holds a finished run ({total} steps); not training again")
  metrics_path = workdir / "metrics.jsonl"
  if distributed.is_main():
    _truncate_metrics(metrics_path, start)

  # Placed on the mesh once; left on one device they would be copied to every device at each step.
  backbone, template_ids = jax.device_put(
      (make_backbone(setup), {name: jnp.asarray(ids) for name, ids in setup.template_ids.items()}),
      parallel.replicated(setup.mesh))

  def save(step: int, state: TrainState, ended) -> None:
    """Synchronous, so that a failed save (a full disk) stops the run at once, with one message; a failed or
    interrupted save leaves no temporary folder, and orbax's threads that fail after it say nothing."""
    _drop_closed_loop_errors()
    with _quiet_absl():
      try:
        manager.save(step, args=ocp.args.StandardSave({"state": state, "phase_tokens": ended}))
        manager.wait_until_finished()
      except BaseException as e:  # orbax wraps OS errors in its own types; a second Ctrl-C is a KeyboardInterrupt
        _silence_orbax_aftermath()
        with contextlib.suppress(BaseException):
          manager.close()  # waits for the save's finalising thread
        _join_orbax_threads(timeout=10.0)  # its writers, still failing, before their folder goes
        if distributed.is_main():
          _remove_partial_checkpoints(checkpoint_dir)
        if not isinstance(e, Exception):
          raise
        reason = str(e).split(" [tensorstore_spec=")[0][:500]  # tensorstore appends kilobytes of JSON
        raise MctiError(f"could not save the checkpoint of step {step} in {checkpoint_dir}: {type(e).__name__}: "
                        f"{reason}. Free disk space (or fix the folder), then run the same command again: it resumes "
                        f"from the last saved checkpoint (step {manager.latest_step() or 0}).") from e

  steps, clocks, compiled = {}, {}, {}
  for phase in (p for p in plan if p.end > start):
    clocks[phase.name] = jax.device_put((step_offset(phase), jnp.int32(phase.start)), parallel.replicated(setup.mesh))
    cfg = step_config(setup, phase)
    # Phases that differ only in where their draws start share one program.
    key = (cfg, phase.settings.lr, phase.settings.weight_decay, setup.template_ids[phase.name].tobytes())
    if key not in compiled:
      log(f"compiling the {phase.name} step ({phase.settings.method}) ...")  # minutes for SD on a GPU
      t = time.time()
      template = state if phase is phase_at(start) else begin(state, phase, state.tokens)  # its state structure
      compiled[key] = compile_chunked_step(setup, phase, optimizers[phase.name], template, backbone,
                                           template_ids[phase.name], clocks[phase.name], log)
      log(f"compiled the {phase.name} step in {time.time() - t:.0f} s")
    steps[phase.name] = compiled[key]
  if stop.agreed() is not None and start < total:
    raise stop.stopped(f"stopped before step {start + 1}/{total}; nothing new to save. Run the same command "
                       "again to resume.")
  finish_tokens = jax.jit(final_tokens, static_argnums=0, out_shardings=by_class)

  from tqdm.auto import tqdm
  bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
             disable=start >= total or not distributed.is_main())
  pending, unchecked, t0 = [], [], time.time()

  def check_finite() -> None:
    """Stop at the first step since the last check whose loss or tokens hold NaN or inf: read where the loop syncs
    anyway (a log row, a save), so never saved or exported."""
    codes = jax.device_get([code for _, _, code in unchecked])
    for (step, phase), code in zip(((step, phase) for step, phase, _ in unchecked), codes):
      if np.any(code[:setup.num_classes]):
        bar.close()
        raise MctiError(_diverged(phase, step, np.asarray(code[:setup.num_classes]), setup.class_names,
                                  manager.latest_step(), checkpoint_dir, workdir))
    unchecked.clear()

  s = start
  while s < total:
    index = next(i for i, p in enumerate(plan) if p.start <= s < p.end)
    phase = plan[index]
    state, metrics = steps[phase.name](state, setup.data, backbone, template_ids[phase.name], *clocks[phase.name])
    unchecked.append((s + 1, phase, metrics.pop("nonfinite")))
    pending.append(metrics)
    done = s + 1
    # A method with per-class stopping ends its phase early once no class trains.
    if "training" in metrics and done < phase.end and float(metrics["training"]) == 0.0:
      log(f"every class of phase {phase.name} has stopped at step {done}; the phase ends there")
      bar.update(phase.end - done)
      done = phase.end
      state = state.replace(step=jax.device_put(jnp.int32(done), parallel.replicated(setup.mesh)))
    if done == phase.end:  # keep its tokens (the method's pick: DCT's lowest-loss ones); the next phase starts afresh
      final = finish_tokens(phase.method, state.class_state, state.tokens)
      ended = ended.at[phase.index].set(to_vectors(final) if phase.settings.subspace else final)
      if index + 1 < len(plan):
        state = begin(state, plan[index + 1], ended[phase.index])
    if done % config.log_every == 0 or done == phase.end:
      if distributed.is_main():
        row = _log_metrics(metrics_path, pending, done, phase.name, time.time() - t0, setup.num_classes)
        bar.set_postfix(phase=phase.name, **{k: f"{v:.4g}" for k, v in row.items() if k in metrics
                                             and not isinstance(v, dict)})
      pending = []
    stopping = done < total and stop.agreed() is not None  # the same step on every process
    saving = done % config.checkpoint_every == 0 or done == phase.end or stopping
    if saving or not pending:  # pending is empty after a log row: its metrics were just read
      check_finite()
    if saving:
      save(done, state, ended)
    bar.update(1)
    if on_step is not None:
      on_step(done)
    if stopping:
      bar.close()
      raise stop.stopped(f"stopped at step {done}/{total}; the checkpoint is saved in {checkpoint_dir}. "
                         "Run the same command again to resume.")
    s = done
  bar.close()
  _check_exported_finite(ended, plan, setup, start, checkpoint_dir, workdir)
  return _finish(setup, workdir, plan, ended, metrics_path, log)


def _diverged(phase: phases.Phase, step: int, codes: np.ndarray, class_names, last_saved: int | None,
              checkpoint_dir: Path, workdir: Path) -> str:
  """The one line that stops a diverged run: where, which class, what is kept, and what to change."""
  bad = np.flatnonzero(codes)
  k = int(bad[0])
  others = len(bad) - 1
  also = f" (as {'does 1 other class' if others == 1 else f'do {others} other classes'})" if others else ""
  kept = (f"the last finite checkpoint is step {last_saved} in {checkpoint_dir}" if last_saved
          else "no checkpoint was saved")
  return (f"the {phase.name} phase diverged at step {step}: class {k} ({class_names[k]}) has "
          f"{_nonfinite_text(int(codes[k]))}{also}; nothing was exported and {kept}. Lower "
          f"--config.phase.{phase.name}.lr (now {phase.settings.lr:g}) and train in a new --config.workdir (or delete "
          f"{workdir}): a run's lr can't change on resume, and the same command diverges again")


def _nonfinite_text(code: int) -> str:
  """A class's nonfinite code (train_step.nonfinite_codes) in words: 'a nan loss and nan tokens'."""
  parts = []
  if code & (LOSS_NAN | LOSS_INF):
    parts.append("a nan loss" if code & LOSS_NAN else "an inf loss")
  if code & (TOKENS_NAN | TOKENS_INF):
    parts.append("nan tokens" if code & TOKENS_NAN else "inf tokens")
  return " and ".join(parts)


def _check_exported_finite(ended, plan: list[phases.Phase], setup: Setup, start: int, checkpoint_dir: Path,
                           workdir: Path) -> None:
  """No phase's tokens are exported with NaN or inf, not even a checkpoint's from before the per-step check."""
  finite = jax.jit(lambda x: jnp.isfinite(x).all(axis=(2, 3)), out_shardings=parallel.replicated(setup.mesh))
  finite = np.asarray(finite(ended))[:, :setup.num_classes]
  for p in plan:
    bad = np.flatnonzero(~finite[p.index])
    if bad.size:
      k = int(bad[0])
      raise MctiError(f"the {p.name} phase's tokens of class {k} ({setup.class_names[k]}) are not finite in the "
                      f"checkpoint of step {start} in {checkpoint_dir}, saved before runs checked for divergence; "
                      f"nothing was exported. Delete {workdir} and train again with a lower "
                      f"--config.phase.{p.name}.lr (now {p.settings.lr:g})")


def _remove_partial_checkpoints(checkpoint_dir: Path) -> None:
  """Remove the temporary folders of saves that never finished (orbax names them <step>.orbax-checkpoint-tmp...);
  orbax would leave them forever."""
  if checkpoint_dir.is_dir():
    for folder in checkpoint_dir.glob("*.orbax-checkpoint-tmp*"):
      shutil.rmtree(folder, ignore_errors=True)


def _join_orbax_threads(timeout: float) -> None:
  """Wait (up to `timeout` s in all) for orbax's writer threads of a failed save, which go on failing after it."""
  deadline = time.monotonic() + timeout
  for thread in threading.enumerate():
    if thread is not threading.current_thread() and type(thread).__module__.startswith("orbax."):
      with contextlib.suppress(BaseException):  # orbax's join re-raises the thread's error
        thread.join(max(0.0, deadline - time.monotonic()))


def _silence_orbax_aftermath() -> None:
  """After a failed save, orbax's threads keep failing: absl logs their tracebacks, asyncio logs their tasks'
  exceptions as never retrieved (when collected), and tensorstore's late callbacks find their event loop closed
  ("Event loop is closed", printed as unraisable). The save's own message says it all: drop those, for the rest of
  the process (only those: other logs and errors are untouched)."""
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _OrbaxRecords) for f in logger.filters):
      logger.addFilter(_OrbaxRecords())
  _drop_closed_loop_errors()


def _drop_closed_loop_errors() -> None:
  """Drop the unraisable "Event loop is closed" of tensorstore callbacks that outlive a failed save's event loop
  (they can come while the save still fails, so this is in place before every save)."""
  if not getattr(sys.unraisablehook, "drops_closed_loops", False):
    previous = sys.unraisablehook

    def hook(unraisable):
      value = unraisable.exc_value
      if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
        previous(unraisable)

    hook.drops_closed_loops = True
    sys.unraisablehook = hook


class _OrbaxRecords(logging.Filter):
  """Drops the log records of orbax: logged by its code, or about its tasks and futures (which name its code or its
  <step>.orbax-checkpoint-tmp folders)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "orbax" not in record.pathname and "orbax" not in record.getMessage()


@contextlib.contextmanager
def _quiet_absl():
  """orbax logs every failed save thread's traceback (300 lines for a full disk); the save raises one message."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


def _state_shardings(state: TrainState, setup: Setup):
  """Tokens, their optimiser moments and the method's per-class state sharded on the class axis; step, key and
  counters replicated."""
  by_class, replicated = parallel.class_sharding(setup.mesh), parallel.replicated(setup.mesh)
  per_class = lambda x: by_class if x.ndim > 0 and x.shape == state.tokens.shape else replicated  # noqa: E731
  return TrainState(step=replicated, tokens=by_class, opt_state=jax.tree.map(per_class, state.opt_state),
                    key=replicated, class_state=jax.tree.map(lambda _: by_class, state.class_state))


def _truncate_metrics(path: Path, step: int) -> None:
  """Drop log rows past the checkpoint we resume from, so resumed logs have no duplicates (and rows an older
  version wrote with a bare NaN are made strict JSON)."""
  if path.is_file():
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    path.write_text("".join(_json_line(r) for r in rows if r["step"] <= step))


def _json_line(row: dict[str, Any]) -> str:
  """One row of metrics.jsonl, strict JSON: a NaN or inf (a diverged step's) is null, which every parser reads as
  "no number" (a bare NaN is refused by strict parsers; a string would turn a numeric column into text)."""
  def strict(value):
    if isinstance(value, float) and not math.isfinite(value):
      return None
    if isinstance(value, dict):
      return {k: strict(v) for k, v in value.items()}
    if isinstance(value, list):
      return [strict(v) for v in value]
    return value
  return json.dumps(strict(row), allow_nan=False) + "\n"


def _log_metrics(path: Path, pending: list[dict], step: int, phase: str, elapsed: float, num_classes: int
                 ) -> dict[str, Any]:
  """One row of metrics.jsonl: each metric's mean over the steps since the last row; per-class ones as lists."""
  stacked = jax.device_get(pending)
  row = {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0] if k != "per_class"}
  if "per_class" in stacked[0]:
    row["per_class"] = {k: np.round(np.mean([m["per_class"][k][:num_classes] for m in stacked], 0), 5).tolist()
                        for k in stacked[0]["per_class"]}
  row.update(step=step, phase=phase, elapsed_s=round(elapsed, 2))
  with path.open("a") as f:
    f.write(_json_line(row))
  return row


def _finish(setup: Setup, workdir: Path, plan: list[phases.Phase], ended, metrics_path: Path, log) -> TrainResult:
  c = setup.config
  gather = jax.jit(lambda x: x, out_shardings=parallel.replicated(setup.mesh))
  ended = np.asarray(gather(ended))  # a collective: all processes
  tokens = {p.name: ended[p.index] for p in plan}
  info = {"base_model": str(c.model.sd_path), "clip_model": str(c.model.clip_path), "pooling": c.model.pooling,
          "shots": setup.shots_manifest}
  if setup.classifier is not None:
    from mcti_jax import classifiers
    fields = ("type",) + sum(classifiers.TYPES[c.classifier.type], ())
    info["classifier"] = {**{k: c.classifier[k] for k in fields if c.classifier.get(k) is not None},
                          "targets": setup.targets.tolist(),
                          "target_names": [setup.classifier.class_names[t] for t in setup.targets]}
  phase_info = {p.name: {"method": p.settings.method, "templates": list(templates_of(c, p))} for p in plan}
  plot = workdir / "loss.png"
  exports = {name: workdir / "export" / name for name in tokens}
  if distributed.is_main():
    export.export_phases(workdir / "export", tokens, setup.class_tokens, setup.class_names, info, phase_info)
    titles = {k: v for p in plan for k, v in p.caps.metric_titles}
    plots.loss_curves(metrics_path, plot, boundaries=[p.end for p in plan[:-1]], titles=titles)
    if any(p.caps.stateful for p in plan):
      plots.class_curves(metrics_path, workdir / "class_curves.png", setup.class_names, titles=titles)
    log(f"tokens exported to {', '.join(str(p) for p in exports.values())}; loss curves in {plot}")
  features = None
  if setup.clip is not None:  # a collective too
    features = np.asarray(gather(setup.data.image_features))[: setup.num_classes, :, 0]
  return TrainResult(workdir=workdir, class_names=tuple(setup.class_names),
                     tokens={name: value[: setup.num_classes] for name, value in tokens.items()}, exports=exports,
                     shots=setup.shots, shot_positions=setup.shot_positions, shot_features=features,
                     metrics=metrics_path, plot=plot)
