"""config.class_chunk: a device's classes in passes of c inside the one step give the tokens of one pass.

Each test compares chunked steps with the unchunked step (class_chunk=0) of the same setup, so a chunk that
mixed up classes, dropped the last pass's spare slots wrongly or let them into the loss or the metrics would show.
"""

import functools
import json
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import crash_after, set_fields, tiny_train_config
from mcti_jax.training import class_chunks, train
from mcti_jax.training import setup as setup_lib
from mcti_jax import guides, methods
from mcti_jax.runtime import parallel
from mcti_jax.guides import file as classifier_file
from mcti_jax.errors import ConfigError, MctiError
from mcti_jax.training.step import ShotData, TrainState

NUM_CLASSES = 25  # on 8 devices: 4 classes per device (the last one holds 1 real class), passes of 3 leave spares
STEPS = 2


def _shots_config(checkpoint, workdir, devices: int):
  """TI, MC-TI, CoMPLe and custom tokens in the subspace of words, over the synthetic world's classes."""
  c = tiny_train_config(checkpoint, workdir, num_devices=devices, **{"data.num_classes": NUM_CLASSES})
  c.data.source, c.data.class_names, c.tokens.label_words = "synthetic", None, ()
  c.phases = ("ti", "mcti", "comple", "custom")
  c.phase.comple = methods.phase("comple", steps=STEPS, lr=1e-2, lam=1e-2, templates="ti")
  c.phase.custom = methods.phase("custom_tokens", steps=STEPS, lr=5e-2, beta=1.0, subspace=True)
  c.tokens.subspace_words = ("digit", "thin", "bold", "wide")
  c.phase.ti.steps = c.phase.mcti.steps = STEPS
  return c


def _dct_config(checkpoint, workdir, devices: int, classifier_folder):
  from mcti_jax.configs import dct as dct_configs
  c = dct_configs.get_config("tiny")
  base = tiny_train_config(checkpoint, workdir)
  c.model.sd_path, c.model.clip_path, c.workdir, c.data.cache_dir = (base.model.sd_path, base.model.clip_path,
                                                                    str(workdir), base.data.cache_dir)
  c.classifier.path, c.classifier.targets, c.data.class_names = str(classifier_folder), None, None
  c.phase.dct.update(steps=STEPS, sampling_steps=2, images_per_update=1, epoch_size=1, guidance=3.0)
  return set_fields(c, {"num_devices": devices})


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory):
  """A random classifier of NUM_CLASSES classes: DCT learns one token for each."""
  layers = ({"type": "conv", "name": "conv", "features": 4, "kernel": 3, "stride": 2, "padding": "SAME"},
            {"type": "relu"}, {"type": "flatten"}, {"type": "dense", "name": "fc", "features": NUM_CLASSES})
  transform = guides.Transform(crop=(16, 16), mean=(0.5,), std=(0.25,))
  folder = tmp_path_factory.mktemp("guide") / "guide"
  classifier_file.save(folder, classifier_file.init(layers, [f"k{i}" for i in range(NUM_CLASSES)], transform,
                                                    jax.random.key(0)))
  return folder


@pytest.fixture(scope="module")
def setups(tiny_checkpoint, tmp_path_factory, classifier_folder):
  """Prepared setups (models, encoded shots) on 8 devices and on 1, for the shot methods and for DCT."""
  base = tmp_path_factory.mktemp("chunks")
  quiet = lambda _: None  # noqa: E731
  out = {}
  for devices in (8, 1):
    out["shots", devices] = setup_lib.prepare(_shots_config(tiny_checkpoint, base / f"s{devices}", devices), quiet)
    out["dct", devices] = setup_lib.prepare(_dct_config(tiny_checkpoint, base / f"d{devices}", devices,
                                                    classifier_folder), quiet)
  return out


def run_steps(setup, phase_name: str, chunk: int, steps: int = STEPS):
  """`steps` steps of one phase from the initial tokens at class_chunk=chunk: tokens [K, V, D] and metrics."""
  step = compiled_step(setup, phase_name, chunk)
  state, clock, template_ids = _inputs(setup, phase_name)
  metrics = []
  for _ in range(steps):
    state, m = step(state, setup.data, _backbone(setup), template_ids, *clock)
    metrics.append(jax.device_get(m))
  return np.asarray(state.tokens)[:setup.num_classes], metrics


_PROGRAMS = {}


