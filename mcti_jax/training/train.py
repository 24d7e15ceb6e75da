"""The trainer: few shots -> cached encodings -> one compiled step per phase for all K classes -> export.

  result = train(config)   # config from mcti_jax/configs/mcti.py

The run is `config.phases` in order (phases.py); each phase trains with its
method's loss (methods/<name>.py), a fresh AdamW state, and exports its tokens
to export/<phase>/. The trainer knows no method: what a phase needs (CLIP,
say) comes from its method module. The randomness of step s for class k is
fold_in(fold_in(key, s), k), so a resumed run, a run on another device count,
and a one-class run all see the same samples as an uninterrupted K-class run.

The run is set up by setup.py (everything that can be wrong with the input
is checked there, before the models load); the step is step.py. SIGINT or
SIGTERM stops the run at the next step boundary, after saving a checkpoint
(checkpoints.py keeps a failed save tidy); the same command resumes it. A step whose loss or tokens turn NaN
or inf (a diverged run) stops it with one line naming the phase, the step and
the class; nothing non-finite is ever saved or exported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
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

from mcti_jax.training import checkpoints, class_chunks, phases, runs
from mcti_jax.runtime import distributed, parallel
from mcti_jax.tokens import export
from mcti_jax.generation import generate
from mcti_jax import plots
from mcti_jax import data as D
from mcti_jax.errors import MctiError
from mcti_jax.runtime.stopping import StopOnSignal
from mcti_jax.training.setup import Setup, make_backbone, prepare, templates_of
from mcti_jax.training.step import (Backbone, StepConfig, TrainState, final_tokens, frozen_settings,
                                    init_class_state, make_optimizer, train_step)
from mcti_jax.training.step import LOSS_INF, LOSS_NAN, TOKENS_INF, TOKENS_NAN


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
    checkpoints.remove_partial(checkpoint_dir)
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
    checkpoints.drop_closed_loop_errors()
    with checkpoints.quiet_absl():
      try:
        manager.save(step, args=ocp.args.StandardSave({"state": state, "phase_tokens": ended}))
        manager.wait_until_finished()
      except BaseException as e:  # orbax wraps OS errors in its own types; a second Ctrl-C is a KeyboardInterrupt
        checkpoints.silence_aftermath()
        with contextlib.suppress(BaseException):
          manager.close()  # waits for the save's finalising thread
        checkpoints.join_writer_threads(timeout=10.0)  # its writers, still failing, before their folder goes
        if distributed.is_main():
          checkpoints.remove_partial(checkpoint_dir)
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
          "guidance": c.model.get("guidance"), "shots": setup.shots_manifest}
  if setup.classifier is not None:
    from mcti_jax import guides
    fields = ("type",) + sum(guides.TYPES[c.classifier.type], ())
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
