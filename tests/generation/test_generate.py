"""DDIM + classifier-free guidance against diffusers, its gradient, sharded generation, the command, the metric.

Every full-generation test uses the same shapes (2 prompts x 3 images, 4 steps,
guidance 3 -> 8-image chunks on 8 devices), so they share one compiled program.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import max_abs_diff
from mcti_jax.generation import clip_similarity as CS
from mcti_jax.tokens import export
from mcti_jax.runtime import parallel
from mcti_jax.generation import command as generate_command
from mcti_jax.generation import generate as G
from mcti_jax.generation import sampling as S
from mcti_jax.tokens import placeholders as tok
from mcti_jax.tokens.conditioning import LearnedTokens, encode_prompts
from mcti_jax.models import pipeline
from mcti_jax.models.frozen import freeze
from mcti_jax.models.schedule import NoiseSchedule, SchedulerConfig

PROMPTS = ["a photo of the digit seven", "a dark photo of a small cat"]
N, STEPS, GUIDANCE = 3, 4, 3.0

SD_SCHEDULE = SchedulerConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
SCHEDULES = {
    "sd15": SD_SCHEDULE,
    "sd2_v": dataclasses.replace(SD_SCHEDULE, prediction_type="v_prediction", timestep_spacing="trailing",
                                 set_alpha_to_one=True, steps_offset=0),
    "linspace_clip_x0": SchedulerConfig(timestep_spacing="linspace", clip_sample=True, clip_sample_range=0.5,
                                        prediction_type="sample"),
    "ddim_default_v": SchedulerConfig(prediction_type="v_prediction"),
}


def _diffusers_ddim(config: SchedulerConfig):
  from diffusers import DDIMScheduler
  return DDIMScheduler.from_config(config.to_hf("DDIMScheduler"))


@pytest.fixture(scope="module")
def sd(tiny_checkpoint):
  return pipeline.load_stable_diffusion(tiny_checkpoint / "sd")


def _export(folder, num_classes, num_vectors, width, seed=0):
  """A token export as `mcti train` writes it (random vectors, large enough to change the images)."""
  rng = np.random.default_rng(seed)
  names = tok.token_names(num_classes, num_vectors)
  class_tokens = tok.ClassTokens(names, np.arange(num_classes * num_vectors).reshape(num_classes, num_vectors))
  vectors = rng.normal(0, 0.5, (num_classes, num_vectors, width)).astype(np.float32)
  export.export_tokens(folder, vectors, class_tokens, [f"class{k}" for k in range(num_classes)],
                       info={"base_model": "tiny"})
  return folder


# ------------------------------------------------------------------ DDIM vs diffusers


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("steps", [1, 7, 50, 999])
def test_timesteps_equal_diffusers(name, steps):
  theirs = _diffusers_ddim(SCHEDULES[name])
  theirs.set_timesteps(steps)
  np.testing.assert_array_equal(S.ddim_timesteps(SCHEDULES[name], steps), theirs.timesteps.numpy())


def test_timesteps_refuse_too_many_steps():
  with pytest.raises(ValueError, match="1..1000"):
    S.ddim_timesteps(SD_SCHEDULE, 1001)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_ddim_step_equals_diffusers(name):
  config, steps = SCHEDULES[name], 7
  theirs = _diffusers_ddim(config)
  theirs.set_timesteps(steps)
  schedule = NoiseSchedule.from_config(config)
  step = jax.jit(S.ddim_step, static_argnames="num_steps")
  rng = np.random.default_rng(0)
  worst = 0.0
  for t in S.ddim_timesteps(config, steps):
    output, sample = (rng.normal(size=(2, 4, 4, 3)).astype(np.float32) for _ in range(2))
    want = theirs.step(torch.from_numpy(output), int(t), torch.from_numpy(sample), eta=0.0).prev_sample.numpy()
    got = step(schedule, jnp.asarray(output), jnp.int32(t), jnp.asarray(sample), num_steps=steps)
    worst = max(worst, max_abs_diff(got, want) / max(1.0, np.abs(want).max()))
  assert worst <= 1e-5, worst


def test_thresholding_is_refused(sd):
  with pytest.raises(ValueError, match="thresholding"):
    G.generate(dataclasses.replace(sd, schedule=NoiseSchedule.from_config(
        dataclasses.replace(SD_SCHEDULE, thresholding=True))), ["a photo"], steps=2)


# ------------------------------------------------------------------ guidance


@pytest.fixture(scope="module")
def one_step(sd):
  """Inputs of a one-step schedule [981], and the UNet's conditional and unconditional predictions there."""
  text = freeze(sd.text_encoder)
  context = encode_prompts(text, sd.tokenizer, PROMPTS)[0]
  uncond = encode_prompts(text, sd.tokenizer, [""])[0]
  latents = S.initial_latents(0, jnp.arange(2), G.latent_shape(sd))
  unet, t = freeze(sd.unet), 981
  predict = jax.jit(lambda unet, c: unet.module(latents, t, c))
  eps_c = np.asarray(predict(unet, context), np.float64)
  eps_u = np.asarray(predict(unet, jnp.broadcast_to(uncond, context.shape)), np.float64)
  return dict(unet=unet, context=context, uncond=uncond, latents=latents, t=t, eps_c=eps_c, eps_u=eps_u)