def compiled_step(setup, phase_name: str, chunk: int):
  """The phase's step as the trainer compiles it (train.compile_step), once per setup, phase and chunk."""
  key = (id(setup), phase_name, chunk)
  if key not in _PROGRAMS:
    phase = next(p for p in setup.plan if p.name == phase_name)
    state, clock, template_ids = _inputs(setup, phase_name)
    _PROGRAMS[key] = train.compile_step(setup, phase, _optimizer(phase), state, _backbone(setup), template_ids, clock,
                                        chunk)
  return _PROGRAMS[key]


def _optimizer(phase):
  return train.make_optimizer(phase.settings.lr, phase.settings.weight_decay)


def _inputs(setup, phase_name: str):
  """A fresh state at the phase's start (the step donates it), its clock and template ids, on the mesh."""
  phase = next(p for p in setup.plan if p.name == phase_name)
  tokens = setup.init_tokens.copy()
  if phase.settings.subspace:  # the phase trains coordinates in the span of the words
    tokens = jax.jit(setup.subspace.to_coords, out_shardings=parallel.class_sharding(setup.mesh))(tokens)
  state = TrainState(step=jnp.int32(phase.start), tokens=tokens, opt_state=_optimizer(phase).init(tokens),
                     key=jax.random.PRNGKey(0), class_state=train.init_class_state(phase.method, tokens,
                                                                                   phase.method_settings))
  state = jax.device_put(state, train._state_shardings(state, setup))
  clock = jax.device_put((jnp.int32(0), jnp.int32(phase.start)), parallel.replicated(setup.mesh))
  template_ids = jax.device_put(jnp.asarray(setup.template_ids[phase.name]), parallel.replicated(setup.mesh))
  return state, clock, template_ids


_BACKBONES = {}


def _backbone(setup):
  """The setup's frozen models on its mesh, made once per setup."""
  if id(setup) not in _BACKBONES:
    _BACKBONES[id(setup)] = (setup, jax.device_put(setup_lib.make_backbone(setup), parallel.replicated(setup.mesh)))
  return _BACKBONES[id(setup)][1]


def _assert_same_metrics(got: list[dict], want: list[dict], num_classes: int, rtol: float = 1e-6):
  for a, b in zip(got, want):
    assert a.keys() == b.keys()
    for name in a:
      if name == "per_class":
        for term in a[name]:
          np.testing.assert_allclose(a[name][term][:num_classes], b[name][term][:num_classes], rtol=rtol, atol=1e-6)
      else:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("group, phase, devices", [
    *((group, phase, devices) for devices in (8, 1) for group, phase in (("shots", "ti"), ("shots", "mcti"),
                                                                         ("shots", "comple"), ("dct", "dct"))),
    ("shots", "custom", 1),  # custom tokens in the span of words: a subspace phase
])
def test_chunks_of_1_and_3_give_the_tokens_and_metrics_of_one_pass(setups, group, phase, devices):
  """Within 1e-6, not bit for bit: XLA:CPU batches a pass's c classes' convolutions and matmuls as it does
  K / devices of them, but not in the same summation order (measured: tokens differ by ~1e-8)."""
  setup = setups[group, devices]
  assert setup.num_padded == (32 if devices == 8 else NUM_CLASSES)
  whole, whole_metrics = run_steps(setup, phase, 0)
  assert np.abs(whole - _initial_vectors(setup, phase)).max() > 1e-5  # it trained
  for chunk in (1, 3):
    tokens, metrics = run_steps(setup, phase, chunk)
    np.testing.assert_allclose(tokens, whole, rtol=0, atol=1e-6, err_msg=f"class_chunk={chunk}")
    # DCT's per-class CE comes out of 6 DDIM steps, the VAE decoder and the guide: the regrouped sums drift by up to
    # ~15 float32 ulps there (measured 1.7e-6 relative at LLVM -O1); its tokens still agree within 1e-6.
    _assert_same_metrics(metrics, whole_metrics, NUM_CLASSES, rtol=5e-6 if group == "dct" else 1e-6)


def _initial_vectors(setup, phase_name: str) -> np.ndarray:
  tokens = np.asarray(setup.init_tokens)[:NUM_CLASSES]
  phase = next(p for p in setup.plan if p.name == phase_name)
  return np.asarray(setup.subspace.to_coords(tokens)) if phase.settings.subspace else tokens


