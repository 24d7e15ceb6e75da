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


# ------------------------------------------------------------ GCPL and CoMPLe


def test_gcpl_and_comple_configs_carry_the_papers_settings():
  """GCPL paper section 4.2 and Table 1, with its epochs in steps of this trainer (methods/gcpl.py, comple.py)."""
  from mcti_jax.configs import gcpl as gcpl_config
  from mcti_jax.errors import ConfigError
  from mcti_jax.methods import comple
  from mcti_jax.training import phases
  g = gcpl_config.get_config("cars")
  # 2000 epochs of 16 shots, 4 items per AdamW step (the authors' code accumulates 4; the paper gives no batch)
  assert (g.phase.gcpl.lr, g.phase.gcpl.steps, g.grad_accum, g.batch_per_class, g.data.n_shots) == (
      5e-4, 8000, 4, 1, 16)
  c = gcpl_config.get_config("cars,comple")
  s = c.phase.comple
  # 4000 epochs of 16 shots, one item per class and step, each in a batch of 4 classes; no clip
  assert (s.lr, s.steps, s.lam, s.batch, s.neg_clip, c.grad_accum) == (1e-3, 64000, 1e-3, 4, 0.0, 1)
  assert gcpl_config.get_config("cars,comple_all").phase.comple.batch == comple.ALL
  table_1 = {"cars": ("A photo of {}, a type of car.", "car"), "corn_seed": ("A photo of {} corn seed.", "seed"),
             "tissue": ("{} tissue.", "tissue"), "skin_lesion": ("{} skin lesion.", "skin"),
             "fractal": ("{} fractal.", "fractal")}
  for preset, (template, word) in table_1.items():
    p = gcpl_config.get_config(preset)
    assert (p.data.template, p.tokens.init_word) == (template, word), preset
  assert (gcpl_config.paper_steps("gcpl", 5), gcpl_config.paper_steps("comple", 5)) == (2500, 20000)
  c.phase.comple.batch = 1
  with pytest.raises(ConfigError, match=r"config.phase.comple.batch=1 must be an integer >= 2"):
    phases.plan(c)


def _eq_3_share(eps, pred, j, lam):
  """Prediction j's terms of eq. 3 for one batch (eps, pred [B, ...]), in float64: eq. 3 is their sum over j."""
  sq = lambda x: float(np.mean(np.square(x, dtype=np.float64)))  # noqa: E731
  b = len(eps)
  return sq(eps[j] - pred[j]) / b - lam / (b * (b - 1)) * sum(sq(eps[i] - pred[j]) for i in range(b) if i != j)


def _class_loss(comple, c, eps, pred, keys, everyone, cfg):
  """Class c's loss as the trainer makes it: its items' mean MSE, then its cross terms."""
  from types import SimpleNamespace

  import jax.numpy as jnp
  items = SimpleNamespace(prediction=jnp.asarray(pred[c]), target=jnp.asarray(eps[c]), keys=keys[c])
  mse = np.mean([float(comple.item_terms(SimpleNamespace(prediction=items.prediction[i], target=items.target[i]),
                                         None, cfg)["mse"]) for i in range(pred.shape[1])])
  return float(comple.loss({"mse": mse, **comple.cross_terms(items, c, everyone, cfg)}, cfg))


