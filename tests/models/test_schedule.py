"""Our noise schedule against diffusers' schedulers and the textbook formulas."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

from mcti_jax.models import hf_io, schedule
from conftest import max_abs_diff

# Stable Diffusion 1.x's scheduler/scheduler_config.json.
SD1 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
       "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
       "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}

SCHEDULES = [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="linear"),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="sigmoid", num_train_timesteps=500),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
]


def _pair(tmp_path, **fields):
  """Our schedule and diffusers' DDPMScheduler, both loaded from one scheduler_config.json that we wrote."""
  config = schedule.SchedulerConfig(**fields)
  schedule.save_pretrained(config, tmp_path / "scheduler")
  ours = schedule.from_pretrained(tmp_path)
  theirs = DDPMScheduler.from_pretrained(str(tmp_path), subfolder="scheduler")
  return ours, theirs


def _data(seed=0, batch=4):
  rng = np.random.default_rng(seed)
  x0 = rng.normal(size=(batch, 8, 8, 4)).astype(np.float32)
  noise = rng.normal(size=(batch, 8, 8, 4)).astype(np.float32)
  t = np.array([0, 1, 500, 999][:batch], np.int32)
  return x0, noise, t


def _torch(x):  # NHWC -> NCHW torch, the layout diffusers' schedulers broadcast over
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("fields", SCHEDULES, ids=lambda f: f["beta_schedule"] + ("_zsnr" if len(f) > 3 else ""))
def test_alphas_cumprod_add_noise_and_velocity_match_ddpm(tmp_path, fields):
  ours, theirs = _pair(tmp_path, **fields)
  assert ours.alphas_cumprod.dtype == jnp.float32
  assert ours.alphas_cumprod.shape == (ours.num_train_timesteps,)
  assert max_abs_diff(ours.alphas_cumprod, theirs.alphas_cumprod) <= 1e-6
  x0, noise, t = _data()
  t = np.minimum(t, ours.num_train_timesteps - 1)
  tol = 1e-6 * max(np.abs(x0).max(), np.abs(noise).max())  # float32 rounding of abar (~4e-7) times |x| (~4)
  x_t = ours.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
  t_x_t = theirs.add_noise(_torch(x0), _torch(noise), torch.from_numpy(t).long())
  assert max_abs_diff(x_t, _nhwc(t_x_t)) <= tol
  v = ours.velocity(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
  assert max_abs_diff(v, _nhwc(theirs.get_velocity(_torch(x0), _torch(noise), torch.from_numpy(t).long()))) <= tol


def test_scaled_linear_by_hand():
  config = schedule.SchedulerConfig.from_hf(SD1)
  n, lo, hi = 1000, math.sqrt(0.00085), math.sqrt(0.012)
  expected_betas = [(lo + i * (hi - lo) / (n - 1)) ** 2 for i in range(n)]
  np.testing.assert_allclose(schedule.betas(config), expected_betas, rtol=1e-6)
  expected_abar, prod = [], 1.0
  for b in expected_betas:
    prod *= 1.0 - b
    expected_abar.append(prod)
  np.testing.assert_allclose(schedule.NoiseSchedule.from_config(config).alphas_cumprod, expected_abar, rtol=1e-5)


def test_training_target_and_prediction_inverse(tmp_path):
  x0, noise, t = map(jnp.asarray, _data(1))
  for prediction_type in ("epsilon", "v_prediction", "sample"):
    s = schedule.NoiseSchedule.from_config(schedule.SchedulerConfig(beta_schedule="scaled_linear",
                                                                    prediction_type=prediction_type))
    target = s.training_target(x0, noise, t)
    abar = np.asarray(s.alphas_cumprod)[np.asarray(t)][:, None, None, None]
    by_hand = {"epsilon": noise, "v_prediction": np.sqrt(abar) * noise - np.sqrt(1 - abar) * x0, "sample": x0}
    assert max_abs_diff(target, by_hand[prediction_type]) <= 1e-6
    # A perfect model output at x_t gives back (x0, noise); t=999 is kept away from abar -> 0 for the inverse.
    x_t = s.add_noise(x0, noise, t)
    pred_x0, pred_eps = s.predict_x0_and_eps(target, x_t, t)
    assert max_abs_diff(pred_x0, x0) <= 1e-3 and max_abs_diff(pred_eps, noise) <= 1e-3


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predicted_x0_matches_ddim_step(tmp_path, prediction_type):
  config = schedule.SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False)
  schedule.save_pretrained(config, tmp_path, class_name="DDIMScheduler")
  ours, ddim = schedule.from_pretrained(tmp_path, subfolder=None), DDIMScheduler.from_pretrained(str(tmp_path))
  ddim.set_timesteps(50)
  x_t, output, _ = _data(2, batch=1)
  t = 480  # one of the 50 "leading" timesteps (multiples of 20)
  assert t in ddim.timesteps.tolist()
  step = ddim.step(_torch(output), t, _torch(x_t), eta=0.0)
  pred_x0, pred_eps = ours.predict_x0_and_eps(jnp.asarray(output), jnp.asarray(x_t), jnp.asarray([t]))
  assert max_abs_diff(pred_x0, _nhwc(step.pred_original_sample)) <= 1e-5
  # DDIM's next sample, from our (x0, eps), by the DDIM formula: sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps.
  abar_prev = float(ours.alphas_cumprod[t - 20])
  prev = np.sqrt(abar_prev) * pred_x0 + np.sqrt(1 - abar_prev) * pred_eps
  assert max_abs_diff(prev, _nhwc(step.prev_sample)) <= 1e-5
  assert float(ours.final_alpha_cumprod) == pytest.approx(float(ddim.final_alpha_cumprod))