_denoise = jax.jit(lambda unet, schedule, *a, use_cfg: S.denoise(unet.module, schedule, *a, use_cfg=use_cfg),
                   static_argnames="use_cfg")


def _ddim_by_hand(sd, x, t, eps):
  """One DDIM step from t with a one-step schedule: it lands on abar_0 (set_alpha_to_one is false)."""
  assert not sd.schedule.config.set_alpha_to_one
  abar = np.asarray(sd.schedule.alphas_cumprod, np.float64)
  x0 = (np.asarray(x, np.float64) - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
  return np.sqrt(abar[0]) * x0 + np.sqrt(1 - abar[0]) * eps


def _run(sd, s, guidance, use_cfg):
  return _denoise(s["unet"], sd.schedule, s["latents"], s["context"], s["uncond"], jnp.asarray([s["t"]]), guidance,
                  use_cfg=use_cfg)


def test_one_guided_step_by_hand(sd, one_step):
  s, g = one_step, 3.0
  want = _ddim_by_hand(sd, s["latents"], s["t"], s["eps_u"] + g * (s["eps_c"] - s["eps_u"]))
  assert max_abs_diff(_run(sd, s, g, use_cfg=True), want) <= 1e-4
  assert max_abs_diff(s["eps_c"], s["eps_u"]) > 1e-2  # the prompts give different predictions


def test_guidance_one_equals_the_conditional_prediction_alone(sd, one_step):
  s = one_step
  cond_only = _ddim_by_hand(sd, s["latents"], s["t"], s["eps_c"])
  assert max_abs_diff(_run(sd, s, 1.0, use_cfg=False), cond_only) <= 1e-4
  assert max_abs_diff(_run(sd, s, 1.0, use_cfg=True), cond_only) <= 1e-4
  assert max_abs_diff(_run(sd, s, 0.0, use_cfg=True), cond_only) > 1e-2  # g=0 is the "" prompt: tellable apart


def test_gradient_through_the_sampler_equals_finite_differences(sd, one_step):
  """jax.grad of 2 guided DDIM steps of the UNet w.r.t. the conditioning, along a random direction, vs a central
  difference (one compiled program serves both)."""
  s = one_step
  noise, context = s["latents"][:1], s["context"][:1]
  rng = np.random.default_rng(0)
  weights = jnp.asarray(rng.normal(size=noise.shape), jnp.float32)
  direction = jnp.asarray(rng.normal(size=context.shape), jnp.float32)

  @jax.jit
  @jax.value_and_grad
  def objective(c, unet):
    return jnp.sum(weights * S.sample(unet, sd.schedule, noise, c, s["uncond"], 3.0, 2))

  _, grad = objective(context, s["unet"])
  eps = 1e-2
  plus, minus = (objective(context + e * direction, s["unet"])[0] for e in (eps, -eps))
  want = (float(plus) - float(minus)) / (2 * eps)
  got = float(jnp.vdot(grad, direction))
  assert abs(got - want) <= 1e-2 * abs(want), (got, want)
  assert abs(want) > 1e-3  # the conditioning matters


def test_grad_last_step_only_differentiates_the_last_step_alone(sd):
  """Same values; the gradient is that of the last step from the (constant) latents before it. A toy denoiser."""
  def toy(x, t, c):  # any callable (x [B, h, w, c], t, context [B, S, D]) -> prediction serves as the UNet
    return jnp.tanh(x + c.mean(axis=(1, 2))[:, None, None, None] * (1 + t / 1000))

  schedule, g = sd.schedule, 3.0
  timesteps = jnp.asarray(S.ddim_timesteps(schedule.config, 3))
  rng = np.random.default_rng(0)
  noise, weights = (jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32) for _ in range(2))
  context, uncond = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32), jnp.zeros((1, 5, 6), jnp.float32)

  def step(x, t, c):  # one guided DDIM step of a 3-step schedule, by hand
    out = toy(jnp.concatenate([x, x]), t, jnp.concatenate([jnp.broadcast_to(uncond, c.shape), c]))
    return S.ddim_step(schedule, S.guide(out[:2], out[2:], g), t, x, 3)

  def objective(c, last_only):
    x = S.denoise(toy, schedule, noise, c, uncond, timesteps, g, use_cfg=True, grad_last_step_only=last_only)
    return jnp.sum(weights * x)

  before_last = jax.jit(lambda c: step(step(noise, timesteps[0], c), timesteps[1], c))(context)
  want = jax.jit(jax.grad(lambda c: jnp.sum(weights * step(before_last, timesteps[2], c))))(context)
  value_and_grad = jax.jit(jax.value_and_grad(objective), static_argnums=1)
  (last_only, grad_last), (full, grad_full) = value_and_grad(context, True), value_and_grad(context, False)
  np.testing.assert_allclose(last_only, full, rtol=1e-6)
  np.testing.assert_allclose(grad_last, want, rtol=1e-5, atol=1e-7)
  assert max_abs_diff(grad_full, want) > 1e-3 * float(jnp.abs(want).max())