@pytest.mark.slow
def test_a_run_resumed_with_another_chunk_equals_the_uninterrupted_run(tiny_checkpoint, tmp_path, monkeypatch):
  """5 classes on one device, 6 TI steps: steps 1-3 in passes of 2 (killed after 3, saved at 2), then the rest in
  passes of 3, against one pass. Then "auto" in the trainer, on a device said to hold any chunk: one pass."""
  def config(workdir, chunk):
    c = tiny_train_config(tiny_checkpoint, workdir, num_devices=1, class_chunk=chunk,
                          **{"data.num_classes": 5, "phase.ti.steps": 6})
    c.phases = ("ti",)
    return c

  whole = train.train(config(tmp_path / "whole", 0), log=lambda _: None)

  crash_after(config(tmp_path / "run", 2), 3)
  logs = []
  resumed = train.train(config(tmp_path / "run", 3), log=logs.append)
  assert any("resumed from the checkpoint at step 2" in line for line in logs)
  np.testing.assert_allclose(resumed.tokens["ti"], whole.tokens["ti"], rtol=0, atol=1e-6)
  assert np.abs(whole.tokens["ti"] - whole.tokens["ti"][:1]).max() > 1e-5  # it trained: the classes moved apart
  rows = [[json.loads(line) for line in r.metrics.read_text().splitlines()] for r in (resumed, whole)]
  assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [2, 4, 6]
  for a, b in zip(*rows):
    assert a["mse"] == pytest.approx(b["mse"], rel=1e-6, abs=1e-7)

  monkeypatch.setattr(class_chunks, "device_memory", lambda devices: 2**40)
  logs = []
  auto = train.train(config(tmp_path / "auto", "auto"), log=logs.append)
  assert any("ti: class_chunk='auto': 5 of each device's 5 classes per pass (1 pass)" in line for line in logs), logs
  np.testing.assert_array_equal(auto.tokens["ti"], whole.tokens["ti"])  # the one-pass program


# ------------------------------------------------------------------ memory flat in K


_MEMORY = {}


def _abstract_step_memory(setup, phase_name: str, num_classes: int, chunk: int):
  """XLA's memory analysis of the step compiled for `num_classes` classes of the setup's shapes (nothing runs)."""
  key = (id(setup), phase_name, num_classes, chunk)
  if key not in _MEMORY:
    _MEMORY[key] = _compile_abstract(setup, phase_name, num_classes, chunk).memory_analysis()
  return _MEMORY[key]


def _compile_abstract(setup, phase_name: str, num_classes: int, chunk: int):
  phase = next(p for p in setup.plan if p.name == phase_name)
  mesh = setup.mesh
  padded = parallel.padded_num_classes(num_classes, mesh)
  by_class, replicated = parallel.class_sharding(mesh), parallel.replicated(mesh)
  like = lambda x, sharding: jax.ShapeDtypeStruct((padded, *x.shape[1:]), x.dtype, sharding=sharding)  # noqa: E731
  d = setup.data
  data = ShotData(class_ids=like(d.class_ids, by_class), latent_mean=like(d.latent_mean, by_class),
                  latent_logvar=like(d.latent_logvar, by_class), image_features=like(d.image_features, replicated),
                  valid=like(d.valid, replicated), vector_valid=like(d.vector_valid, by_class))
  optimizer = train.make_optimizer(phase.settings.lr)
  tokens = like(setup.init_tokens, by_class)
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), tokens=tokens,
                     opt_state=jax.eval_shape(optimizer.init, tokens), key=jax.ShapeDtypeStruct(
                         (2,), jnp.uint32, sharding=replicated))
  state = jax.tree.map(lambda x: x if getattr(x, "sharding", None) else
                       jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=by_class if x.shape == tokens.shape
                                            else replicated), state)
  template_ids = jnp.asarray(setup.template_ids[phase.name])
  step = jax.jit(functools.partial(train.train_step, cfg=train.step_config(setup, phase, chunk), optimizer=optimizer,
                                   mesh=mesh))
  return step.lower(state, data, _backbone(setup), template_ids).compile()


@pytest.mark.slow
def test_compiled_temp_memory_at_1024_classes_is_that_at_64(setups, phase="mcti"):
  """MC-TI (TI's step plus its CLIP term over every class's shot features), 8 devices, 4 classes per pass."""
  setup = setups["shots", 8]
  small, large = (_abstract_step_memory(setup, phase, k, chunk=4) for k in (64, 1024))
  assert large.temp_size_in_bytes <= 1.1 * small.temp_size_in_bytes, (small, large)
  unchunked = _abstract_step_memory(setup, phase, 1024, chunk=0)  # all 128 classes of a device at once
  assert unchunked.temp_size_in_bytes > 4 * large.temp_size_in_bytes