def test_scalar_t_and_jit_and_bf16():
  s = schedule.NoiseSchedule.from_config(schedule.SchedulerConfig(beta_schedule="scaled_linear"))
  x0, noise, _ = _data()
  one = jax.jit(lambda s, x, n, t: s.add_noise(x, n, t))(s, x0[0], noise[0], jnp.int32(500))  # unbatched, as vmapped
  abar = float(s.alphas_cumprod[500])
  assert max_abs_diff(one, math.sqrt(abar) * x0[0] + math.sqrt(1 - abar) * noise[0]) <= 1e-6
  low = s.add_noise(jnp.asarray(x0, jnp.bfloat16), jnp.asarray(noise, jnp.bfloat16), jnp.arange(4))
  assert low.dtype == jnp.bfloat16


def test_sd1_pndm_config_loads_with_its_class_defaults(tmp_path):
  (tmp_path / "scheduler").mkdir()
  (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD1))
  ours = schedule.from_pretrained(tmp_path)
  pndm = PNDMScheduler.from_pretrained(str(tmp_path), subfolder="scheduler")
  assert max_abs_diff(ours.alphas_cumprod, pndm.alphas_cumprod) <= 1e-6
  assert ours.prediction_type == "epsilon" and ours.config.steps_offset == 1
  assert not ours.config.set_alpha_to_one and ours.config.skip_prk_steps
  pndm_without_key = {k: v for k, v in SD1.items() if k != "set_alpha_to_one"}
  assert not schedule.SchedulerConfig.from_hf(pndm_without_key).set_alpha_to_one  # PNDM's default
  assert schedule.SchedulerConfig.from_hf({}).set_alpha_to_one  # DDPM/DDIM's default


def test_round_trip_through_hf_dict():
  config = schedule.SchedulerConfig(beta_schedule="linear", trained_betas=(0.1, 0.2), num_train_timesteps=2,
                                    prediction_type="v_prediction")
  assert schedule.SchedulerConfig.from_hf(json.loads(json.dumps(config.to_hf()))) == config
  np.testing.assert_allclose(schedule.alphas_cumprod(config), [0.9, 0.9 * 0.8], rtol=1e-6)


# ---------------------------------------------------------------------- errors


def test_missing_folder_and_file_are_named(tmp_path):
  with pytest.raises(hf_io.CheckpointError, match="does not exist"):
    schedule.from_pretrained(tmp_path / "nowhere")
  (tmp_path / "scheduler").mkdir()
  with pytest.raises(hf_io.CheckpointError, match=r"scheduler/scheduler_config\.json is missing"):
    schedule.from_pretrained(tmp_path)


@pytest.mark.parametrize("key, value", [("beta_schedule", "laplace"), ("prediction_type", "flow_prediction"),
                                        ("trained_betas", [0.1, 0.2])])
def test_unsupported_values_name_file_and_key(tmp_path, key, value):
  (tmp_path / "scheduler_config.json").write_text(json.dumps({**SD1, key: value}))
  with pytest.raises(hf_io.CheckpointError, match=rf"scheduler_config\.json: {key}=.*not supported"):
    schedule.from_pretrained(tmp_path, subfolder=None)