def test_comple_batch_of_4_equals_eq_3_in_numpy():
  """Eq. 3 for a batch of 4, by hand in numpy, against the trainer's per-class losses on the same predictions and
  noises. With 4 classes of one item each, every item's batch is all four, so their summed loss is 4 x eq. 3.

  With 7 classes of 2 items each, each item's batch is itself and 3 items of other classes that `batch_mates`
  drew for it; class k's loss is then 4 x the mean over its items of their shares of eq. 3 in their batches.
  A padded class (holding inf) takes no part.
  """
  from types import SimpleNamespace

  import jax.numpy as jnp

  from mcti_jax.methods import comple
  rng = np.random.default_rng(0)
  shape, lam = (2, 2, 3), 0.3
  cfg = SimpleNamespace(lam=lam, neg_clip=0.0, batch=4)
  for k, per_class in ((4, 1), (7, 2)):
    eps = rng.normal(size=(k + 1, per_class, *shape)).astype(np.float32)  # the last class is padding
    pred = rng.normal(size=(k + 1, per_class, *shape)).astype(np.float32)
    eps[k] = pred[k] = np.inf
    everyone = SimpleNamespace(target=jnp.asarray(eps), class_ids=jnp.arange(k + 1),
                               valid=jnp.asarray([True] * k + [False]))
    # Class c's items' keys, as Item.keys holds them: [per_class, 2, 2] (two raw keys per item).
    keys = [jax.random.split(jax.random.PRNGKey(c), per_class * 2).reshape(per_class, 2, 2) for c in range(k)]
    losses = [_class_loss(comple, c, eps, pred, keys, everyone, cfg) for c in range(k)]
    if k == 4:
      eq_3 = sum(_eq_3_share(eps[:k, 0], pred[:k, 0], j, lam) for j in range(k))
      assert sum(losses) / 4 == pytest.approx(eq_3, rel=1e-5, abs=1e-6)
      continue
    for c in range(k):
      shares = []
      for b in range(per_class):
        rows, items, ok = (np.asarray(x) for x in comple.batch_mates(keys[c][b][0], c, everyone, 4))
        assert ok.all() and len(set(rows)) == 3 and c not in rows and (rows < k).all()
        batch = [(c, b), *zip(rows, items)]  # the item first, then its batch-mates
        shares.append(_eq_3_share(np.stack([eps[r, i] for r, i in batch]), np.stack([pred[r, i] for r, i in batch]),
                                  0, lam))
      assert losses[c] == pytest.approx(4 * np.mean(shares), rel=1e-5, abs=1e-6), c


def test_comple_batch_mates_depend_on_class_ids_not_on_the_mesh():
  """The same classes in another order with more padding (another mesh) give an item the same batch-mates; over many
  keys each other class joins as often (3 of 6: half the time); with fewer classes than B the batch holds them all.
  """
  from types import SimpleNamespace

  import jax.numpy as jnp

  from mcti_jax.methods import comple
  ids = np.arange(7)
  target = np.random.default_rng(0).normal(size=(7, 2, 1)).astype(np.float32)

  def everyone(order, padding):
    rows = np.concatenate([order, np.zeros(padding, int)])  # padded slots copy class 0, as the trainer pads
    return SimpleNamespace(target=jnp.asarray(target[rows]), class_ids=jnp.asarray(ids[rows]),
                           valid=jnp.asarray([True] * len(order) + [False] * padding))

  a, b = everyone(ids, 1), everyone(np.array([3, 6, 0, 5, 1, 4, 2]), 3)

  def mates(key, k, e):
    rows, items, ok = comple.batch_mates(key, k, e, 4)
    return e.class_ids[rows], items, ok

  keys = jax.random.split(jax.random.PRNGKey(1), 2000)
  for k in (0, 5):
    got_a = jax.vmap(lambda key: mates(key, k, a))(keys)  # noqa: B023
    got_b = jax.vmap(lambda key: mates(key, k, b))(keys)  # noqa: B023
    for x, y in zip(got_a, got_b):
      np.testing.assert_array_equal(x, y)
    chosen = np.bincount(np.asarray(got_a[0]).ravel(), minlength=7) / len(keys)
    assert chosen[k] == 0 and np.all(np.abs(np.delete(chosen, k) - 0.5) < 0.05), chosen
  few = everyone(np.array([2, 4]), 6)  # 2 classes on 8 slots: class 2's batch is classes 2 and 4
  rows, _, ok = comple.batch_mates(keys[0], 2, few, 4)
  assert np.asarray(few.class_ids[rows])[np.asarray(ok)].tolist() == [4] and np.asarray(ok).sum() == 1