# ------------------------------------------------------------------ full generation


@pytest.fixture(scope="module")
def eight_devices(sd):
  return G.generate(sd, PROMPTS, num_images_per_prompt=N, steps=STEPS, guidance=GUIDANCE, seed=0,
                    mesh=parallel.make_mesh(8), output_type="float")


def test_eight_devices_equal_one_device_in_chunks(sd, eight_devices):
  """8 devices, one 8-image program (6 images + 2 padding) == 1 device, two 4-image programs."""
  one = G.generate(sd, PROMPTS, num_images_per_prompt=N, steps=STEPS, guidance=GUIDANCE, seed=0,
                   mesh=parallel.make_mesh(1), batch_size=4, output_type="float")
  assert eight_devices.shape == (2 * N, 16, 16, 3) and eight_devices.dtype == np.float32
  assert max_abs_diff(eight_devices, one) <= 1e-5


def test_seeds(sd, eight_devices):
  again = G.generate(sd, PROMPTS, num_images_per_prompt=N, steps=STEPS, guidance=GUIDANCE, seed=0,
                     output_type="float")
  other = G.generate(sd, PROMPTS, num_images_per_prompt=N, steps=STEPS, guidance=GUIDANCE, seed=1,
                     output_type="float")
  np.testing.assert_array_equal(again, eight_devices)
  assert max_abs_diff(other, eight_devices) > 1e-2
  # Every image of a prompt starts from its own noise.
  assert max_abs_diff(eight_devices[0], eight_devices[1]) > 1e-2
  u8 = G.generate(sd, PROMPTS, num_images_per_prompt=N, steps=STEPS, guidance=GUIDANCE, seed=0)
  assert u8.dtype == np.uint8
  np.testing.assert_array_equal(u8, np.round(eight_devices * 255).astype(np.uint8))


