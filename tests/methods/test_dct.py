"""Discriminative Class Tokens: gradient skipping, memory, early stopping and the kept token as the authors' code has
them, the paper's prompts, device count, bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import dct_config, set_fields
from mcti_jax import guides
from mcti_jax.generation import sampling
from mcti_jax.training import train
from mcti_jax.training import setup as setup_lib
from mcti_jax.guides import file as classifier_file
from mcti_jax.errors import ConfigError
from mcti_jax.methods import dct
from mcti_jax.models import pipeline
from mcti_jax.models import vae as vae_lib
from mcti_jax.models.frozen import freeze
from mcti_jax.training.step import Backbone, Settings, frozen_settings

LAYERS = ({"type": "conv", "name": "conv", "features": 4, "kernel": 3, "stride": 2, "padding": "SAME"},
          {"type": "relu"}, {"type": "flatten"}, {"type": "dense", "name": "fc", "features": 3})


def random_classifier(seed: int = 0, size: int = 16) -> guides.Classifier:
  transform = guides.Transform(crop=(size, size), mean=(0.5,), std=(0.25,))
  return classifier_file.init(LAYERS, ("a", "b", "c"), transform, jax.random.key(seed))


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("guide") / "random_guide"
  classifier_file.save(folder, random_classifier())
  return folder


# ------------------------------------------------------------------ gradient skipping


@pytest.mark.slow
def test_gradient_of_the_loop_is_the_gradient_of_the_last_step_at_its_fixed_input(tiny_checkpoint):
  """DCT's loss through 3 DDIM steps (text encoder, UNet, guidance, decode, classifier): its gradient in the token
  equals that of ONE guided step, written here by hand, applied to the loop's x_{t_1} held constant."""
  from mcti_jax.tokens import conditioning
  from mcti_jax.tokens import placeholders as tok
  sd = pipeline.load_stable_diffusion(tiny_checkpoint / "sd")
  class_tokens = tok.add_class_tokens(sd.tokenizer, 2, 1)
  ids = jnp.asarray(np.repeat(tok.template_ids(sd.tokenizer, ("a photo of a {}",), class_tokens), 2, axis=0))
  first_id, k = int(class_tokens.ids[0, 0]), 1
  classifier = random_classifier()
  text_encoder = freeze(sd.text_encoder)
  uncond = conditioning.encode_prompts(text_encoder, sd.tokenizer, [""])[0]
  backbone = Backbone(text_encoder=text_encoder, unet=freeze(sd.unet), schedule=sd.schedule, clip=None,
                      scaling_factor=sd.scaling_factor,
                      parts={"vae": freeze(sd.vae), "classifier": classifier, "uncond_context": uncond})
  cfg = Settings(frozen_settings({"sampling_steps": 3, "guidance": 3.0}))
  latents = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  vectors = jax.random.normal(jax.random.key(1), (1, sd.text_width)) * 0.1
  target = jnp.asarray([2, 0])

  def loss_of(images):
    return -jnp.sum(jax.nn.log_softmax(classifier(images))[jnp.arange(2), target])

  def loop_loss(v):
    return loss_of(dct.generate(v, k, latents, ids, backbone, cfg, first_placeholder_id=first_id, pooling="eos"))

  timesteps = jnp.asarray(sampling.ddim_timesteps(sd.schedule.config, 3))
  unet = backbone.unet.module

  def context_of(v):
    k_ids = tok.ids_for_class(ids, first_id, 1, k)
    embeds = tok.splice(tok.token_table(text_encoder.module), k_ids, jnp.asarray([first_id + k]), v)
    return text_encoder.module(k_ids, inputs_embeds=embeds)[0]

  def guided_step(x, t, context):  # one DDIM step with classifier-free guidance, by hand
    both = jnp.concatenate([jnp.broadcast_to(uncond, context.shape), context])
    out = unet(jnp.concatenate([x, x]), t, both)
    eps = out[:2] + 3.0 * (out[2:] - out[:2])
    return sampling.ddim_step(sd.schedule, eps, t, x, 3)

  @jax.jit
  def x_t1(v):  # the first two steps
    x, context = latents, context_of(v)
    for t in timesteps[:2]:
      x = guided_step(x, t, context)
    return x

  fixed = x_t1(vectors)

  def one_step_loss(v):
    return loss_of(vae_lib.decode_images(backbone.parts["vae"].module, guided_step(fixed, timesteps[2], context_of(v))))

  (value, grad), (want_value, want) = (jax.jit(jax.value_and_grad(f))(vectors) for f in (loop_loss, one_step_loss))
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))
  assert float(jnp.abs(want).max()) > 0  # the token matters