def test_comple_all_classes_loss_equals_its_formula_by_hand():
  """The all-classes variant (batch=0) on a hand-made step: K classes x B items, targets and predictions written
  down. Its loss is eq. 3's over the step's K x B items with pairs of the same class left out.

  The trainer sums class losses; with B items in every class that sum is K times that formula (each class's share
  of the pairs i != j is the same). One padded class takes no part, and pairs past `neg_clip` count `neg_clip`.
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

  keys = [None] * k  # the all-classes variant draws nothing
  everyone = SimpleNamespace(target=jnp.asarray(eps), class_ids=jnp.arange(k + 1), valid=jnp.asarray(valid))
  for clip, hand_clip in ((0.0, 1e9), (1e9, 1e9), (4.0, 4.0)):  # 0: no clip
    cfg = SimpleNamespace(lam=lam, neg_clip=clip, batch=comple.ALL)
    total = sum(_class_loss(comple, c, eps, pred, keys, everyone, cfg) for c in range(k))
    assert total / k == pytest.approx(by_hand(hand_clip), rel=1e-5, abs=1e-6), clip
  assert by_hand(4.0) != pytest.approx(by_hand(1e9))  # the clip was exercised


def _comple_config(checkpoint, workdir, devices):
  """GCPL, then CoMPLe at lambda 0 and at 1e-2 (batches of 4, and all classes), as branches from the initial
  tokens: one run. GCPL's and CoMPLe's default lrs differ (the paper's 5e-4 and 1e-3), so every phase takes the
  same lr (the tiny preset's), as it takes the same steps and templates: lambda 0 is then GCPL's settings."""
  from mcti_jax.configs import gcpl
  from conftest import tiny_train_config
  from mcti_jax import methods
  from mcti_jax.methods import comple
  c = tiny_train_config(checkpoint, workdir, num_devices=devices, **{"data.num_classes": 5})
  c.phases = ("gcpl", "comple0", "comple", "comple_all")
  c.phase = gcpl.get_config("tiny").phase  # GCPL's template and the tiny preset's lr
  # The TI templates, as test_train's runs: GCPL's step is then TI's program there, compiled once for both.
  c.phase.gcpl.steps, c.phase.gcpl.templates = 3, "ti"
  same = dict(steps=3, lr=c.phase.gcpl.lr, init="initial", templates="ti")
  c.phase.comple0 = methods.phase("comple", lam=0.0, **same)
  c.phase.comple = methods.phase("comple", lam=1e-2, **same)  # batches of 4
  c.phase.comple_all = methods.phase("comple", lam=1e-2, batch=comple.ALL, **same)
  return c


@pytest.fixture(scope="module")
def comple_runs(tiny_checkpoint, tmp_path_factory):
  """The four phases on 8 devices; both CoMPLe phases on 1 device, in passes of 2 classes (class_chunk: a branch
  draws what a run's first phase draws)."""
  base = tmp_path_factory.mktemp("comple")
  one = _comple_config(tiny_checkpoint, base / "d1", 1)
  one.phases, one.class_chunk = ("comple", "comple_all"), 2
  return {8: train.train(_comple_config(tiny_checkpoint, base / "d8", 8), log=lambda _: None),
          1: train.train(one, log=lambda _: None)}


@pytest.mark.slow
def test_comple_at_lambda_0_is_gcpl_bit_for_bit(comple_runs):
  r = comple_runs[8]
  np.testing.assert_array_equal(r.tokens["comple0"], r.tokens["gcpl"])
  for name in ("comple", "comple_all"):  # the negative term moved the tokens, each its own way
    assert np.abs(r.tokens[name] - r.tokens["gcpl"]).max() > 1e-7, name
  assert np.abs(r.tokens["comple"] - r.tokens["comple_all"]).max() > 1e-7
  manifest = export.load_tokens(r.exports["gcpl"])[1]
  assert manifest["method"] == "gcpl" and manifest["templates"][0] == "a photo of a {}"


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["comple", "comple_all"])
def test_comple_on_8_devices_equals_1_device_in_passes_of_2_classes(comple_runs, phase):
  """The negatives are gathered over the mesh, and a batch's classes are drawn from class ids alone: 5 classes on 8
  devices (3 padded) train as on 1 device running them in passes of 2 (class_chunk)."""
  np.testing.assert_allclose(comple_runs[8].tokens[phase], comple_runs[1].tokens[phase], atol=2e-6, rtol=0)
  rows = [json.loads(line) for line in comple_runs[8].metrics.read_text().splitlines()]
  last = [r for r in rows if r["phase"] == phase][-1]
  assert {"mse", "neg", "neg_raw", "neg_clipped"} <= set(last) and 0 < last["neg"] == last["neg_raw"]
  assert last["neg_clipped"] == 0  # no clip by default


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
  """eval_gcpl: every CoMPLe phase is a branch with GCPL's steps, lr and template; rows name them. Its negatives
  variant: the two kinds of negatives at one lambda."""
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
  batches, every = phases.plan(eval_gcpl.get_config("negatives").train)  # one lambda, two kinds of negatives
  assert (batches.settings.batch, every.settings.batch, batches.settings.init, every.settings.init) == (
      4, 0, "initial", "initial")
  want = dict(lam=1e-2, neg_clip=0.0, **{f: gcpl_phase.settings[f] for f in ("steps", "lr", "templates")})
  for field, value in want.items():
    assert batches.settings[field] == every.settings[field] == value, field