def test_generate_equals_diffusers_pipeline_with_learned_tokens(tiny_checkpoint, tmp_path, sd, eight_devices):
  """The tiny checkpoint in diffusers' StableDiffusionPipeline + DDIMScheduler, same latents -> same images."""
  from diffusers import DDIMScheduler, StableDiffusionPipeline
  folder = str(tiny_checkpoint / "sd")
  tokens = _export(tmp_path / "tokens", num_classes=3, num_vectors=2, width=sd.text_width)
  prompts = ["a photo of a <cls-1>", "a dark photo of the <cls-2> next to <cls-0>"]

  ours_sd = pipeline.load_stable_diffusion(folder)
  learned = LearnedTokens.from_export(tokens, ours_sd.tokenizer, ours_sd.text_width)
  ours = G.generate(ours_sd, prompts, learned=learned, num_images_per_prompt=N, steps=STEPS, guidance=GUIDANCE,
                    seed=5, output_type="float")

  pipe = StableDiffusionPipeline.from_pretrained(
      folder, scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"), safety_checker=None)
  for c in export.load_tokens(tokens)[1]["classes"]:
    pipe.load_textual_inversion(str(tokens / c["file"]))
  latents = S.initial_latents(5, jnp.arange(2 * N), G.latent_shape(ours_sd))
  with torch.no_grad():
    theirs = pipe(prompts, num_images_per_prompt=N, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  latents=torch.from_numpy(np.asarray(latents).transpose(0, 3, 1, 2).copy()),
                  output_type="np").images
  diff = max_abs_diff(ours, theirs)
  print("max abs diff vs diffusers:", diff)
  assert diff <= 1e-3
  assert max_abs_diff(ours[:N], ours[N:]) > 1e-2  # the prompts (tokens) matter


# ------------------------------------------------------------------ files


def test_save_images_writes_pngs(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
  paths = G.save_images(images, tmp_path / "out", prefix="p")
  assert [p.name for p in paths] == ["p_0000.png", "p_0001.png", "p_0002.png"]
  np.testing.assert_array_equal(np.asarray(Image.open(paths[2])), images[2])
  assert sorted(p.name for p in (tmp_path).iterdir()) == ["out"]  # no staging folder left behind


# ------------------------------------------------------------------ the command


def _argv(tiny_checkpoint, out, *extra):
  return ["mcti generate", "--sd", str(tiny_checkpoint / "sd"), "--out", str(out), "--n", str(N),
          "--steps", str(STEPS), "--guidance", str(GUIDANCE), *extra]


def test_generate_main_writes_images_and_grid(tiny_checkpoint, tmp_path, eight_devices):
  tokens = _export(tmp_path / "tokens", num_classes=2, num_vectors=1, width=32)
  out = tmp_path / "out"
  generate_command.main(_argv(tiny_checkpoint, out, "--tokens", str(tokens), "--prompt", "a photo of a <cls-0>",
                        "--prompt", "a photo of the <cls-1> on the beach"))
  names = sorted(p.name for p in out.iterdir())
  assert names == ["grid.png", "prompt000_0000.png", "prompt000_0001.png", "prompt000_0002.png",
                   "prompt001_0000.png", "prompt001_0001.png", "prompt001_0002.png", "prompts.json"]
  grid = np.asarray(Image.open(out / "grid.png"))  # plots.image_grid: 16-px images drawn 4x, 6 px apart, labelled
  y0, x0 = grid.shape[0] - 6 - (2 * 64 + 6), grid.shape[1] - 6 - (N * 64 + (N - 1) * 6)
  assert y0 > 0 and x0 > 0  # room for the title, column and row labels (the prompts)
  np.testing.assert_array_equal(grid[y0 + 70:y0 + 134, x0 + 70:x0 + 134],
                                np.asarray(Image.open(out / "prompt001_0001.png")).repeat(4, 0).repeat(4, 1))


def test_generate_takes_its_base_model_and_guidance_from_the_tokens_manifest(tiny_checkpoint, tmp_path, eight_devices):
  """Without --sd and --guidance, the export's manifest names both; the images are those of naming them by hand."""
  tokens = _export(tmp_path / "tokens", num_classes=2, num_vectors=1, width=32)  # the shapes above: one compile
  manifest = json.loads((tokens / "manifest.json").read_text())
  manifest.update(base_model="../tiny_sd", guidance=3.0)  # as `mcti train` writes it: relative to the export
  (tokens / "manifest.json").write_text(json.dumps(manifest))
  (tmp_path / "tiny_sd").symlink_to(tiny_checkpoint / "sd")
  common = ["--tokens", str(tokens), "--n", str(N), "--steps", str(STEPS)]
  generate_command.main(["mcti generate", "--out", str(tmp_path / "from_manifest"), *common])
  generate_command.main(["mcti generate", "--out", str(tmp_path / "by_hand"), "--sd", str(tiny_checkpoint / "sd"),
                   "--guidance", "3.0", *common])
  info = json.loads((tmp_path / "from_manifest" / "prompts.json").read_text())
  assert info["guidance"] == 3.0 and info["sd"] == str(tmp_path / "tiny_sd")
  for name in ("prompt000_0000.png", "prompt001_0002.png"):
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "from_manifest" / name)),
                                  np.asarray(Image.open(tmp_path / "by_hand" / name)))


