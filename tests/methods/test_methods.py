"""Methods as modules: the redesigned trainer against main's tokens, and the cross-class methods (CoMPLe)."""

import json
import platform

import jax
import numpy as np
import pytest
from safetensors import safe_open

from conftest import ROOT
from mcti_jax.tokens import export
from mcti_jax.training import train

FIXTURE = ROOT / "tests" / "fixtures" / "tiny_tokens_main.safetensors"


def _fixture():
  with safe_open(str(FIXTURE), "np") as f:
    return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _cpu() -> str:
  return next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")


def test_ti_and_mcti_tokens_equal_mains(tmp_path):
  """The tiny preset, 6 + 6 steps on 8 devices: the golden fixture's tokens (tests/fixtures/make_tiny_tokens.py).

  Within 1e-6 on the fixture's CPU model and jax (bit for bit where it was made), 1e-5 elsewhere: XLA's CPU code
  differs between CPUs, and AdamW's normalised steps carry a rounding difference through the 12 steps. A VM's CPU model name ("AMD EPYC") doesn't tell the
  CPUs apart: on another EPYC VM TI's tokens were 3.7e-7 and MC-TI's 2.9e-7 from the fixture, while
  the trainer without and with class chunks gave the same bits there. MC-TI's only to float32 rounding
  anywhere since its text feature comes from the text encoder's pass (`Backbone.text_shared`): the same
  computation in another order (measured: at most 2.2e-8 apart where the fixture was made).
  """
  from mcti_jax.configs import mcti
  want, meta = _fixture()
  steps = int(meta["steps_per_phase"])
  c = mcti.get_config("tiny")
  c.workdir, c.data.cache_dir = str(tmp_path / "run"), str(tmp_path / "cache")
  c.phase.ti.steps, c.phase.mcti.steps, c.log_every, c.checkpoint_every = steps, steps, 3, 100
  c.phase.mcti.beta = float(meta["beta"])
  result = train.train(c, log=lambda _: None)
  got = {phase: export.load_tokens(path)[0] for phase, path in result.exports.items()}
  assert sorted(got) == sorted(want) == ["mcti", "ti"]
  same_machine = (meta["cpu"], meta["jax"], meta["machine"]) == (_cpu(), jax.__version__, platform.machine())
  for phase in want:
    if same_machine and jax.device_count() == int(meta["devices"]):
      np.testing.assert_allclose(got[phase], want[phase], rtol=0, atol=1e-6, err_msg=phase)
    else:
      np.testing.assert_allclose(got[phase], want[phase], rtol=0, atol=1e-5, err_msg=phase)


# ------------------------------------------------------------ CoMPLe


def test_comple_loss_equals_the_papers_formula_by_hand():
  """Eq. 3 on a hand-made step: K classes x B items, the noise targets and predictions written down.

  The trainer sums class losses; with B items in every class that sum is K times eq. 3 (each class's share of the
  pairs i != j is the same). One padded class takes no part, and pairs past `neg_clip` count `neg_clip`.
  """
  from types import SimpleNamespace

  import jax.numpy as jnp

  from mcti_jax.methods import comple
  rng = np.random.default_rng(0)
  k, b, shape, lam = 3, 2, (2, 2, 3), 0.3
  eps = rng.normal(size=(k + 1, b, *shape)).astype(np.float32)  # the last class is padding
  pred = rng.normal(size=(k + 1, b, *shape)).astype(np.float32)
  pred[0, 1] *= 3.0  # far from every noise: its pairs are clipped below
  eps[k] = np.inf  # what padding could hold must not matter
  valid = np.array([True] * k + [False])

  def by_hand(clip):
    sq = lambda x: float(np.mean(np.square(x, dtype=np.float64)))  # noqa: E731
    pos = np.mean([sq(eps[c, i] - pred[c, i]) for c in range(k) for i in range(b)])
    neg = np.mean([min(sq(eps[c, i] - pred[d, j]), clip) for c in range(k) for i in range(b)
                   for d in range(k) for j in range(b) if c != d])
    return pos - lam * neg

  for clip in (1e9, 4.0):
    cfg = SimpleNamespace(lam=lam, neg_clip=clip)
    everyone = SimpleNamespace(target=jnp.asarray(eps), class_ids=jnp.arange(k + 1), valid=jnp.asarray(valid))
    total = 0.0
    for c in range(k):
      items = SimpleNamespace(prediction=jnp.asarray(pred[c]), target=jnp.asarray(eps[c]))
      mse = np.mean([float(comple.item_terms(SimpleNamespace(prediction=items.prediction[i],
                                                             target=items.target[i]), None, cfg)["mse"])
                     for i in range(b)])
      terms = {"mse": mse, **comple.cross_terms(items, c, everyone, cfg)}
      total += float(comple.loss(terms, cfg))
    assert total / k == pytest.approx(by_hand(clip), rel=1e-5, abs=1e-6), clip
  assert by_hand(4.0) != pytest.approx(by_hand(1e9))  # the clip was exercised


