"""Discriminative Class Tokens: gradient skipping, memory, early stopping, device count, bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
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


# ------------------------------------------------------------------ early stopping, by hand


def test_early_stopping_keeps_the_best_token_and_stops_at_epoch_ends():
  cfg = Settings(frozen_settings({"images_per_update": 2, "epoch_size": 4, "stop_accuracy": 0.7, "patience": 2}))
  state = dct.class_state(jnp.zeros(3), cfg)
  history = []
  # (ce, acc) per update; epochs are 2 updates. Best ce 1.0 at update 1 (vectors = 1.0); epochs 2 and 3 don't
  # improve -> after epoch 3 (update 5), 2 stale epochs: stop. No epoch is > 70% right before.
  for step, (ce, acc) in enumerate([(2.0, 0.5), (1.0, 0.5), (1.5, 1.0), (1.2, 0.0), (3.0, 0.5), (1.1, 0.5)]):
    state = dct.next_state(state, jnp.full(3, float(step)), {"ce": jnp.float32(ce), "acc": jnp.float32(acc)},
                           jnp.int32(step), cfg)
    history.append(bool(state["training"]))
  assert history == [True, True, True, True, True, False]
  np.testing.assert_array_equal(dct.final_vectors(state, jnp.full(3, 9.0)), jnp.full(3, 1.0))
  # An epoch with 3 of 4 generations right (75% > 70%) stops at its end, not before.
  state = dct.class_state(jnp.zeros(3), cfg)
  state = dct.next_state(state, jnp.zeros(3), {"ce": jnp.float32(1.0), "acc": jnp.float32(1.0)}, jnp.int32(0), cfg)
  assert bool(state["training"])
  state = dct.next_state(state, jnp.zeros(3), {"ce": jnp.float32(1.0), "acc": jnp.float32(0.5)}, jnp.int32(1), cfg)
  assert not bool(state["training"])


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


@pytest.mark.slow
def test_a_stopped_class_is_frozen_while_the_others_train(tiny_checkpoint, tmp_path, biased_folder,
                                                           eight_device_run):
  """Class 0 targets b: all its generations are right, so it stops after its first epoch (one update) and
  exports the token that made them (the initial one); its generations stay the same after. Classes 1 and 2
  target a and c, are never right, and train on."""
  c = dct_config(tiny_checkpoint, tmp_path / "run", biased_folder, **{"classifier.targets": (1, 0, 2)})
  result = train.train(c, log=lambda *_: None)
  rows = [json.loads(line)["per_class"] for line in result.metrics.read_text().splitlines()]
  assert [r["training"] for r in rows] == [[0.0, 1.0, 1.0]] * 3
  assert [r["acc"][0] for r in rows] == [1.0] * 3
  assert rows[1]["ce"][0] == rows[2]["ce"][0]  # the same latents (one update per epoch) and a frozen token
  assert rows[1]["ce"][1] != rows[2]["ce"][1]  # a training class's token moves
  initial = _initial_tokens(tiny_checkpoint, 3)
  np.testing.assert_array_equal(result.tokens["dct"][0], initial[0])
  assert not np.allclose(result.tokens["dct"][1:], initial[1:])


@pytest.mark.slow
def test_the_phase_ends_once_every_class_has_stopped(tiny_checkpoint, tmp_path, biased_folder, eight_device_run):
  c = dct_config(tiny_checkpoint, tmp_path / "run", biased_folder, **{"classifier.targets": (1,)})
  c.phase.dct.steps = 40
  result = train.train(c, log=lambda *_: None)
  rows = [json.loads(line) for line in result.metrics.read_text().splitlines()]
  assert [(r["step"], r["training"]) for r in rows] == [(40, 0.0)]  # stopped after step 1; logged at the end
  np.testing.assert_array_equal(result.tokens["dct"], _initial_tokens(tiny_checkpoint, 1))
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
  }
  for i, (field, (value, message)) in enumerate(cases.items()):
    workdir = tmp_path / f"run{i}"
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
      train.train(dct_config(tiny_checkpoint, workdir, classifier_folder, **{field: value}), log=lambda *_: None)
    assert not workdir.exists(), field


def test_the_dct_preset_names_each_token_for_its_classifier_class(tiny_checkpoint, tmp_path):
  """dct:tiny with targets (3, 7): the tokens are the guide's "three" and "seven" (the preset's digit
  names once named them "zero" and "one"), and the generation templates say so."""
  from mcti_jax.configs import dct as dct_configs
  c = set_fields(dct_configs.get_config("tiny,names"), {"workdir": str(tmp_path / "run"),
                                                        "classifier.targets": (3, 7)})
  setup = setup_lib.prepare(c, log=lambda *_: None)
  assert setup.class_names == ["three", "seven"]
  assert setup.targets.tolist() == [3, 7] and [setup.classifier.class_names[t] for t in setup.targets] == \
      setup.class_names
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