def test_generate_without_sd_needs_a_manifest_that_names_one(tmp_path):
  tokens = _export(tmp_path / "tokens", num_classes=1, num_vectors=1, width=32)
  manifest = json.loads((tokens / "manifest.json").read_text())
  del manifest["base_model"]
  (tokens / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(SystemExit, match="give --sd .*manifest.json names no base model"):
    generate_command.main(["mcti generate", "--tokens", str(tokens), "--out", str(tmp_path / "out")])
  with pytest.raises(SystemExit, match="give --sd"):
    generate_command.main(["mcti generate", "--prompt", "a photo", "--out", str(tmp_path / "out")])


def test_class_prompts():
  learned = LearnedTokens(tok.ClassTokens(tok.token_names(2, 3), np.zeros((2, 3))), np.zeros((2, 3, 4)), ("a", "b"))
  assert G.class_prompts(learned) == ["a photo of a <cls-0>", "a photo of a <cls-1>"]


@pytest.mark.parametrize("width, prompt, message", [
    (16, "a photo of a <cls-0>", r"16-wide .* 32-wide"),
    (32, "a photo of a cat", r"holds no class token"),
    (32, "a photo of a <cls-5>", r"<cls-5> but the tokens hold classes 0..1"),
])
def test_generate_main_refuses(tiny_checkpoint, tmp_path, width, prompt, message):
  tokens = _export(tmp_path / "tokens", num_classes=2, num_vectors=1, width=width)
  with pytest.raises(SystemExit, match=message):
    generate_command.main(_argv(tiny_checkpoint, tmp_path / "out", "--tokens", str(tokens), "--prompt", prompt))
  assert not (tmp_path / "out").exists()


def test_generate_main_refuses_class_token_without_tokens(tiny_checkpoint, tmp_path):
  with pytest.raises(SystemExit, match=r"no learned tokens were loaded \(--tokens\)"):
    generate_command.main(_argv(tiny_checkpoint, tmp_path / "out", "--prompt", "a photo of a <cls-0>"))


@pytest.mark.parametrize("guidance", ["nan", "inf", "-inf"])
def test_generate_refuses_a_guidance_that_is_not_a_number(tmp_path, guidance):
  with pytest.raises(SystemExit, match=f"--guidance {guidance} is not a number"):
    generate_command.main(["mcti generate", "--prompt", "a photo", f"--guidance={guidance}",
                           "--out", str(tmp_path / "o")])
  assert not (tmp_path / "o").exists()


def test_generate_main_refuses_missing_model(tmp_path):
  with pytest.raises(SystemExit, match="mcti generate: .*nowhere"):
    generate_command.main(["mcti generate", "--sd", str(tmp_path / "nowhere"), "--prompt", "a photo"])


def test_generate_main_help(capsys):
  with pytest.raises(SystemExit) as e:
    generate_command.main(["mcti generate", "--help"])
  assert e.value.code == 0
  assert "--tokens" in capsys.readouterr().out


# ------------------------------------------------------------------ the generation metric


def test_clip_image_similarity_equals_numpy_cosines(tiny_checkpoint):
  from transformers import CLIPModel
  from mcti_jax.models import clip as clip_lib
  model, _ = pipeline.load_clip(tiny_checkpoint / "clip")
  rng = np.random.default_rng(0)
  generated = rng.integers(0, 256, (3, 2, 16, 16, 3), dtype=np.uint8)
  shots = rng.integers(0, 256, (3, 4, 20, 24, 3), dtype=np.uint8)  # another size: resized by CLIP's preprocessing
  got = CS.clip_image_similarity(model, generated, shots, batch_size=5)

  theirs = CLIPModel.from_pretrained(str(tiny_checkpoint / "clip"))

  def features(images):
    px = np.asarray(clip_lib.preprocess(images.reshape(-1, *images.shape[2:]), 16)).transpose(0, 3, 1, 2)
    with torch.no_grad():
      f = theirs.get_image_features(pixel_values=torch.from_numpy(px.copy()))
    f = getattr(f, "pooler_output", f).numpy().astype(np.float64)
    return (f / np.linalg.norm(f, axis=-1, keepdims=True)).reshape(*images.shape[:2], -1)

  g, s = features(generated), features(shots)
  want = np.array([np.mean([[gi @ sj for sj in s[k]] for gi in g[k]]) for k in range(3)])
  assert got.shape == (3,)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.ptp(want) > 1e-3  # classes differ, so a mix-up of classes would show


def test_clip_image_similarity_refuses_mismatched_classes(tiny_checkpoint):
  model, _ = pipeline.load_clip(tiny_checkpoint / "clip")
  with pytest.raises(ValueError, match="same K"):
    CS.clip_image_similarity(model, np.zeros((2, 1, 16, 16, 3), np.uint8), np.zeros((3, 1, 16, 16, 3), np.uint8))