# ------------------------------------------------------------------ early stopping and the kept token, by hand


def _settings(**fields) -> Settings:
  """The method's defaults, some changed: what `cfg` is in the trainer."""
  return Settings(frozen_settings({**dct.defaults().to_dict(), **fields}))


def _authors_stop(losses, accs, images_per_update, epoch_size, patience, stop_accuracy=0.7):
  """The update after which the authors' run.py stops (None: it never does), its loop transcribed: `min_loss`,
  `current_early_stopping` and `correct` as there, one sync (update) per `images_per_update` images."""
  min_loss, counter, correct = np.inf, patience, 0
  for update, (loss, acc) in enumerate(zip(losses, accs)):
    correct += acc * images_per_update
    if loss < min_loss:
      min_loss, counter = loss, patience
    else:
      counter -= 1
    if (update + 1) % (epoch_size // images_per_update) == 0:  # the end of an epoch
      if correct / epoch_size > stop_accuracy or counter < 0:
        return update
      correct = 0
  return None


def _our_stop(losses, accs, cfg):
  state = dct.class_state(jnp.zeros(3), cfg)
  for step, (ce, acc) in enumerate(zip(losses, accs)):
    state = dct.next_state(state, jnp.zeros(3), {"ce": jnp.float32(ce), "acc": jnp.float32(acc)}, jnp.int32(step),
                           cfg)
    if not bool(state["training"]):
      return step
  return None


def test_patience_stops_a_class_where_the_authors_code_does():
  """One update an epoch (the authors' 5 of 5), patience 3. Their counter: 3 at epoch 0 (new lowest 5.0), 3 at
  epoch 1 (4.0), then 2, 1, 0 at epochs 2-4; epoch 5 sets a new lowest (3.9): 3; epochs 6-9 take it to 2, 1, 0,
  -1: it stops after epoch 9, the 10th. (Stopping at 3 stale epochs, one short, stopped after epoch 8.)"""
  cfg = _settings(images_per_update=5, epoch_size=5, patience=3)
  losses = [5.0, 4.0, 4.5, 4.2, 4.1, 3.9, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]
  accs = [0.4] * len(losses)  # 2 of 5 right: never above 70%
  assert _authors_stop(losses, accs, 5, 5, 3) == 9
  assert _our_stop(losses, accs, cfg) == 9
  # A new lowest loss at the last chance resets the count: no stop.
  assert _our_stop(losses[:9] + [3.8, 4.0, 4.0], accs, cfg) is None
  # patience 0: the first update without a new lowest loss.
  zero = _settings(images_per_update=5, epoch_size=5, patience=0)
  assert _our_stop(losses, accs, zero) == _authors_stop(losses, accs, 5, 5, 0) == 2


def test_the_count_is_per_update_and_checked_at_epoch_ends_as_the_authors_do():
  """Two updates an epoch: random losses and accuracies (mostly patience stops, a few accuracy ones), our
  stopping update against the transcribed loop."""
  rng = np.random.default_rng(0)
  for patience in (0, 1, 3, 6):
    cfg = _settings(images_per_update=2, epoch_size=4, patience=patience)
    for _ in range(25):
      losses = rng.uniform(0.0, 1.0, 24).round(1)  # ties: not a new lowest, in both
      accs = rng.choice([0.0, 0.5, 1.0], 24, p=[0.6, 0.38, 0.02])
      assert _our_stop(losses, accs, cfg) == _authors_stop(losses, accs, 2, 4, patience), (patience, losses, accs)


def test_an_epoch_over_the_accuracy_stops_at_its_end_not_before():
  cfg = _settings(images_per_update=2, epoch_size=4, patience=2)
  state = dct.class_state(jnp.zeros(3), cfg)
  state = dct.next_state(state, jnp.zeros(3), {"ce": jnp.float32(1.0), "acc": jnp.float32(1.0)}, jnp.int32(0), cfg)
  assert bool(state["training"])
  # 3 of 4 generations right: 75% > 70%.
  state = dct.next_state(state, jnp.zeros(3), {"ce": jnp.float32(1.0), "acc": jnp.float32(0.5)}, jnp.int32(1), cfg)
  assert not bool(state["training"])


def _hand_run(losses, kept_updates):
  """The trainer's order by hand, on a toy token: step s scores `vectors` (loss losses[s]), next_state sees them,
  then one AdamW update (make_optimizer, the trainer's) of a fixed gradient moves them. Returns the phase's export
  and the token after each update."""
  from mcti_jax.training.step import make_optimizer
  cfg = _settings(images_per_update=1, epoch_size=1, kept_updates=kept_updates)
  optimizer = make_optimizer(1e-2, 1e-2)
  vectors = jnp.asarray([[0.5, -1.0, 2.0]])
  opt_state = optimizer.init(vectors)
  state = dct.class_state(vectors, cfg)
  after = []
  for step, ce in enumerate(losses):
    state = dct.next_state(state, vectors, {"ce": jnp.float32(ce), "acc": jnp.float32(0.0)}, jnp.int32(step), cfg)
    updates, opt_state = optimizer.update(jnp.asarray([[1.0, -2.0, 0.5]]) * (step + 1), opt_state, vectors)
    vectors = optax.apply_updates(vectors, updates)
    after.append(vectors)
  return dct.final_vectors(state, vectors), after


def test_the_kept_token_is_the_one_after_the_update_of_the_lowest_loss():
  """Lowest loss at step 1: the export is the token after step 1's update (kept_updates=1, the default and the
  authors'), or the one before it, which made the loss (0); a lowest loss at the last step keeps the final token."""
  assert dct.defaults().kept_updates == 1
  losses = [3.0, 1.0, 2.0, 1.5]
  kept, after = _hand_run(losses, 1)
  np.testing.assert_array_equal(kept, after[1])
  kept, after = _hand_run(losses, 0)
  np.testing.assert_array_equal(kept, after[0])  # the token step 1 scored: the one after step 0's update
  kept, after = _hand_run([3.0, 2.0, 1.0], 1)
  np.testing.assert_array_equal(kept, after[2])
  kept, after = _hand_run([3.0, 2.0, 1.0], 0)
  np.testing.assert_array_equal(kept, after[1])
  assert not np.allclose(after[1], after[2])


# ------------------------------------------------------------------ the trainer


# The trainer tests below that run on 8 devices take `eight_device_run` first: its step is compiled once and the
# others load it from the compile cache (conftest), since only traced values (targets, weights, steps) differ.
@pytest.fixture(scope="module")
def eight_device_run(tiny_checkpoint, tmp_path_factory, classifier_folder):
  workdir = tmp_path_factory.mktemp("dct8") / "run"
  return train.train(dct_config(tiny_checkpoint, workdir, classifier_folder), log=lambda *_: None)


@pytest.fixture(scope="module")
def one_device_run(tiny_checkpoint, tmp_path_factory, classifier_folder):
  workdir = tmp_path_factory.mktemp("dct1") / "run"
  return train.train(dct_config(tiny_checkpoint, workdir, classifier_folder, num_devices=1), log=lambda *_: None)


@pytest.mark.slow
def test_one_device_equals_eight_devices(one_device_run, eight_device_run):
  """3 classes padded to 8 on 8 devices, against 3 on one: the same tokens and per-class curves."""
  one = one_device_run
  np.testing.assert_allclose(one.tokens["dct"], eight_device_run.tokens["dct"], rtol=1e-5, atol=1e-6)
  rows = [[json.loads(line)["per_class"] for line in r.metrics.read_text().splitlines()]
          for r in (one, eight_device_run)]
  np.testing.assert_allclose([r["ce"] for r in rows[0]], [r["ce"] for r in rows[1]], rtol=1e-5)
  assert not np.allclose(one.tokens["dct"][0], one.tokens["dct"][1])  # classes learned different tokens
  assert one.shots is None and (eight_device_run.workdir / "class_curves.png").is_file()
  manifest = json.loads((eight_device_run.exports["dct"] / "manifest.json").read_text())
  assert manifest["classifier"]["type"] == "file" and manifest["classifier"]["targets"] == [2, 0, 1]
  assert [c["name"] for c in manifest["classes"]] == ["c", "a", "b"]  # the classifier's names of the targets
  assert manifest["classifier"]["target_names"] == ["c", "a", "b"]


@pytest.mark.slow
def test_a_resumed_run_equals_an_uninterrupted_one(tiny_checkpoint, tmp_path, classifier_folder, eight_device_run):
  """2 steps, then the same run extended to 3: the early-stopping state comes back from the checkpoint."""
  workdir = tmp_path / "run"
  train.train(dct_config(tiny_checkpoint, workdir, classifier_folder, **{"phase.dct.steps": 2}), log=lambda *_: None)
  resumed = train.train(dct_config(tiny_checkpoint, workdir, classifier_folder), log=lambda *_: None)
  np.testing.assert_array_equal(resumed.tokens["dct"], eight_device_run.tokens["dct"])
  assert resumed.metrics.read_text().count("\n") == 3
  rows = [[json.loads(line)["per_class"] for line in r.metrics.read_text().splitlines()]
          for r in (resumed, eight_device_run)]
  assert rows[0] == rows[1]


@pytest.fixture(scope="module")
def biased_folder(tmp_path_factory):
  """The random classifier with +100 on class b's logit: every image is classified as b."""
  c = random_classifier()
  params = {k: np.asarray(v) for k, v in c.params.items()}
  params["fc.bias"] = params["fc.bias"] + np.asarray([0.0, 100.0, 0.0], np.float32)
  folder = tmp_path_factory.mktemp("biased") / "guide"
  classifier_file.save(folder, classifier_file.build(LAYERS, params, c.class_names, c.transform))
  return folder


def _initial_tokens(tiny_checkpoint, num_classes):
  from mcti_jax.training import token_init
  from mcti_jax.tokens import placeholders as tok
  sd = pipeline.load_stable_diffusion(tiny_checkpoint / "sd")
  table = np.asarray(tok.token_table(sd.text_encoder), np.float32)
  return token_init.from_word(sd.tokenizer, table, "digit", np.ones(num_classes, np.int32))


def _one_update(tokens, settings):
  """By hand: the trainer's first AdamW update of `tokens` with a zero gradient (weight decay alone)."""
  from mcti_jax.training.step import make_optimizer
  optimizer = make_optimizer(settings.lr, settings.weight_decay)
  tokens = jnp.asarray(tokens)
  updates, _ = optimizer.update(jnp.zeros_like(tokens), optimizer.init(tokens), tokens)
  return np.asarray(optax.apply_updates(tokens, updates))


@pytest.mark.slow
def test_a_stopped_class_is_frozen_while_the_others_train(tiny_checkpoint, tmp_path, biased_folder,
                                                           eight_device_run):
  """Class 0 targets b: all its generations are right, so it stops after its first epoch (one update) and
  exports the token right after that update (the authors' choice), which its later generations use; its
  generations stay the same after. Classes 1 and 2 target a and c, are never right, and train on."""
  c = dct_config(tiny_checkpoint, tmp_path / "run", biased_folder, **{"classifier.targets": (1, 0, 2)})
  result = train.train(c, log=lambda *_: None)
  rows = [json.loads(line)["per_class"] for line in result.metrics.read_text().splitlines()]
  assert [r["training"] for r in rows] == [[0.0, 1.0, 1.0]] * 3
  assert [r["acc"][0] for r in rows] == [1.0] * 3
  assert rows[1]["ce"][0] == rows[2]["ce"][0]  # the same latents (one update per epoch) and a frozen token
  assert rows[1]["ce"][1] != rows[2]["ce"][1]  # a training class's token moves
  initial = _initial_tokens(tiny_checkpoint, 3)
  # b's logit is 100 above the others: its softmax is 1 in float32, the CE and its gradient 0, so the one update
  # is AdamW's weight decay alone.
  assert rows[0]["ce"][0] == 0.0
  np.testing.assert_array_equal(result.tokens["dct"][0], _one_update(initial[0], c.phase.dct))
  assert not np.array_equal(result.tokens["dct"][0], initial[0])
  assert not np.allclose(result.tokens["dct"][1:], initial[1:])


@pytest.mark.slow
def test_the_phase_ends_once_every_class_has_stopped(tiny_checkpoint, tmp_path, biased_folder, eight_device_run):
  c = dct_config(tiny_checkpoint, tmp_path / "run", biased_folder, **{"classifier.targets": (1,)})
  c.phase.dct.steps = 40
  result = train.train(c, log=lambda *_: None)
  rows = [json.loads(line) for line in result.metrics.read_text().splitlines()]
  assert [(r["step"], r["training"]) for r in rows] == [(40, 0.0)]  # stopped after step 1; logged at the end
  np.testing.assert_array_equal(result.tokens["dct"], _one_update(_initial_tokens(tiny_checkpoint, 1), c.phase.dct))
  assert (result.workdir / "checkpoints" / "40").is_dir()


@pytest.mark.slow
def test_step_memory_does_not_grow_with_the_sampling_steps(tiny_checkpoint, tmp_path, classifier_folder,
                                                            one_device_run):
  """XLA's temporary memory of the compiled training step: 30 DDIM steps within 10% of 10 (the loop's first
  steps keep no activations for the backward pass). The 10-step program is the one-device run's (cached)."""
  import dataclasses
  from mcti_jax.training.step import TrainState, init_class_state, make_optimizer
  setup = setup_lib.prepare(dct_config(tiny_checkpoint, tmp_path / "run", classifier_folder, num_devices=1),
                        log=lambda *_: None)
  backbone = jax.device_put(setup_lib.make_backbone(setup), setup.data.valid.sharding)
  template_ids = jax.device_put(jnp.asarray(setup.template_ids["dct"]), setup.data.valid.sharding)
  clock = jax.device_put((jnp.int32(0), jnp.int32(0)), setup.data.valid.sharding)
  memory = {}
  for steps in (10, 30):
    settings = setup.plan[0].settings.copy_and_resolve_references()
    settings.sampling_steps = steps
    phase = dataclasses.replace(setup.plan[0], settings=settings)
    optimizer = make_optimizer(settings.lr, settings.weight_decay)
    state = TrainState(step=jnp.int32(0), tokens=setup.init_tokens, opt_state=optimizer.init(setup.init_tokens),
                       key=jax.random.PRNGKey(0),
                       class_state=init_class_state(phase.method, setup.init_tokens, phase.method_settings))
    state = jax.device_put(state, train._state_shardings(state, setup))  # as the trainer places it
    compiled = train.compile_step(setup, phase, optimizer, state, backbone, template_ids, clock)
    memory[steps] = compiled.memory_analysis().temp_size_in_bytes
  assert memory[10] > 0 and abs(memory[30] - memory[10]) <= 0.1 * memory[10], memory


def test_named_templates_hold_each_class_name(tiny_checkpoint):
  """"{} {name}" (the semantic case) gives per-class prompts [K', T, L]: class k's token, then its name."""
  from mcti_jax.tokens import placeholders as tok
  from mcti_jax.models import tokenizer as tokenizer_lib
  sd = pipeline.load_stable_diffusion(tiny_checkpoint / "sd")
  class_tokens = tok.add_class_tokens(sd.tokenizer, 2, 1)
  ids = setup_lib._template_ids(sd.tokenizer, ("a photo of {} {name}",), class_tokens, ["cat", "dog"], 4)
  assert ids.shape == (4, 1, 77)
  for k, name in enumerate(["cat", "dog", "cat", "cat"]):  # padded classes take the first name
    want = tokenizer_lib.encode(sd.tokenizer, [f"a photo of <cls-0> {name}"])[0]
    np.testing.assert_array_equal(ids[k, 0], want)


# ------------------------------------------------------------------ bad input


def test_bad_input_is_refused_before_anything_is_written(tiny_checkpoint, tmp_path, classifier_folder):
  cases = {
      "classifier.type": ("", "learn from a classifier, but config.classifier.type is unset"),
      "classifier.targets": ((0, 3), "out of range: the classifier has 3 classes"),
      "classifier.path": (str(tmp_path / "nowhere"), "nowhere"),
      "phase.dct.epoch_size": (3, "epoch_size=3 must be a multiple of images_per_update=2"),
      "phase.dct.sampling_steps": (0, "sampling_steps=0 must be an integer >= 1"),
      "phase.dct.patience": (-1, "patience=-1 must be an integer >= 0"),
      "phase.dct.kept_updates": (2, "kept_updates=2 must be 1 (the token after the lowest-loss update) or 0"),
  }
  for i, (field, (value, message)) in enumerate(cases.items()):
    workdir = tmp_path / f"run{i}"
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
      train.train(dct_config(tiny_checkpoint, workdir, classifier_folder, **{field: value}), log=lambda *_: None)
    assert not workdir.exists(), field


def test_the_default_prompts_are_the_papers_with_the_class_name():
  """Sec. 3: "A photo of a S_c label"; design choice (ii): the two training prompts. Every preset but the attribute
  one holds the name; `,no_names` drops it and nothing else."""
  from mcti_jax.configs import dct as dct_configs
  assert dct.defaults().templates == ("A high-resolution realistic image of a {} {name}", "A photo of {} {name}")
  assert dct_configs.get_config("sd").phase.dct.templates == dct.TEMPLATES
  assert dct_configs.get_config("tiny").phase.dct.templates == ("a photo of a {} {name}",)
  assert dct_configs.get_config("sd,no_names").phase.dct.templates == ("A high-resolution realistic image of a {}",
                                                                       "A photo of {}")
  assert dct_configs.get_config("tiny,no_names").phase.dct.templates == ("a photo of a {}",)
  assert dct_configs.get_config("sd,names").phase.dct.templates == dct.TEMPLATES  # the old spelling
  for arg in ("tiny_slant,no_names", "sd,nonames"):
    with pytest.raises(ValueError, match="choose one of sd, tiny, tiny_slant, sd,no_names, tiny,no_names"):
      dct_configs.get_config(arg)


def test_the_sd_preset_takes_the_authors_schedule_and_stopping():
  """The authors' code: 50 epochs of one update of 5 images, 30 sampling steps, guidance 7, patience 15, the
  post-update token; lr 0.00025 * 5."""
  from mcti_jax.configs import dct as dct_configs
  phase = dct_configs.get_config("sd").phase.dct
  assert phase.steps == 50 and phase.epoch_size == phase.images_per_update == 5
  assert (phase.sampling_steps, phase.guidance, phase.patience, phase.stop_accuracy) == (30, 7.0, 15, 0.7)
  assert phase.kept_updates == 1 and phase.lr == pytest.approx(1.25e-3) and phase.weight_decay == 1e-2


def test_the_dct_preset_names_each_token_for_its_classifier_class(tiny_checkpoint, tmp_path):
  """dct:tiny with targets (3, 7): the tokens are the guide's "three" and "seven" (the preset's digit
  names once named them "zero" and "one"), and each class's prompt holds its token, then its name."""
  from mcti_jax.configs import dct as dct_configs
  from mcti_jax.models import tokenizer as tokenizer_lib
  c = set_fields(dct_configs.get_config("tiny"), {"workdir": str(tmp_path / "run"), "classifier.targets": (3, 7)})
  setup = setup_lib.prepare(c, log=lambda *_: None)
  assert setup.class_names == ["three", "seven"]
  assert setup.targets.tolist() == [3, 7] and [setup.classifier.class_names[t] for t in setup.targets] == \
      setup.class_names
  ids = np.asarray(setup.template_ids["dct"])
  for k, name in enumerate(["three", "seven"]):  # class 0's token in every row: the step puts class k's in
    want = tokenizer_lib.encode(setup.sd.tokenizer, [f"a photo of a <cls-0> {name}"])[0]
    np.testing.assert_array_equal(ids[k, 0], want)
  c.data.class_names = ("zero", "one")  # a name for another class than the token's is refused
  with pytest.raises(ConfigError, match=r"learned for the classifier's classes at classifier.targets, "
                                        r"\('three', 'seven'\): their names; drop data.class_names"):
    setup_lib.prepare(c, log=lambda *_: None)


def test_a_repeated_target_is_refused_before_anything_is_written(tiny_checkpoint, tmp_path, classifier_folder):
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match=r"targets=\(0, 2, 0\) names class 0 \(a\) twice \(positions 0 and 2\)"):
    train.train(dct_config(tiny_checkpoint, workdir, classifier_folder, **{"classifier.targets": (0, 2, 0)}),
                log=lambda *_: None)
  assert not workdir.exists()


def test_a_classifier_of_the_wrong_class_count_is_refused(tmp_path):
  classifier = random_classifier()
  bad = tmp_path / "bad"
  classifier_file.save(bad, classifier)
  config = json.loads((bad / "classifier.json").read_text())
  config["class_names"] = config["class_names"][:2]  # 2 names, 3 outputs
  (bad / "classifier.json").write_text(json.dumps(config))
  with pytest.raises(Exception, match="3"):
    guides.load({"type": "file", "path": str(bad)})