def _comple_config(checkpoint, workdir, devices):
  """GCPL, then CoMPLe at lambda 0 and at 1e-2, both as branches from the initial tokens: one run."""
  from mcti_jax.configs import gcpl
  from conftest import tiny_train_config
  from mcti_jax import methods
  c = tiny_train_config(checkpoint, workdir, num_devices=devices, **{"data.num_classes": 5})
  c.phases = ("gcpl", "comple0", "comple")
  c.phase = gcpl.get_config("tiny").phase  # GCPL's defaults: template, lr
  # The TI templates, as test_train's runs: GCPL's step is then TI's program there, compiled once for both.
  c.phase.gcpl.steps, c.phase.gcpl.templates = 3, "ti"
  lr = c.phase.gcpl.lr  # the tiny preset's
  c.phase.comple0 = methods.phase("comple", steps=3, lr=lr, init="initial", lam=0.0, templates="ti")
  c.phase.comple = methods.phase("comple", steps=3, lr=lr, init="initial", lam=1e-2, templates="ti")
  return c


@pytest.fixture(scope="module")
def comple_runs(tiny_checkpoint, tmp_path_factory):
  """The three phases on 8 devices; CoMPLe alone on 1 (a branch draws what a run's first phase draws)."""
  base = tmp_path_factory.mktemp("comple")
  one = _comple_config(tiny_checkpoint, base / "d1", 1)
  one.phases = ("comple",)
  return {8: train.train(_comple_config(tiny_checkpoint, base / "d8", 8), log=lambda _: None),
          1: train.train(one, log=lambda _: None)}


@pytest.mark.slow
def test_comple_at_lambda_0_is_gcpl_bit_for_bit(comple_runs):
  r = comple_runs[8]
  np.testing.assert_array_equal(r.tokens["comple0"], r.tokens["gcpl"])
  assert np.abs(r.tokens["comple"] - r.tokens["gcpl"]).max() > 1e-7  # the negative term moved the tokens
  manifest = export.load_tokens(r.exports["gcpl"])[1]
  assert manifest["method"] == "gcpl" and manifest["templates"][0] == "a photo of a {}"


@pytest.mark.slow
def test_comple_on_8_devices_equals_1_device(comple_runs):
  """The negatives are gathered over the mesh: 5 classes on 8 devices (3 padded) see what 1 device sees."""
  np.testing.assert_allclose(comple_runs[8].tokens["comple"], comple_runs[1].tokens["comple"], atol=2e-6, rtol=0)
  rows = [json.loads(line) for line in comple_runs[8].metrics.read_text().splitlines()]
  last = [r for r in rows if r["phase"] == "comple"][-1]
  assert {"mse", "neg", "neg_raw", "neg_clipped"} <= set(last) and 0 < last["neg"] <= last["neg_raw"]


# ------------------------------------------------------------ configs and evaluators by name


def test_bad_phase_and_eval_settings_are_one_clear_error(tiny_checkpoint, tmp_path):
  from conftest import tiny_train_config
  from mcti_jax.evaluation import evaluators
  from mcti_jax import methods
  from mcti_jax.training import phases
  from mcti_jax.errors import ConfigError
  c = tiny_train_config(tiny_checkpoint, tmp_path)
  c.phases = ("ti", "nope")
  with pytest.raises(ConfigError, match="config.phases names 'nope', but config.phase has no settings for it"):
    phases.plan(c)
  with pytest.raises(ConfigError, match="method 'mcti' has no settings \\['lam'\\]"):
    methods.phase("mcti", lam=1.0)
  with pytest.raises(ConfigError, match="unknown method 'dreambooth'"):
    methods.get("dreambooth")
  with pytest.raises(ConfigError, match="config.evals.x.type='nope'"):
    evaluators.make("x", {"type": "nope"})
  with pytest.raises(ConfigError, match="config.evals.x \\(dic\\) has no fields \\['phase'\\]"):
    evaluators.make("x", {"type": "dic", "phase": "mcti"})


def test_an_evaluator_of_an_untrained_phase_fails_before_training(tmp_path):
  from mcti_jax.configs import eval as eval_config

  from mcti_jax.evaluation import evaluate
  from mcti_jax.errors import ConfigError
  c = eval_config.get_config("tiny")
  c.workdir = str(tmp_path / "eval")
  c.train.phase.mcti.steps = 0  # TI only; the config still asks for MC-TI's rows
  with pytest.raises(ConfigError, match=r"config.evals.mcti scores the tokens of phase 'mcti', but config.train "
                                        r"trains \['ti'\]"):
    evaluate.run(c, log=lambda _: None)
  assert not (tmp_path / "eval").exists()


def test_the_gcpl_comparison_config_branches_gcpl_with_only_lambda_changed():
  """eval_gcpl: every CoMPLe phase is a branch with GCPL's steps, lr and template; rows name them."""
  from mcti_jax.configs import eval_gcpl

  from mcti_jax.evaluation import evaluate, evaluators
  from mcti_jax.training import phases
  c = eval_gcpl.get_config()
  plan = phases.plan(c.train)
  gcpl_phase, branches = plan[0], plan[1:]
  assert gcpl_phase.settings.method == "gcpl" and [p.settings.lam for p in branches] == [0.0, 1e-4, 1e-3, 1e-2]
  for p in branches:
    assert p.settings.init == "initial" and p.settings.method == "comple"
    assert (p.settings.steps, p.settings.lr, p.settings.templates) == (
        gcpl_phase.settings.steps, gcpl_phase.settings.lr, gcpl_phase.settings.templates)
  for name, entry in evaluate.evals_of(c).items():
    evaluators.make(name, entry)
    assert (entry.get("phase") or entry.get("tokens")) in c.train.phases