# ------------------------------------------------------------------ "auto"


class _Program(SimpleNamespace):
  """A stand-in for a compiled step whose memory analysis says it needs `bytes`."""

  def memory_analysis(self):
    return SimpleNamespace(argument_size_in_bytes=self.bytes, output_size_in_bytes=0, alias_size_in_bytes=0,
                           temp_size_in_bytes=0)


@pytest.mark.parametrize("num_local, limit, want", [
    (37, 10_000, 0),  # all 37 fit: one pass
    (37, 1000 + 100 * 15.5, 13),  # 16 fit at most -> 3 passes of 13 (not 16 + 16 + 5)
    (37, 1000 + 100 * 1.5, 2),  # 2 fit -> 19 passes of 2
    (1, 2000, 0),
])
def test_auto_picks_the_largest_even_chunk_under_the_budget(num_local, limit, want):
  """need(c) = 900 + 100 c bytes (linear, as one pass's activations), margin 1."""
  compiled = []
  chunk, program = class_chunks.choose(lambda c: compiled.append(c) or _Program(bytes=900 + 100 * (c or num_local)),
                                       num_local, int(limit), margin=1.0, log=lambda _: None)
  assert chunk == want and program.bytes == 900 + 100 * (want or num_local)
  assert len(compiled) <= 3  # the probes at 1 and 2, then the pick


def test_auto_lowers_the_chunk_until_the_compiled_step_fits():
  """The probes say 8 fit, but passes of 8 and 7 need more than the line (XLA's choices can make it so)."""
  need = lambda c: 1000 + 100 * c + (500 if c >= 7 else 0)  # noqa: E731
  chunk, _ = class_chunks.choose(lambda c: _Program(bytes=need(c or 40)), 40, 1800, margin=1.0, log=lambda _: None)
  assert chunk == 6  # the line's 8 (2300 bytes), then 7 (2200), then 6 (1600): 7 passes of 6 (not 6 x 6 + 4)
  with pytest.raises(MctiError, match="even one class per pass needs"):
    class_chunks.choose(lambda c: _Program(bytes=need(c or 40)), 40, 1000, margin=1.0, log=lambda _: None)


@pytest.mark.slow
def test_auto_on_the_compiled_tiny_step_fits_the_budget(setups):
  """The trainer's step (MC-TI, 1 device, 25 classes): with a limit at which the line through 1 and 2 classes per
  pass says 3 fit, auto runs 9 passes of 3 (25 = 8 x 3 + 1) and that step fits."""
  setup = setups["shots", 1]
  compile_at = lambda c: compiled_step(setup, "mcti", c)  # noqa: E731  (those of the tests above, when they ran)
  need = {c: class_chunks.need(compile_at(c)) for c in (1, 2)}
  assert need[2] > need[1]
  limit = int(need[1] + 2.5 * (need[2] - need[1]))
  chunk, program = class_chunks.choose(compile_at, NUM_CLASSES, limit, margin=1.0, log=lambda _: None)
  assert 1 <= chunk <= 3 and class_chunks.need(program) <= limit  # 3, or fewer if XLA's need isn't linear
  assert program is compile_at(chunk)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("value", [-1, 2.5, "all", True])
def test_a_bad_chunk_is_refused_before_anything_loads(tiny_checkpoint, tmp_path, value):
  config = tiny_train_config(tiny_checkpoint, tmp_path / "run", class_chunk=value)
  with pytest.raises(ConfigError, match=re.escape(f"config.class_chunk={value!r} must be a whole number")):
    train.train(config, log=lambda _: None)
  assert not (tmp_path / "run").exists()


def test_auto_on_a_backend_without_memory_stats_says_which_value_to_set(tiny_checkpoint, tmp_path, monkeypatch):
  monkeypatch.setattr(setup_lib.pipeline, "load_stable_diffusion", lambda *a, **k: pytest.fail("models loaded"))
  config = tiny_train_config(tiny_checkpoint, tmp_path / "run", class_chunk="auto")
  with pytest.raises(ConfigError, match=r"cpu backend does not report it; set --config.class_chunk=N"):
    train.train(config, log=lambda _: None)
  assert not (tmp_path / "run").exists()
